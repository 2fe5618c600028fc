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


def head_logits(head: torch.nn.Linear, last: torch.Tensor) -> torch.Tensor:
    """The language-model head on the last position: last (B, 1, D) → logits (B, V) in :func:`wide_dtype`.

    Written as a 2-D ``linear`` with a bias (zeros when the head has none: adding 0.0 changes no value) so that the
    TorchScript exporter emits ``Gemm(transB=1)`` over the (V, D) weight itself, not a ``MatMul`` over a transposed
    copy folded into a second initializer: a head tied to the token embedding then stays one tensor on disk
    (``export/weights.py`` stores every tensor once), and one buffer under ONNX Runtime shared initializers.
    """
    hidden = last[:, 0, :]  # (B, D)
    bias = head.bias if head.bias is not None else torch.zeros(head.weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    return widen(torch.nn.functional.linear(hidden, head.weight, bias))  # (B, V)
