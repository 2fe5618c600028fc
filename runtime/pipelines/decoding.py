"""Prefill, one decode step, and the greedy loop over a preallocated KV cache (gpt-fast's ``KVCache`` model).

    prefill(runner, feeds, max_new_tokens)  → outputs, KVCache     the prompt's keys/values fill slots 0…T-1
    decode_step(runner, cache, tokens, …)   → logits; writes slot T, T+1, … in place
    DecodeStep(runner, cache, constant)     the same as a callable, over bound buffers where the runner binds
    StepPool()                              bound steps (cache + binding) kept for the next request of their shapes
    greedy_decode(step, logits, …)          argmax, EOS / limits, optional per-token callback
    beam_search(step, logits, …)            HF ``generate(num_beams=N)``: N hypotheses per question, the cache's
                                            rows reordered in place after every step (``KVCache.reorder``)

The cache is allocated once per request for ``B × (T + max_new_tokens − 1)`` slots (the last token is never fed
back) and never copied: the decode graph reads the whole buffer with a mask of its filled slots and returns only
the new token's key/value, which ``KVCache.append`` writes into the next slot by position
(``export/models/kv_cache.py`` has the graph side). Every row of a left-padded batch fills the same slot at each
step; their positions (``position_ids``) differ.

Three ways to run a step, same numbers: ``runner.run(feeds)`` (host numpy in, fresh numpy out); where the runner
offers ``bind`` (ONNX Runtime's IO binding), inputs and outputs bound once per request to fixed host buffers, each
step only overwriting the token and position in place; where it offers ``resident_step`` (TensorRT), the cache is
copied to the device once and each step's keys/values are written into it there, only the token, position, mask
and logits crossing the bus. ``DecodeStep(..., bind=True)`` picks the last the runner has.

Beam search runs B × N rows through the decode graph: after the prefill (at B rows) the first logits, the cache and
the constant feeds are repeated N times per row (``KVCache.repeat_rows``, HF's ``_expand_inputs_for_generation``);
after every step the chosen hypotheses' rows are gathered into place in the same buffers (``KVCache.reorder``, HF's
``Cache.reorder_cache``), so bound buffers stay bound. The device-resident cache has no reorder: beams decode
through bound host buffers or plain runs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from runtime.backends.base import Runner
from runtime.errors import BackendError

CACHE_INPUT, PREFILL_OUTPUT, STEP_OUTPUT = "past.", "present.", "new."
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]  # (step, tokens (B,), finished (B,) bool)


class KVCache:
    """Self-attention keys/values of one request: ``past.{i}.key|value`` buffers (B, KV, C, Dh) and their
    ``attention_mask`` (B, C) int64, 1 on filled slots; ``length`` slots are filled (the same for every row)."""

    pool_key: tuple | None = None  # its shapes, where a StepPool may keep it
    bound_step: "DecodeStep | None" = None  # the StepPool's bound step over these buffers

    def __init__(self, prompt: dict[str, np.ndarray], prompt_mask: np.ndarray, capacity: int):
        """prompt: the prefill's ``present.{i}.key|value`` (B, KV, T, Dh); prompt_mask (B, T); capacity C ≥ T."""
        batch, width = prompt_mask.shape
        self.capacity, self.length = capacity, width
        self.tensors: dict[str, np.ndarray] = {}
        for name, value in prompt.items():
            buffer = np.zeros((*value.shape[:2], capacity, value.shape[3]), dtype=value.dtype)  # (B, KV, C, Dh)
            buffer[:, :, :width] = value
            self.tensors[CACHE_INPUT + name[len(PREFILL_OUTPUT):]] = buffer
        self.mask = np.zeros((batch, capacity), dtype=np.int64)  # (B, C)
        self.mask[:, :width] = prompt_mask

    @classmethod
    def from_prefill(cls, outputs: dict[str, np.ndarray], prompt_mask: np.ndarray, max_new_tokens: int) -> "KVCache":
        prompt = {name: value for name, value in outputs.items() if name.startswith(PREFILL_OUTPUT)}
        return cls(prompt, prompt_mask, prompt_mask.shape[1] + max(max_new_tokens - 1, 0))

    def refill(self, prompt: dict[str, np.ndarray], prompt_mask: np.ndarray) -> None:
        """Start over with another prompt of the same shapes, in the same buffers: what a new cache would hold (the
        prompt's slots, zeros after them), so buffers bound to a runner stay bound (:class:`StepPool`)."""
        width = prompt_mask.shape[1]
        for name, value in prompt.items():
            buffer = self.tensors[CACHE_INPUT + name[len(PREFILL_OUTPUT):]]  # (B, KV, C, Dh)
            buffer[:, :, :width] = value
            buffer[:, :, width:] = 0
        self.mask[:] = 0  # (B, C)
        self.mask[:, :width] = prompt_mask
        self.length = width

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (every ``past.*`` buffer, all rows, at its full capacity)."""
        return int(sum(buffer.nbytes for buffer in self.tensors.values()))

    def feeds(self) -> dict[str, np.ndarray]:
        """The decode graph's cache inputs: every ``past.*`` buffer and the mask, the arrays themselves."""
        return {**self.tensors, "attention_mask": self.mask}

    def next_slot(self) -> int:
        """The slot the next step's keys/values go to, checked before anything is written there."""
        if self.length >= self.capacity:
            raise BackendError(f"the KV cache is full ({self.capacity} slots): more decode steps than it was sized for")
        return self.length

    def append(self, step_outputs: dict[str, np.ndarray]) -> None:
        """Write a step's ``new.{i}.key|value`` (B, KV, 1, Dh) into the next slot, in place."""
        slot = self.next_slot()
        for name, value in step_outputs.items():
            if name.startswith(STEP_OUTPUT):
                self.tensors[CACHE_INPUT + name[len(STEP_OUTPUT):]][:, :, slot] = value[:, :, 0]
        self.advance()

    def repeat_rows(self, times: int) -> "KVCache":
        """A cache of B × ``times`` rows, each row repeated ``times`` times in a row (B → B·N, as HF expands inputs
        for beam search); fresh buffers, so call it before any are bound."""
        repeated = object.__new__(KVCache)
        repeated.capacity, repeated.length = self.capacity, self.length
        repeated.tensors = {name: np.repeat(buffer, times, axis=0)  # (B·N, KV, C, Dh)
                            for name, buffer in self.tensors.items()}
        repeated.mask = np.repeat(self.mask, times, axis=0)  # (B·N, C)
        return repeated

    def reorder(self, rows: np.ndarray) -> None:
        """Row ``r`` of every buffer becomes row ``rows[r]`` (the hypotheses a beam step kept), written in place: the
        same arrays, so buffers bound to ONNX Runtime stay bound. Only the filled slots are copied."""
        rows = np.asarray(rows, dtype=np.int64)  # (B·N,)
        if np.array_equal(rows, np.arange(len(rows))):
            return
        filled = self.length
        for buffer in self.tensors.values():  # (B·N, KV, C, Dh)
            buffer[:, :, :filled] = buffer[rows, :, :filled]  # the gather copies first, then writes in place
        self.mask[:] = self.mask[rows]  # (B·N, C)

    def advance(self) -> None:
        """Mark the next slot filled (``append`` after writing it; a device-resident cache after writing it there)."""
        self.mask[:, self.next_slot()] = 1
        self.length += 1


