"""Compute dtypes of the explicit decoders: at least float32.

The graphs compute LayerNorm, attention scores, softmax and logits in float32 whatever the model's dtype (fp16
graphs included). The float64 reference that parity runs to measure fp32 rounding noise must not be cut back to
float32 there, so these helpers keep float64 as float64 and widen everything else to float32 — for fp32 and fp16
models (what gets traced) they are exactly ``tensor.float()`` and ``torch.float32``.
"""
from __future__ import annotations

import torch


def wide_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for a float64 tensor, else float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in :func:`wide_dtype` (``tensor.float()`` unless it is float64)."""
    return tensor.to(wide_dtype(tensor))
