"""Beam search over the decode step (HF ``generate(num_beams=N)``), in numpy: the search itself; the cache's rows are
repeated and reordered by ``KVCache.repeat_rows`` / ``KVCache.reorder`` (``runtime/pipelines/decoding.py``)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from runtime.pipelines.decoding import TokenCallback

IMPOSSIBLE = np.float32(-1.0e9)  # HF's score for "cannot be chosen", added in float32 as HF adds it


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities over the last axis, as torch's ``log_softmax``: x − max − log Σ exp(x − max)."""
    x = logits.astype(np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(R, k) indices of the ``k`` largest scores of each row, largest first; equal scores by lower index (what
    ``torch.topk`` gives on CPU in practice, though torch does not promise an order among ties)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def beam_search(
    step: Callable[[np.ndarray, np.ndarray], np.ndarray],
    logits: np.ndarray,
    next_position: np.ndarray,
    eos_token_ids: list[int],
    max_new_tokens: int,
    num_beams: int,
    reorder: Callable[[np.ndarray], None],
    row_limits: np.ndarray | None = None,
    length_penalty: float = 1.0,
    on_token: TokenCallback | None = None,
    on_margins: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[list[list[int]], np.ndarray]:
    """Beam search as HF's ``GenerationMixin._beam_search`` (transformers 5.x) with ``early_stopping=False``, one
    sequence returned per question. logits (B·N, V) from the prefill, each question's row repeated N times;
    next_position (B,) the first generated token's position; ``step(tokens (B·N,), positions (B·N,))`` runs one
    decode step; ``reorder(rows (B·N,))`` makes the cache's row r a copy of row ``rows[r]`` before that step.

    Each step, per question: float32 log-softmax plus each live hypothesis' running sum; the top
    ``max(2, 1 + #EOS)·N`` continuations over (N × V). Continuations ending in EOS, or reaching the length limit,
    finish — only those among the first N count, scored ``sum / length ** length_penalty`` with ``length`` the
    tokens generated, EOS included (HF's ``cur_len + 1 − prompt length``: the prompt never counts) — and the N best
    of the rest live on. A question is done once no finished slot is empty and its best live hypothesis, scored at
    the current length, cannot beat its worst finished one; decoding stops when every question is done or every
    continuation finished (the length limit: ``max_new_tokens``, or ``row_limits[b]``, the model's positions).

    Returns the best finished hypothesis per question (EOS excluded) and its score (B,) (HF's
    ``sequences_scores``). Ties between equal scores are broken by lower index (:func:`top_k`). ``on_token(step,
    best live hypothesis' token (B,), question done (B,))`` after every step; ``on_margins(step, (B,))``: the
    smallest gap between adjacent scores among each open question's top K + 1 candidates (inf once done) — how
    close that step came to a tie that could change the search (parity's near-tie criterion).
    """
    rows, vocab = logits.shape
    batch = rows // num_beams
    limits = np.full(batch, max_new_tokens) if row_limits is None else np.minimum(row_limits, max_new_tokens)
    eos = np.array(eos_token_ids, dtype=np.int64)
    keep = max(2, 1 + len(eos)) * num_beams  # K candidates: at least N of them do not end in EOS
    among_first = np.arange(keep) < num_beams  # (K,) only the top N candidates may finish
    live = np.zeros((batch, num_beams, max_new_tokens), dtype=np.int64)  # (B, N, L) the live hypotheses' tokens
    live_scores = np.full((batch, num_beams), IMPOSSIBLE, dtype=np.float32)  # (B, N) their log-probability sums
    live_scores[:, 0] = 0.0  # the N copies of a question start as one hypothesis
    done = np.zeros_like(live)  # (B, N, L) finished hypotheses, best first
    done_lengths = np.zeros((batch, num_beams), dtype=np.int64)  # (B, N)
    done_scores = np.full((batch, num_beams), IMPOSSIBLE, dtype=np.float32)  # (B, N)
    done_filled = np.zeros((batch, num_beams), dtype=bool)  # (B, N)
    open_ = np.ones(batch, dtype=bool)  # (B,) a question's finished set may still change
    first = np.repeat(next_position.astype(np.int64), num_beams)  # (B·N,)
    last = np.repeat(next_position.astype(np.int64) + limits - 1, num_beams)  # (B·N,) done rows stay in range
    row_offset = np.arange(batch)[:, None] * num_beams  # (B, 1)
    for index in range(max_new_tokens):
        length = index + 1  # tokens generated, this one included
        scores = log_softmax(logits).reshape(batch, num_beams, vocab) + live_scores[:, :, None]  # (B, N, V)
        scores = scores.reshape(batch, num_beams * vocab)  # (B, N·V)
        ranked = top_k(scores, keep + 1)  # (B, K + 1): one past the cut, for the margin
        chosen = ranked[:, :keep]  # (B, K)
        candidate_scores = np.take_along_axis(scores, chosen, axis=1)  # (B, K)
        if on_margins is not None:
            gaps = -np.diff(np.take_along_axis(scores, ranked, axis=1), axis=1)  # (B, K) adjacent score gaps, ≥ 0
            on_margins(index, np.where(open_, gaps.min(axis=1), np.inf))
        source, tokens = chosen // vocab, chosen % vocab  # (B, K) each
        candidates = np.take_along_axis(live, source[:, :, None], axis=1)  # (B, K, L) copies
        candidates[:, :, index] = tokens
        stops = np.isin(tokens, eos) | (length >= limits)[:, None]  # (B, K)

        # the N best continuations that did not stop live on
        continuing = candidate_scores + stops.astype(np.float32) * IMPOSSIBLE  # (B, K)
        best = top_k(continuing, num_beams)  # (B, N)
        live = np.take_along_axis(candidates, best[:, :, None], axis=1)  # (B, N, L)
        live_scores = np.take_along_axis(continuing, best, axis=1)  # (B, N)
        live_source = np.take_along_axis(source, best, axis=1)  # (B, N)

        # stopped candidates among the first N join the finished set where they beat its worst
        finishing = stops & among_first[None, :]  # (B, K)
        finished_scores = candidate_scores / np.float32(length ** length_penalty)  # (B, K)
        finished_scores = finished_scores + (~open_).astype(np.float32)[:, None] * IMPOSSIBLE
        finished_scores = finished_scores + (~finishing).astype(np.float32) * IMPOSSIBLE
        merged = np.concatenate([done_scores, finished_scores], axis=1)  # (B, N + K)
        kept = top_k(merged, num_beams)  # (B, N)
        done = np.take_along_axis(np.concatenate([done, candidates], axis=1), kept[:, :, None], axis=1)  # (B, N, L)
        done_lengths = np.take_along_axis(
            np.concatenate([done_lengths, np.full((batch, keep), length)], axis=1), kept, axis=1)  # (B, N)
        done_scores = np.take_along_axis(merged, kept, axis=1)  # (B, N)
        done_filled = np.take_along_axis(np.concatenate([done_filled, finishing], axis=1), kept, axis=1)  # (B, N)

        # early_stopping=False: could the best live hypothesis, scored at today's length, beat the worst finished?
        best_live = live_scores[:, :1] / np.float32(length ** length_penalty)  # (B, 1)
        worst_done = np.where(done_filled, done_scores.min(axis=1, keepdims=True), IMPOSSIBLE)  # (B, N)
        open_ &= (best_live > worst_done).any(axis=1)
        if on_token is not None:
            on_token(index, live[:, 0, index], ~open_)
        if not open_.any() or stops.all():
            break
        reorder((live_source + row_offset).reshape(-1))  # (B·N,) the cache rows the live hypotheses came from
        logits = step(live[:, :, index].reshape(-1), np.minimum(first + index, last))
    generated = []
    for row in range(batch):
        ids = done[row, 0, : done_lengths[row, 0]].tolist()  # filled: at the last step every candidate stops
        generated.append(ids[:-1] if ids and ids[-1] in eos_token_ids else ids)
    return generated, done_scores[:, 0].copy()