def prefill(runner: Runner, feeds: dict[str, np.ndarray], max_new_tokens: int,
            pool: "StepPool | None" = None) -> tuple[dict[str, np.ndarray], KVCache]:
    """Run the prompt; its keys/values fill a cache sized for ``max_new_tokens`` more (a kept one of the same
    shapes from ``pool`` where it has one). feeds must hold the prompt's ``attention_mask`` (B, T)."""
    outputs = runner.run(feeds)
    if pool is not None:
        return outputs, pool.cache(outputs, feeds["attention_mask"], max_new_tokens)
    return outputs, KVCache.from_prefill(outputs, feeds["attention_mask"], max_new_tokens)


def decode_step(runner: Runner, cache: KVCache, tokens: np.ndarray, positions: np.ndarray,
                constant: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """One decode-graph call: tokens (B,) at positions (B,) over the cache → logits (B, V); the new keys/values are
    written into the cache's next slot."""
    outputs = runner.run({"input_ids": tokens.astype(np.int64)[:, None], "position_ids": positions.astype(np.int64)[:, None],
                          **cache.feeds(), **(constant or {})})  # (B, 1) each, the cache, the request's constants
    cache.append(outputs)
    return outputs["logits"]


class DecodeStep:
    """``step(tokens (B,), positions (B,)) → logits (B, V)``: one decode-graph call that then writes the new
    keys/values into the cache. ``constant`` feeds (Mllama's cross-attention keys/values and masks) stay fixed for
    the request. With ``bind`` and a runner that has ``bind``, every buffer is bound once and reused (the returned
    logits are then overwritten by the next step: copy them to keep them)."""

    def __init__(self, runner: Runner, cache: KVCache, constant: dict[str, np.ndarray] | None = None, bind: bool = False,
                 resident: bool = True):
        """``resident`` False: never the device-resident cache (beam search reorders the host cache)."""
        self.runner, self.cache, self.constant = runner, cache, constant or {}
        self.bound: Callable[[], None] | None = None
        self.resident: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        if bind and resident and hasattr(runner, "resident_step"):  # the cache moves to the device once and stays there
            self.resident = runner.resident_step(cache, self.constant)
        elif bind and hasattr(runner, "bind"):
            batch = cache.mask.shape[0]
            self.input_ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1), overwritten in place each step
            self.position_ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1)
            self.outputs = self._output_buffers()
            inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, **cache.feeds(), **self.constant}
            self.bound = runner.bind({name: inputs[name] for name in runner.input_names}, self.outputs)
            # (cache buffer (B, KV, C, Dh), the step's new key/value (B, KV, Dh)) per layer: each step's append
            self.appends = [(cache.tensors[CACHE_INPUT + name[len(STEP_OUTPUT):]], buffer[:, :, 0])
                            for name, buffer in self.outputs.items() if name.startswith(STEP_OUTPUT)]

    def use_constants(self, constant: dict[str, np.ndarray]) -> bool:
        """Bound steps kept for another request (:class:`StepPool`): bind that request's constant feeds in place of
        the last one's; False where the bound call cannot rebind them (then the step is not reused)."""
        if constant.keys() != self.constant.keys() or (constant and not hasattr(self.bound, "rebind")):
            return False
        for name, value in constant.items():
            self.bound.rebind(name, value)
        self.constant = constant
        return True

    def _output_buffers(self) -> dict[str, np.ndarray]:
        """Host buffers for the step's outputs: logits (B, V) float32 and ``new.*`` (B, KV, 1, Dh) like the cache."""
        spec = getattr(self.runner, "output_shapes", None)
        if spec is None:
            raise BackendError("this runner can bind buffers but does not say its output shapes")
        batch = self.cache.mask.shape[0]
        buffers = {}
        for name in self.runner.output_names:
            if name.startswith(STEP_OUTPUT):
                like = self.cache.tensors[CACHE_INPUT + name[len(STEP_OUTPUT):]]  # (B, KV, C, Dh)
                buffers[name] = np.empty((batch, like.shape[1], 1, like.shape[3]), dtype=like.dtype)
            else:
                shape, dtype = spec[name]
                buffers[name] = np.empty((batch, *shape[1:]), dtype=dtype)
        return buffers

    def reorder(self, rows: np.ndarray) -> None:
        """Beam search: the cache's row ``r`` becomes row ``rows[r]``, in place (bound buffers stay bound)."""
        if self.resident is not None:
            raise BackendError("the device-resident KV cache cannot be reordered for beam search")
        self.cache.reorder(rows)

    def __call__(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.resident is not None:
            return self.resident(tokens, positions)
        if self.bound is None:
            return decode_step(self.runner, self.cache, tokens, positions, self.constant)
        self.input_ids[:, 0] = tokens  # the bound buffers, overwritten in place
        self.position_ids[:, 0] = positions
        self.bound()
        slot = self.cache.next_slot()
        for buffer, value in self.appends:  # KVCache.append, with the pairs looked up once
            buffer[:, :, slot] = value
        self.cache.advance()
        return self.outputs["logits"]


class StepPool:
    """Bound decode steps kept between requests, gpt-fast style (its caches are set up once, not per request): a
    request whose cache has the shapes of a kept step's (batch, prompt width, capacity) refills that step's cache
    (:meth:`KVCache.refill`: the same contents as a new cache) and decodes through its binding — no cache
    allocation and no bind per request (README "Speed"). A step is taken out while its cache is in use, so
    concurrent requests never share one; at most ``max_bytes`` of caches are kept, the least recently used dropped
    first."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.kept: OrderedDict[tuple, DecodeStep] = OrderedDict()
        self.lock = threading.Lock()

    def cache(self, outputs: dict[str, np.ndarray], prompt_mask: np.ndarray, max_new_tokens: int) -> KVCache:
        """``KVCache.from_prefill``, in a kept step's buffers where one has these shapes."""
        prompt = {name: value for name, value in outputs.items() if name.startswith(PREFILL_OUTPUT)}
        capacity = prompt_mask.shape[1] + max(max_new_tokens - 1, 0)
        key = (tuple((name, value.shape, value.dtype.str) for name, value in prompt.items()), capacity)
        with self.lock:
            step = self.kept.pop(key, None)
        if step is None:
            cache = KVCache(prompt, prompt_mask, capacity)
            cache.pool_key = key
            return cache
        step.cache.refill(prompt, prompt_mask)
        return step.cache

    def step(self, runner: Runner, cache: KVCache, constant: dict[str, np.ndarray]) -> DecodeStep:
        """A bound step over ``cache``: the kept one it came with, else a new one (kept on ``release``)."""
        step = cache.bound_step
        if step is not None and step.runner is runner and step.use_constants(constant):
            return step
        cache.bound_step = DecodeStep(runner, cache, constant, bind=True)
        return cache.bound_step

    def release(self, cache: KVCache) -> None:
        """The request is done with ``cache``: keep its bound step for the next request of its shapes."""
        step = cache.bound_step
        if step is None or step.bound is None or cache.pool_key is None or cache.nbytes > self.max_bytes:
            return
        with self.lock:
            self.kept.pop(cache.pool_key, None)
            self.kept[cache.pool_key] = step
            while sum(kept.cache.nbytes for kept in self.kept.values()) > self.max_bytes:
                self.kept.popitem(last=False)


def greedy_decode(
    step: Callable[[np.ndarray, np.ndarray], np.ndarray],
    logits: np.ndarray,
    next_position: np.ndarray,
    eos_token_ids: list[int],
    pad_token_id: int,
    max_new_tokens: int,
    row_limits: np.ndarray | None = None,
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """Greedy decoding. logits (B, V) from the prefill; next_position (B,) the first generated token's position;
    ``step(tokens, positions)`` runs one decode step and returns the next logits.

    Returns the generated ids per row, EOS excluded. A row finishes at EOS, at ``max_new_tokens``, or at its own
    ``row_limits[row]`` tokens (the model's position limit); finished rows are fed padding (as HF does) until
    every row has finished. ``on_token(step, tokens, finished)`` is called after every chosen token (streaming,
    per-token timing).
    """
    batch = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, dtype=bool)
    limits = np.full(batch, max_new_tokens) if row_limits is None else np.minimum(row_limits, max_new_tokens)
    position = next_position.astype(np.int64).copy()  # (B,)
    for index in range(max_new_tokens):
        tokens = logits.argmax(axis=-1).astype(np.int64)  # (B,) first maximum on ties, as torch.argmax
        tokens = np.where(finished, pad_token_id, tokens)
        for row in range(batch):
            if not finished[row]:
                if int(tokens[row]) in eos_token_ids:
                    finished[row] = True
                else:
                    generated[row].append(int(tokens[row]))
                    finished[row] = len(generated[row]) >= limits[row]
        if on_token is not None:
            on_token(index, tokens, finished)
        if finished.all() or index == max_new_tokens - 1:
            break
        logits = step(tokens, position)
        position = position + 1
    return generated


# ------------------------------------------------------------------------------------------------ beam search

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
