"""Counting ranks and selecting a static number of tokens: the ops every scoring method and both model families use.

Everything traces to plain ONNX ops with static shapes. Ranks are counted rather than sorted, so they are exact
and backend-independent; selection keeps the ``k`` best scores in their original order, the lower index winning on
equal scores, in eager PyTorch and in the exported graph alike (ONNX ``TopK`` returns the lower index first on
ties; eager mode uses a stable sort).
"""
from __future__ import annotations

import torch

from runtime.errors import UsageError

RANK_CHUNK = 512  # compared tokens per block when counting ranks: bounds the (B, heads, N, chunk) temporaries

# --------------------------------------------------------------------------------------------------- ranks


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _top_indices(scores: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Indices of the ``count`` largest (or smallest) scores, ties → lower index first. (B, N) → (B, count).

    Exported: ONNX ``TopK`` (documented to return the lower index first on ties). Eager: a stable sort, which
    has the same tie order. ``torch.topk`` alone promises no tie order.
    """
    if _exporting():
        return torch.topk(scores, count, dim=-1, largest=largest, sorted=True).indices
    order = torch.sort(scores, dim=-1, descending=largest, stable=True).indices
    return order[:, :count]


def stable_ranks(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank of every element along ``dim``: 0 for the lowest … n-1 for the highest, as float32.

    Exact and backend-independent: an element's rank is the number of elements below it, plus the number of equal
    elements at a lower index (a stable order, so ranks are a permutation even on ties). Computed as a stable
    ascending sort (ONNX ``TopK`` with K = n when exported: lower index first on ties, the same order) whose
    inverse permutation is the ranks (one ``ScatterElements``): O(n log n) per row and no (…, n, n) temporaries —
    on the default BLIP-2 at batch 8 the visual graph ran 1.3× faster than with the pairwise count
    (README "Speed"). :func:`counted_ranks` is the pairwise definition, kept as the tests' oracle.
    """
    last = values.dim() - 1
    dim = dim % values.dim()
    values = values.float().transpose(dim, last)  # (..., n): positive axes, so the ONNX Transpose perm is valid
    n = int(values.shape[-1])
    flat = values.reshape(-1, n)  # (rows, n)
    order = _top_indices(flat, n, largest=False)  # (rows, n): position i holds the element of rank i
    ranks_in_order = torch.arange(n, dtype=torch.float32, device=values.device).expand(flat.shape)  # (rows, n)
    ranks = torch.zeros_like(flat).scatter(1, order, ranks_in_order)  # (rows, n): the inverse permutation
    return ranks.reshape(values.shape).transpose(dim, last)


def counted_ranks(values: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`stable_ranks` by its definition — every pair compared, O(n²) memory per row; the tests' oracle."""
    last = values.dim() - 1
    dim = dim % values.dim()
    values = values.float().transpose(dim, last)  # (..., n)
    n = values.shape[-1]
    lhs = values.unsqueeze(-1)  # (..., n, 1): the element being ranked
    rhs = values.unsqueeze(-2)  # (..., 1, n): every element it is compared with
    index = torch.arange(n, device=values.device)
    lower_index = (index.view(n, 1) > index.view(1, n))  # (n, n): rhs index is lower than lhs index
    below = (rhs < lhs) | ((rhs == lhs) & lower_index)  # (..., n, n)
    ranks = below.to(torch.float32).sum(-1)  # (..., n)
    return ranks.transpose(dim, last)


def rank_bounds(values: torch.Tensor, dim: int, tie_rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks an element can take when values within ``tie_rtol`` of each other (relatively) may order either way.

    lower = #elements below it and not tied with it; upper = #other elements below it or tied with it, where
    ``a`` and ``b`` tie when ``|a - b| <= tie_rtol * max(|a|, |b|)``. ``stable_ranks`` always lies in [lower, upper].
    Relative, because softmax probabilities carry relative errors (an absolute error δ on a logit scales the
    probability by e^δ), and most of a trained model's attention probabilities are tiny. Used by parity, not
    exported: ranks are discontinuous in the values, so a float-level difference in attention probabilities can
    move a CATP vote by a whole rank.
    """
    last = values.dim() - 1
    dim = dim % values.dim()
    values = values.double().transpose(dim, last)  # (..., n)
    lhs = values.unsqueeze(-1)  # (..., n, 1): the element being ranked
    rhs = values.unsqueeze(-2)  # (..., 1, n): every element it is compared with
    tied = (rhs - lhs).abs() <= tie_rtol * torch.maximum(rhs.abs(), lhs.abs())  # (..., n, n), self included
    lower = ((rhs < lhs) & ~tied).sum(-1).double()  # (..., n)
    upper = ((rhs < lhs) | tied).sum(-1).double() - 1.0  # (..., n): minus the element itself
    return lower.transpose(dim, last), upper.transpose(dim, last)


def top_ranks(values: torch.Tensor, chunk: int = RANK_CHUNK) -> torch.Tensor:
    """Rank of every element along the last axis from the top: 0 = highest; on equal values the lower index ranks
    first. Counted (no sort, no TopK: exact, TensorRT-buildable at any N), in blocks of ``chunk`` compared
    elements. (..., N) → (..., N) float32. Cost O(N²) comparisons per row."""
    num_tokens = int(values.shape[-1])
    index = torch.arange(num_tokens, device=values.device)  # (N,)
    lhs = values.unsqueeze(-1)  # (..., N, 1): the element being ranked
    ranks = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        rhs = values[..., start:stop].unsqueeze(-2)  # (..., 1, C)
        lower_index = index[start:stop].view(1, -1) < index.view(-1, 1)  # (N, C): compared index is lower
        ahead = (rhs > lhs) | ((rhs == lhs) & lower_index)  # (..., N, C)
        ranks = ranks + ahead.to(torch.float32).sum(-1)
    return ranks



# --------------------------------------------------------------------------------------------------- selection


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Static top-k selection, kept in original order. scores (B, N) float32 → kept_indices (B, k) int64.

    TensorRT limits ``TopK`` to K ≤ 3840, so the selection runs TopK on ``min(k, N - k)`` elements: the ``k``
    best when k ≤ N/2, else the ``N - k`` worst (dropped), then builds a keep-mask and compacts it in order with a
    cumsum and a scatter. Ties: the lower index is kept.
    """
    batch = scores.shape[0]
    num_tokens = int(scores.shape[1])  # static N: a Python int, so every TopK K below is a graph constant
    if not 1 <= k <= num_tokens:
        raise UsageError(f"k must lie in [1, {num_tokens}], got {k}")
    positions = torch.arange(num_tokens, device=scores.device)  # (N,)
    if k == num_tokens:
        return positions.unsqueeze(0).expand(batch, num_tokens).clone()
    scores = scores.float()
    if k <= num_tokens - k:
        best = _top_indices(scores, k, largest=True)  # (B, k)
        keep_mask = torch.zeros_like(scores).scatter(1, best, 1.0)  # (B, N)
    else:
        # Drop the N - k worst. On ties the *higher* index must go first: flip, so TopK's lower-index-first rule
        # picks the higher original index.
        flipped = torch.flip(scores, dims=[1])
        worst = (num_tokens - 1) - _top_indices(flipped, num_tokens - k, largest=False)  # (B, N - k)
        keep_mask = torch.ones_like(scores).scatter(1, worst, 0.0)  # (B, N)
    keep = keep_mask > 0.5
    slot = torch.cumsum(keep_mask, dim=1).long() - 1  # (B, N) place of each kept token among the kept
    slot = torch.where(keep, slot, torch.full_like(slot, k))  # dropped tokens go to a spare slot k
    # a (B, N) buffer, not (B, k + 1): TensorRT's ScatterElements wants the indices no larger than the data
    kept = torch.zeros(batch, num_tokens, dtype=torch.long, device=scores.device)
    kept = kept.scatter(1, slot, positions.unsqueeze(0).expand(batch, num_tokens))  # (B, N), slots ≥ k unused
    return kept[:, :k]


def gather_tokens(tensor: torch.Tensor, kept_indices: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The kept entries along ``dim`` of a batched tensor of any rank, in the order of ``kept_indices`` (B, k):
    tokens (B, N, D) → (B, k, D) at ``dim=1``; keys (B, KV, N, Dh) → (B, KV, k, Dh) at ``dim=2``; masks at 3."""
    shape = [1] * tensor.dim()
    shape[0], shape[dim] = kept_indices.shape
    index = kept_indices.view(shape)  # (B, 1, .., k, .., 1)
    expand = list(tensor.shape)
    expand[dim] = kept_indices.shape[1]
    return torch.gather(tensor, dim, index.expand(expand))
