"""Attention masks shared by the explicit decoders (OPT, Mllama)."""
from __future__ import annotations

import torch


def additive_mask(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Causal + padding mask as an additive float32 bias.

    attention_mask: (B, P + S) 1 for real tokens, 0 for padding → (B, 1, S, P + S): 0 where query ``i`` (at
    absolute index P + i) may attend key ``j`` (j ≤ P + i and key j is not padding), a large negative elsewhere.
    """
    total = attention_mask.shape[1]
    key_index = torch.arange(total, device=attention_mask.device)  # (P+S,)
    query_index = key_index[total - num_new :]  # (S,) absolute index of the new tokens
    causal = key_index.view(1, -1) <= query_index.view(-1, 1)  # (S, P+S)
    allowed = causal.unsqueeze(0) & (attention_mask.unsqueeze(1) > 0)  # (B, S, P+S)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=attention_mask.device)
    bias = bias.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return bias.unsqueeze(1)  # (B, 1, S, P+S)
