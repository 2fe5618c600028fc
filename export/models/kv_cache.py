"""The decode step's attention over a preallocated, static-length KV cache (gpt-fast's ``KVCache`` model).

The runtime allocates one ``(B, KV, C, Dh)`` buffer per self-attention layer's key and value for a whole request
(``C`` = prompt width + new tokens), fills the first ``T`` slots from the prefill and then writes each new token's
key/value into the next slot, in place. The decode graph therefore takes the whole buffer, whatever is filled,
plus a ``(B, C)`` mask of the filled slots, and returns only the new token's key/value ``(B, KV, 1, Dh)``: no
concatenation, no cache copy, one static shape per request (what TensorRT wants).

The new token attends to the filled slots and to itself. Its own score is computed apart and joined to the
cache's before the softmax, so the softmax and the weighted sum run over exactly the keys the unpruned HF model
attends to (the cache's empty slots get the mask's minimum, whose exponential is an exact 0).

Tensor names, one pair per layer ``i`` (the decoder layer's index): a prefill returns ``present.{i}.key|value``
(the prompt's, which fill the cache's first slots); a decode step takes the cache as ``past.{i}.key|value`` and
returns ``new.{i}.key|value``; Mllama's trimmed cross-attention keys/values are ``cross.{i}.key|value``.
"""
from __future__ import annotations

from typing import Iterable

import torch

from export.models.precision import widen

MASK_MIN = torch.finfo(torch.float32).min


def cache_names(layers: Iterable[int], prefix: str) -> list[str]:
    """``past.0.key, past.0.value, past.1.key, …`` for ``layers``, with ``prefix`` present / past / new / cross."""
    return [f"{prefix}.{i}.{part}" for i in layers for part in ("key", "value")]


def cache_bias(cache_mask: torch.Tensor) -> torch.Tensor:
    """cache_mask (B, C) 1 for filled slots → additive float32 bias (B, 1, 1, C): 0 where attended, min elsewhere."""
    bias = torch.zeros(cache_mask.shape, dtype=torch.float32, device=cache_mask.device)
    return bias.masked_fill(cache_mask == 0, MASK_MIN)[:, None, None, :]  # (B, 1, 1, C)


def attend_cached(
    query: torch.Tensor,
    new_key: torch.Tensor,
    new_value: torch.Tensor,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    bias: torch.Tensor,
    scaling: float = 1.0,
) -> torch.Tensor:
    """One new token's attention. query (B, H, 1, Dh); new_key/new_value (B, H, 1, Dh); cache_key/cache_value
    (B, H, C, Dh) (heads already repeated for GQA); bias (B, 1, 1, C) → context (B, H, 1, Dh).

    Scores are summed with the bias in float32 (a no-op cast in fp32 models; float64 stays float64), the softmax
    runs there, and the probabilities go back to the value dtype for the weighted sum, as HF's eager attention.
    """
    cached = widen(torch.matmul(query, cache_key.transpose(-1, -2)) * scaling) + bias  # (B, H, 1, C)
    own = widen(torch.matmul(query, new_key.transpose(-1, -2)) * scaling)  # (B, H, 1, 1)
    probs = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1).to(new_value.dtype)  # (B, H, 1, C+1)
    slots = cache_key.shape[2]
    return torch.matmul(probs[..., :slots], cache_value) + probs[..., slots:] * new_value  # (B, H, 1, Dh)
