"""OPT decoder with an explicit KV cache, over the weights of a Hugging Face ``OPTForCausalLM``.

The whole language-model path in one readable file (nanoGPT style), with plain tensors in and out so it traces
to static-rank ONNX graphs: no ``Cache`` objects, no config-dependent Python branching at run time. It mirrors
``transformers.models.opt.modeling_opt`` operation for operation (eager attention), so its logits equal HF's;
the parity checks and tests hold it to that.

Shapes: B batch, S new tokens, P past tokens, E embedding width, D hidden width, H heads, Dh head width,
V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.models.kv_cache import attend_cached, cache_bias
from export.models.masks import additive_mask
from export.models.precision import head_logits, widen

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding shifts every position id by 2


def _layer_norm(hidden: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in float32 whatever the model's dtype (a no-op cast in an fp32 model; float64 stays)."""
    weight = widen(norm.weight) if norm.weight is not None else None
    bias = widen(norm.bias) if norm.bias is not None else None
    return F.layer_norm(widen(hidden), norm.normalized_shape, weight, bias, norm.eps).to(hidden.dtype)


def attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OPT self-attention block. hidden (B, S, D) → (B, S, D) and this call's key/value (B, H, S, Dh).

    Prefill (``cache`` None): mask (B, 1, S, S) causal + padding. Decode step (S = 1): ``cache`` is the
    preallocated (key, value), each (B, H, C, Dh), and mask its (B, 1, 1, C) bias (``export/models/kv_cache.py``).
    """
    attn = layer.self_attn
    batch, new, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    query = (attn.q_proj(hidden) * attn.scaling).view(batch, new, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    key = attn.k_proj(hidden).view(batch, new, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    value = attn.v_proj(hidden).view(batch, new, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    if cache is None:
        scores = widen(torch.matmul(query, key.transpose(-1, -2))) + mask  # (B, H, S, S) float32
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        context = torch.matmul(probs, value)  # (B, H, S, Dh)
    else:
        context = attend_cached(query, key, value, cache[0], cache[1], mask)  # (B, H, 1, Dh)
    context = context.transpose(1, 2).reshape(batch, new, heads * head_dim)  # (B, S, D)
    return attn.out_proj(context), key, value


def decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OPT decoder layer (pre- or post-LayerNorm, as the config says)."""
    residual = hidden
    if layer.do_layer_norm_before:
        hidden = _layer_norm(hidden, layer.self_attn_layer_norm)
    hidden, key, value = attention(layer, hidden, mask, cache)
    hidden = residual + hidden
    if not layer.do_layer_norm_before:
        hidden = _layer_norm(hidden, layer.self_attn_layer_norm)

    residual = hidden
    if layer.do_layer_norm_before:
        hidden = _layer_norm(hidden, layer.final_layer_norm)
    hidden = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
    hidden = residual + hidden
    if not layer.do_layer_norm_before:
        hidden = _layer_norm(hidden, layer.final_layer_norm)
    return hidden, key, value


def forward(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run new tokens through an ``OPTForCausalLM``.

    Prefill (``cache`` None): inputs_embeds (B, S, E), attention_mask (B, S), position_ids (B, S) (−1 for
    padding, as HF). Decode step: inputs_embeds (B, 1, E), position_ids (B, 1), cache per layer (key, value)
    each (B, H, C, Dh) and attention_mask (B, C) marking its filled slots.
    Returns the last position's logits (B, V) float32 and, per layer, this call's key/value (B, H, S, Dh).
    """
    decoder = lm.model.decoder
    new = inputs_embeds.shape[1]
    mask = additive_mask(attention_mask, new) if cache is None else cache_bias(attention_mask)  # (B, 1, S, S|C)
    positions = F.embedding(position_ids + POSITION_OFFSET, decoder.embed_positions.weight)  # (B, S, D)
    hidden = inputs_embeds
    if decoder.project_in is not None:
        hidden = decoder.project_in(hidden)
    hidden = hidden + positions.to(hidden.dtype)  # (B, S, D)

    present = []
    for index, layer in enumerate(decoder.layers):
        hidden, key, value = decoder_layer(layer, hidden, mask, cache[index] if cache is not None else None)
        present.append((key, value))

    last = hidden[:, -1:, :]  # (B, 1, D) with left padding the last position is real for every row
    if decoder.final_layer_norm is not None:
        last = _layer_norm(last, decoder.final_layer_norm)
    if decoder.project_out is not None:
        last = decoder.project_out(last)
    logits = head_logits(lm.lm_head, last)  # (B, V)
    return logits, present


def embed_tokens(lm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 → (B, T, E)."""
    return lm.model.decoder.embed_tokens(input_ids)


# ------------------------------------------------------------------------------------------ exportable modules


class EmbedTokens(nn.Module):
    """input_ids (B, T) → inputs_embeds (B, T, E)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self.lm, input_ids)


class Prefill(nn.Module):
    """inputs_embeds (B, S, E), attention_mask (B, S), position_ids (B, S) → logits (B, V), present k/v ×L."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, inputs_embeds, attention_mask, position_ids):
        logits, present = forward(self.lm, inputs_embeds, attention_mask, position_ids, None)
        return (logits, *[t for pair in present for t in pair])


class DecodeStep(nn.Module):
    """One greedy step over the preallocated cache: input_ids (B, 1), attention_mask (B, C) (the cache's filled
    slots), position_ids (B, 1), past k/v ×L (B, H, C, Dh) → logits (B, V), the new token's k/v ×L (B, H, 1, Dh),
    which the runtime writes into the cache's next slot."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        cache = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        inputs_embeds = embed_tokens(self.lm, input_ids)  # (B, 1, E)
        logits, new = forward(self.lm, inputs_embeds, attention_mask, position_ids, cache)
        return (logits, *[t for pair in new for t in pair])
