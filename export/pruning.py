"""The pruning math: the user's request, and scoring visual tokens (selecting them: ``export/selection.py``).

Everything here is a small pure torch function that traces to plain ONNX ops (no data-dependent shapes), so the
same code is the PyTorch reference and the exported graph. Methods are described in ``shared/papers.md``. A request
(:class:`PruningConfig`) is resolved against a model by its adapter into ``runtime.contract.ResolvedPruning``, which
the graphs are built from; the scoring functions read either (``method``, ``image_importance``, ``seed``).

Conventions
-----------
- ``ratio`` is the fraction of visual tokens *removed*; ``k = max(1, round(N * (1 - ratio)))`` are kept.
- A score is "higher is more important". On equal scores the **lower index wins**, in eager PyTorch and in
  the exported graph alike (ONNX ``TopK`` returns the lower index first on ties; eager mode uses a stable sort).
- Kept tokens stay in their original order: ``kept_indices`` is ascending.
- Score math is float32 whatever the precision of the model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar, Union

import numpy as np
import torch

from export.selection import gather_tokens, rank_bounds, select_top_k, stable_ranks, top_ranks
from runtime.contract import ResolvedPruning, keep_count
from export.defaults import DEFAULT_LAYER_WEIGHTS
from runtime.errors import UsageError

__all__ = [
    "LAYER_WEIGHT_PRESETS", "keep_count", "parse_layer_weights", "parse_weight_list", "PruningConfig", "Settings",
    "Signals", "image_token_weights", "catp_scores", "catp_score_bounds", "l2_scores", "self_attention_scores",
    "random_scores", "first_k_scores", "head_text_attention", "trim_sum_scores", "trim_union_scores",
    "trim_union_score_bounds", "uniform_scores", "TrimScoreFn", "trim_score_fn", "TRIM_METHODS", "TRIM_SCORE_BOUNDS",
    "method_function", "ScoreFn", "METHODS", "SCORE_BOUNDS", "score_bounds", "ALL_METHODS", "check_method",
    "score_tokens",
    # the selection's names, from export/selection.py
    "stable_ranks", "rank_bounds", "top_ranks", "select_top_k", "gather_tokens",
]

# --------------------------------------------------------------------------------------------------- config

LAYER_WEIGHT_PRESETS = ("uniform", "first", "last", "first+last")


def parse_layer_weights(spec: str, num_layers: int) -> list[float]:
    """``uniform|first|last|first+last|w0,w1,...`` → one weight per cross-attention layer."""
    spec = spec.strip()
    if spec == "uniform":
        return [1.0] * num_layers
    if spec == "first":
        return [1.0] + [0.0] * (num_layers - 1)
    if spec == "last":
        return [0.0] * (num_layers - 1) + [1.0]
    if spec == "first+last":
        return [1.0 if i in (0, num_layers - 1) else 0.0 for i in range(num_layers)]
    weights = parse_weight_list(spec)
    if len(weights) != num_layers:
        raise UsageError(
            f"--layer-weights has {len(weights)} weight(s) but the model has {num_layers} cross-attention "
            f"layer(s); give exactly one weight per layer"
        )
    return weights


def parse_weight_list(spec: str) -> list[float]:
    """A custom ``--layer-weights`` list: finite, non-negative numbers, not all zero (its length is checked against
    the model's cross-attention layers by :func:`parse_layer_weights`)."""
    parts = [p for p in re.split(r"[,\s]+", spec.strip()) if p]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not weights:
        raise UsageError(
            f"--layer-weights must be one of {', '.join(LAYER_WEIGHT_PRESETS)} or a comma-separated list of "
            f"numbers, got {spec!r}"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"--layer-weights must be finite, non-negative and not all zero, got {spec!r}")
    return weights


@dataclass(frozen=True)
class PruningConfig:
    """What the user asked for; resolved against a model by the adapter (``k``, weights per layer)."""

    method: str = "catp"
    ratio: float = 0.5
    layer_weights: str = DEFAULT_LAYER_WEIGHTS
    image_importance: bool = False
    seed: int = 0
    trim_first_layer: bool = False  # Trimmed Llama: also trim the first cross-attention layer's own keys/values


# What the scoring methods read besides the signals (``method``, ``image_importance``, ``seed``): a request, or the
# settings resolved from it.
Settings = Union[PruningConfig, ResolvedPruning]


# --------------------------------------------------------------------------------------------------- signals


@dataclass
class Signals:
    """What a model exposes to the scoring functions, for one batch.

    cross_attentions: per cross-attention layer, ``(B, heads, Q, P)`` probabilities of queries over image tokens.
    self_attentions:  per layer, ``(B, heads, Q, Q)`` probabilities among the queries.
    tokens:           ``(B, Q, D)`` the candidate tokens themselves (for ``l2``).
    vision_attention: ``(B, heads, P, P)`` last vision self-attention layer (for image-token importance), or None.
    """

    tokens: torch.Tensor
    cross_attentions: Sequence[torch.Tensor] = field(default_factory=tuple)
    self_attentions: Sequence[torch.Tensor] = field(default_factory=tuple)
    vision_attention: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------- scoring


def image_token_weights(vision_attention: torch.Tensor) -> torch.Tensor:
    """``u[b, j]``: attention image token ``j`` receives in the last vision layer, normalised to mean 1.

    vision_attention: (B, heads, P, P) → (B, P). Summed over heads and query rows.
    """
    received = vision_attention.float().sum(dim=(1, 2))  # (B, P)
    return received / received.sum(-1, keepdim=True) * received.shape[-1]


def catp_scores(
    cross_attentions: Sequence[torch.Tensor],
    layer_weights: Sequence[float],
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """CATP rank voting (papers.md).

    R_l[b,h,:,j] = rank of A_l[b,h,:,j] among the Q queries (0 lowest … Q-1 highest)
    score[b,q]   = Σ_l w_l · Σ_h Σ_j u[b,j] · R_l[b,h,q,j]
    ``token_weights`` is ``u`` (B, P); None means u = 1.
    """
    if len(cross_attentions) != len(layer_weights):
        raise UsageError(
            f"{len(layer_weights)} layer weight(s) for {len(cross_attentions)} cross-attention layer(s)"
        )
    score = None
    for weight, probs in zip(layer_weights, cross_attentions):
        if weight == 0.0:
            continue
        ranks = stable_ranks(probs, dim=2)  # (B, heads, Q, P): every (head, image token) ranks all queries
        if token_weights is not None:
            ranks = ranks * token_weights[:, None, None, :]  # votes weighted by image-token importance
        votes = ranks.sum(dim=(1, 3)) * float(weight)  # (B, Q)
        score = votes if score is None else score + votes
    if score is None:
        raise UsageError("CATP needs at least one non-zero layer weight")
    return score


def catp_score_bounds(
    cross_attentions: Sequence[torch.Tensor],
    layer_weights: Sequence[float],
    token_weights: torch.Tensor | None,
    tie_rtol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest CATP score of every query, (B, Q) each, when attention probabilities within
    ``tie_rtol`` of each other may rank either way: :func:`catp_scores` with ranks replaced by :func:`rank_bounds`."""
    lower = upper = None
    for weight, probs in zip(layer_weights, cross_attentions):
        if weight == 0.0:
            continue
        low, high = rank_bounds(probs, dim=2, tie_rtol=tie_rtol)  # (B, heads, Q, P) each
        if token_weights is not None:
            low, high = low * token_weights[:, None, None, :].double(), high * token_weights[:, None, None, :].double()
        low, high = low.sum(dim=(1, 3)) * weight, high.sum(dim=(1, 3)) * weight  # (B, Q)
        lower = low if lower is None else lower + low
        upper = high if upper is None else upper + high
    if lower is None or upper is None:
        raise UsageError("CATP needs at least one non-zero layer weight")
    return lower, upper


def l2_scores(tokens: torch.Tensor) -> torch.Tensor:
    """L2 norm of each candidate token: (B, Q, D) → (B, Q)."""
    return tokens.float().norm(dim=-1)


def self_attention_scores(self_attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """SpAtten-style: attention each query *receives*, summed over layers, heads and query rows → (B, Q)."""
    total = None
    for probs in self_attentions:  # (B, heads, Q, Q)
        received = probs.float().sum(dim=(1, 2))  # (B, Q)
        total = received if total is None else total + received
    if total is None:
        raise UsageError("self-attn scoring needs at least one self-attention layer")
    return total


def random_scores(batch_like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random score per token, a constant baked into the graph: the same tokens for every input."""
    batch, num_tokens = batch_like.shape[0], batch_like.shape[1]
    values = np.random.default_rng(int(seed)).random(int(num_tokens), dtype=np.float64)  # numpy: a plain graph constant
    constant = torch.tensor(values, dtype=torch.float32, device=batch_like.device)  # (N,)
    return constant.unsqueeze(0).expand(batch, num_tokens)  # (B, N)


def first_k_scores(batch_like: torch.Tensor) -> torch.Tensor:
    """Equal scores: the lower-index tie rule keeps the first k tokens."""
    return torch.zeros_like(batch_like[..., 0], dtype=torch.float32)  # (B, N)


# ----------------------------------------------------------------------------- Trimmed Llama (Mllama) scoring
# Inputs: probs (B, heads, T, N) — the first cross-attention layer's text→image attention in the prefill;
# row_weights (B, T) — 1 for text rows that see an image (and are not padding), 0 for the others.


def head_text_attention(probs: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Attention each visual token receives per head, summed over voting text rows: (B, H, T, N) → (B, H, N)."""
    return (probs.float() * row_weights.float()[:, None, :, None]).sum(dim=2)  # (B, H, N)


def trim_sum_scores(probs: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``trim-sum``: Σ_h Σ_t A[b, h, t, n] over voting rows → (B, N)."""
    return head_text_attention(probs, row_weights).sum(dim=1)  # (B, N)


def trim_union_scores(probs: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``trim-union`` (union-rank): each token's best within-head rank over heads; higher score = better.

    Keeping the top ``k`` by this score is exactly the union of the per-head top-m sets at the m where the union
    reaches ``k`` (papers.md); at that boundary the lower index wins. → (B, N) float32.
    """
    per_head = head_text_attention(probs, row_weights)  # (B, H, N)
    best_rank = top_ranks(per_head).amin(dim=1)  # (B, N)
    return -best_rank


def trim_union_score_bounds(probs: torch.Tensor, row_weights: torch.Tensor, tie_rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Parity: the lowest and highest ``trim-union`` score of every token when per-head attention sums within
    ``tie_rtol`` of each other may rank either way (the scores are rank counts, discontinuous like CATP's)."""
    per_head = head_text_attention(probs, row_weights)  # (B, H, N)
    num_tokens = per_head.shape[-1]
    below_low, below_high = rank_bounds(per_head, dim=-1, tie_rtol=tie_rtol)  # elements below: (B, H, N) each
    best_rank_low = ((num_tokens - 1) - below_high).amin(dim=1)  # best (smallest) top rank it can reach
    best_rank_high = ((num_tokens - 1) - below_low).amin(dim=1)
    return -best_rank_high, -best_rank_low  # score = -best rank


def uniform_scores(batch_like: torch.Tensor, k: int) -> torch.Tensor:
    """``uniform``: k evenly spaced tokens (the centres of k equal bins of the N tokens), a graph constant."""
    batch, num_tokens = batch_like.shape[0], int(batch_like.shape[1])
    chosen = np.floor((np.arange(k) + 0.5) * num_tokens / k).astype(np.int64)
    values = np.zeros(num_tokens, dtype=np.float32)
    values[chosen] = 1.0
    constant = torch.tensor(values, device=batch_like.device)  # (N,)
    return constant.unsqueeze(0).expand(batch, num_tokens)  # (B, N)


# A Trimmed-Llama scoring method: (probs, row_weights, cross_attention_states (B, N, D)) -> scores (B, N)
TrimScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_Function = TypeVar("_Function")


def method_function(registry: dict[str, _Function], method: str, family: str) -> _Function:
    """``registry[method]``, or one ``UsageError`` line naming the family's methods."""
    if method not in registry:
        raise UsageError(f"--method {method!r} does not apply to {family}; choose one of {', '.join(registry)}")
    return registry[method]


def trim_score_fn(method: str, k: int, seed: int) -> TrimScoreFn:
    """The Trimmed-Llama scoring function for ``method``: (probs, row_weights, cross_attention_states) → (B, N)."""
    functions: dict[str, TrimScoreFn] = {
        "trim-sum": lambda probs, rows, states: trim_sum_scores(probs, rows),
        "trim-union": lambda probs, rows, states: trim_union_scores(probs, rows),
        "l2": lambda probs, rows, states: l2_scores(states),
        "random": lambda probs, rows, states: random_scores(states, seed),
        "uniform": lambda probs, rows, states: uniform_scores(states, k),
    }
    return method_function(functions, method, "LLaMA-3.2-Vision")


TRIM_METHODS = ("trim-sum", "trim-union", "l2", "random", "uniform")


# A Q-Former (BLIP-2) scoring method: (signals, resolved layer weights, settings) -> scores (B, Q)
ScoreFn = Callable[[Signals, Sequence[float], Settings], torch.Tensor]


def _catp(signals: Signals, layer_weights: Sequence[float], config: Settings) -> torch.Tensor:
    token_weights = None
    if config.image_importance:
        if signals.vision_attention is None:
            raise UsageError("--image-importance needs the vision encoder's last attention layer")
        token_weights = image_token_weights(signals.vision_attention)
    return catp_scores(signals.cross_attentions, layer_weights, token_weights)


def _catp_bounds(signals: Signals, layer_weights: Sequence[float], config: Settings, tie_rtol: float):
    token_weights = image_token_weights(signals.vision_attention) if config.image_importance else None
    return catp_score_bounds(signals.cross_attentions, layer_weights, token_weights, tie_rtol)


METHODS: dict[str, ScoreFn] = {
    "catp": _catp,
    "l2": lambda s, w, c: l2_scores(s.tokens),
    "self-attn": lambda s, w, c: self_attention_scores(s.self_attentions),
    "random": lambda s, w, c: random_scores(s.tokens, c.seed),
    "first-k": lambda s, w, c: first_k_scores(s.tokens),
}


# Methods whose scores are discontinuous in the model's activations (rank counts) give parity score bounds; for
# the others the scores are continuous and compared with a tolerance. Q-Former methods: (signals, layer weights,
# settings, tie_rtol); Trimmed-Llama methods: (probs, row_weights, tie_rtol). Each → (lower, upper) scores.
SCORE_BOUNDS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"catp": _catp_bounds}
TRIM_SCORE_BOUNDS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"trim-union": trim_union_score_bounds}


def score_bounds(
    signals: Signals, layer_weights: Sequence[float], config: Settings, tie_rtol: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lower, upper) scores (B, Q) reachable under float-level differences of the signals, or None when the
    method's scores are continuous (compare those with a tolerance instead)."""
    bounds = SCORE_BOUNDS.get(config.method)
    return None if bounds is None else bounds(signals, layer_weights, config, tie_rtol)


ALL_METHODS = tuple(dict.fromkeys([*METHODS, *TRIM_METHODS]))


def check_method(method: str, allowed: Sequence[str] | None = None) -> None:
    """``allowed``: a model family's methods (None: any family's)."""
    allowed = ALL_METHODS if allowed is None else tuple(allowed)
    if method not in allowed:
        raise UsageError(f"unknown --method {method!r}; choose one of {', '.join(allowed)}")


def score_tokens(signals: Signals, layer_weights: Sequence[float], config: Settings) -> torch.Tensor:
    """Scores (B, Q) of the Q-Former tokens by ``config.method``."""
    return method_function(METHODS, config.method, "BLIP-2")(signals, layer_weights, config)
