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

from export.models.masks import additive_mask
from export.models.precision import widen

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
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OPT self-attention block. hidden (B, S, D) → (B, S, D), present key/value (B, H, P+S, Dh)."""
    attn = layer.self_attn
    batch, new, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    query = (attn.q_proj(hidden) * attn.scaling).view(batch, new, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    key = attn.k_proj(hidden).view(batch, new, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    value = attn.v_proj(hidden).view(batch, new, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    if past_key is not None:
        key = torch.cat([past_key, key], dim=2)  # (B, H, P+S, Dh)
        value = torch.cat([past_value, value], dim=2)
    scores = widen(torch.matmul(query, key.transpose(-1, -2))) + mask  # (B, H, S, P+S) float32
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    context = torch.matmul(probs, value)  # (B, H, S, Dh)
    context = context.transpose(1, 2).reshape(batch, new, heads * head_dim)  # (B, S, D)
    return attn.out_proj(context), key, value


def decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OPT decoder layer (pre- or post-LayerNorm, as the config says)."""
    residual = hidden
    if layer.do_layer_norm_before:
        hidden = _layer_norm(hidden, layer.self_attn_layer_norm)
    hidden, key, value = attention(layer, hidden, mask, past_key, past_value)
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
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``S`` new tokens through an ``OPTForCausalLM``.

    inputs_embeds (B, S, E); attention_mask (B, P+S); position_ids (B, S) (−1 for padding, as HF);
    past: per layer (key, value) each (B, H, P, Dh), or None for a prefill.
    Returns the last position's logits (B, V) float32 and the present cache, per layer (B, H, P+S, Dh).
    """
    decoder = lm.model.decoder
    new = inputs_embeds.shape[1]
    mask = additive_mask(attention_mask, new)  # (B, 1, S, P+S)
    positions = F.embedding(position_ids + POSITION_OFFSET, decoder.embed_positions.weight)  # (B, S, D)
    hidden = inputs_embeds
    if decoder.project_in is not None:
        hidden = decoder.project_in(hidden)
    hidden = hidden + positions.to(hidden.dtype)  # (B, S, D)

    present = []
    for index, layer in enumerate(decoder.layers):
        past_key, past_value = past[index] if past is not None else (None, None)
        hidden, key, value = decoder_layer(layer, hidden, mask, past_key, past_value)
        present.append((key, value))

    last = hidden[:, -1:, :]  # (B, 1, D) with left padding the last position is real for every row
    if decoder.final_layer_norm is not None:
        last = _layer_norm(last, decoder.final_layer_norm)
    if decoder.project_out is not None:
        last = decoder.project_out(last)
    logits = widen(lm.lm_head(last)[:, 0, :])  # (B, V)
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
    """input_ids (B, 1), attention_mask (B, P+1), position_ids (B, 1), past k/v ×L (B, H, P, Dh)
    → logits (B, V), present k/v ×L (B, H, P+1, Dh)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        inputs_embeds = embed_tokens(self.lm, input_ids)  # (B, 1, E)
        logits, present = forward(self.lm, inputs_embeds, attention_mask, position_ids, past)
        return (logits, *[t for pair in present for t in pair])
