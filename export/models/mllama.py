"""Mllama (LLaMA-3.2-Vision) text decoder with trimmed cross-attention keys/values, over HF weights.

The whole language-model path in one readable file (nanoGPT style): self-attention layers with RoPE and an
explicit KV cache, cross-attention layers whose keys/values come from the visual tokens, and the Trimmed-Llama
step — at the **first** cross-attention layer of the prefill, the text→image attention scores every visual
token, the top ``k`` are kept (in order), and every later cross-attention layer builds its keys/values from the
kept tokens only (``shared/papers.md``). Plain tensors in and out, so it traces to static-rank ONNX graphs.

It mirrors ``transformers.models.mllama.modeling_mllama`` (eager attention) operation for operation; at ratio 0
its greedy tokens equal ``MllamaForConditionalGeneration.generate`` (tests and parity hold it to that).

Shapes: B batch, T prompt tokens, S new tokens, P past tokens, N visual tokens (images × tiles × tokens per
tile), k kept visual tokens, D hidden width, H query heads, KV key/value heads, Dh head width, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from export import pruning
from export.models.kv_cache import attend_cached, cache_bias, cache_names
from export.models.masks import additive_mask
from export.models.precision import head_logits, wide_dtype
from export.selection import gather_tokens
from runtime.errors import CheckpointError

MASK_MIN = torch.finfo(torch.float32).min


# ------------------------------------------------------------------------------------------------ masks


def cross_mask(cross_attention_mask: torch.Tensor, tokens_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``_prepare_cross_attention_mask``: per-tile 0/1 mask → additive per-token mask + text-row mask.

    cross_attention_mask (B, T, images, tiles) int → mask (B, 1, T, N) float32 (0 allowed, min blocked; rows that
    may see no image become all-zero, as in HF), row_mask (B, 1, T, 1) float32 (1 where the row sees an image).
    """
    batch, text = cross_attention_mask.shape[:2]
    per_token = cross_attention_mask.repeat_interleave(tokens_per_tile, dim=3).reshape(batch, text, -1)  # (B, T, N)
    blocked = (1 - per_token).to(torch.float32).unsqueeze(1)  # (B, 1, T, N) 1 = blocked
    mask = blocked.masked_fill(blocked.bool(), MASK_MIN)  # (B, 1, T, N)
    row_mask = (mask != MASK_MIN).any(dim=-1, keepdim=True).to(torch.float32)  # (B, 1, T, 1)
    return mask * row_mask, row_mask


# ------------------------------------------------------------------------------------------------ blocks


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, L, Dh) → (B, KV·groups, L, Dh), each key/value head repeated for its query heads (GQA)."""
    if groups == 1:
        return states
    batch, kv_heads, length, head_dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, kv_heads * groups, length, head_dim)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float):
    """Eager attention. query (B, H, S, Dh), key/value (B, KV, L, Dh), mask (B, 1, S, L) → context (B, S, H·Dh),
    probabilities (B, H, S, L) float32."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, L, Dh)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + mask  # (B, H, S, L)
    probs = torch.softmax(scores, dim=-1, dtype=wide_dtype(scores))  # (B, H, S, L)
    context = torch.matmul(probs.to(value.dtype), value)  # (B, H, S, Dh)
    batch, heads, new, head_dim = context.shape
    return context.transpose(1, 2).reshape(batch, new, heads * head_dim), probs


def self_attention_layer(layer, hidden, rope, mask, cache=None):
    """One self-attention decoder layer. hidden (B, S, D) → (B, S, D) and this call's key/value (B, KV, S, Dh).

    Prefill (``cache`` None): mask (B, 1, S, S). Decode step (S = 1): ``cache`` the preallocated (key, value) each
    (B, KV, C, Dh), mask its (B, 1, 1, C) bias (``export/models/kv_cache.py``).
    """
    attn = layer.self_attn
    batch, new, _ = hidden.shape
    heads, kv_heads, head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    residual = hidden
    hidden = layer.input_layernorm(hidden)
    query = attn.q_proj(hidden).view(batch, new, heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
    key = attn.k_proj(hidden).view(batch, new, kv_heads, head_dim).transpose(1, 2)  # (B, KV, S, Dh)
    value = attn.v_proj(hidden).view(batch, new, kv_heads, head_dim).transpose(1, 2)  # (B, KV, S, Dh)
    cos, sin = rope  # (B, S, Dh) each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    if cache is None:
        context, _ = attend(query, key, value, mask, attn.scaling)  # (B, S, H·Dh)
    else:
        groups = heads // kv_heads
        context = attend_cached(query, repeat_kv(key, groups), repeat_kv(value, groups), repeat_kv(cache[0], groups),
                                repeat_kv(cache[1], groups), mask, attn.scaling)  # (B, H, 1, Dh)
        context = context.transpose(1, 2).reshape(batch, new, heads * head_dim)  # (B, 1, H·Dh)
    hidden = residual + attn.o_proj(context)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, key, value


def cross_key_value(layer, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of a cross-attention layer. states (B, L, D) → key, value (B, KV, L, Dh) (key after k_norm)."""
    attn = layer.cross_attn
    batch, length, _ = states.shape
    kv_heads, head_dim = attn.num_key_value_heads, attn.head_dim
    key = attn.k_proj(states).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, KV, L, Dh)
    value = attn.v_proj(states).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, KV, L, Dh)
    return attn.k_norm(key), value


def cross_attention_layer(layer, hidden, key, value, mask, row_mask):
    """One cross-attention decoder layer over cached keys/values.

    hidden (B, S, D), key/value (B, KV, L, Dh), mask (B, 1, S, L), row_mask (B, 1, S, 1) → hidden (B, S, D),
    probabilities (B, H, S, L). As HF: the attention branch is not row-masked, the MLP branch is.
    """
    attn = layer.cross_attn
    batch, new, _ = hidden.shape
    residual = hidden
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed).view(batch, new, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, S, Dh)
    query = attn.q_norm(query)
    context, probs = attend(query, key, value, mask, attn.scaling)
    hidden = residual + layer.cross_attn_attn_gate.tanh() * attn.o_proj(context)
    mlp = layer.mlp(layer.post_attention_layernorm(hidden))  # (B, S, D)
    mlp = mlp * row_mask[:, 0].to(mlp.dtype)
    return hidden + layer.cross_attn_mlp_gate.tanh() * mlp, probs


# ------------------------------------------------------------------------------------------------ model


class _Text(nn.Module):
    """Shared plumbing over HF's MllamaForConditionalGeneration."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        config = model.config.text_config
        self.cross_layers = list(config.cross_attention_layers)
        self.self_layers = [i for i in range(config.num_hidden_layers) if i not in self.cross_layers]
        self.tokens_per_tile = int(model.model.vision_model.num_patches)

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.text.rotary_emb(hidden, position_ids)  # cos, sin (B, S, Dh)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.text.norm(hidden[:, -1:])  # (B, 1, D): only the last position is needed
        return head_logits(self.lm_head, hidden)  # (B, V)


class TrimmedPrefill(_Text):
    """Prefill with trimming at the first cross-attention layer.

    inputs: input_ids (B, T), attention_mask (B, T), position_ids (B, T), cross_attention_states (B, N, D),
    cross_attention_mask (B, T, images, tiles).
    outputs: logits (B, V); ``present.{i}.key|value`` (B, KV, T, Dh) per self-attention layer;
    ``cross.{i}.key|value`` (B, KV, L_i, Dh) per cross-attention layer (L = k, or N for the first layer unless
    ``trim_first_layer``); ``cross_mask_full`` (B, N) and ``cross_mask_kept`` (B, k): the last prompt row's additive
    cross mask (decode steps reuse it, as HF's generate does), ``text_row_mask`` (B, 1); ``kept_indices`` (B, k)
    ascending; ``scores`` (B, N) float32.
    """

    def __init__(self, model: nn.Module, score: pruning.TrimScoreFn, k: int, trim_first_layer: bool, method: str = ""):
        super().__init__(model)
        self.score, self.k, self.trim_first_layer, self.method = score, k, trim_first_layer, method
        self.output_names = ["logits", *cache_names(self.self_layers, "present"), *cache_names(self.cross_layers, "cross"),
                             "cross_mask_full", "cross_mask_kept", "text_row_mask", "kept_indices", "scores"]

    def signals(self, input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask):
        """Run up to and including the first cross-attention layer's attention: what the scoring reads."""
        return self._run(input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask, stop_at_scores=True)

    @torch.no_grad()
    def score_bounds(self, input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask, tie_rtol: float):
        """(lower, upper) scores reachable under float-level differences, for rank-count methods; else None."""
        bounds = pruning.TRIM_SCORE_BOUNDS.get(self.method)  # rank-count methods: parity compares against bounds
        if bounds is None:
            return None
        probs, row_weights, _ = self.signals(input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask)
        return bounds(probs, row_weights, tie_rtol)

    def forward(self, input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask):
        outputs = self._run(input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask)
        return tuple(outputs[name] for name in self.output_names)

    def _run(self, input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask, stop_at_scores=False):
        text = self.text
        hidden = text.embed_tokens(input_ids)  # (B, T, D)
        rope = self.rope(hidden, position_ids)
        self_mask = additive_mask(attention_mask, input_ids.shape[1])  # (B, 1, T, T)
        full_mask, row_mask = cross_mask(cross_attention_mask, self.tokens_per_tile)  # (B, 1, T, N), (B, 1, T, 1)
        states = cross_attention_states.to(hidden.dtype)  # (B, N, D)
        outputs: dict[str, torch.Tensor] = {}
        kept_indices = scores = kept_mask = None
        for index, layer in enumerate(text.layers):
            if index in self.self_layers:
                hidden, key, value = self_attention_layer(layer, hidden, rope, self_mask)
                outputs[f"present.{index}.key"], outputs[f"present.{index}.value"] = key, value
                continue
            if kept_indices is None:  # the first cross-attention layer: score, select, then attend
                key, value = cross_key_value(layer, states)  # (B, KV, N, Dh)
                attended, probs = cross_attention_layer(layer, hidden, key, value, full_mask, row_mask)  # (B, H, T, N)
                # text rows that see no image, and padding, do not vote
                row_weights = row_mask[:, 0, :, 0] * attention_mask.to(torch.float32)  # (B, T)
                if stop_at_scores:
                    return probs, row_weights, states
                scores = self.score(probs, row_weights, states)  # (B, N) float32
                kept_indices = pruning.select_top_k(scores, self.k)  # (B, k) ascending
                kept_mask = gather_tokens(full_mask, kept_indices, dim=3)  # (B, 1, T, k)
                if self.trim_first_layer:
                    key, value = gather_tokens(key, kept_indices, 2), gather_tokens(value, kept_indices, 2)  # (B, KV, k, Dh)
                    hidden, _ = cross_attention_layer(layer, hidden, key, value, kept_mask, row_mask)
                else:  # the layer attends every token: the pass that scored them is its output (computed once)
                    hidden = attended
            else:
                kept_states = gather_tokens(states, kept_indices, dim=1)  # (B, k, D)
                key, value = cross_key_value(layer, kept_states)  # (B, KV, k, Dh)
                hidden, _ = cross_attention_layer(layer, hidden, key, value, kept_mask, row_mask)
            outputs[f"cross.{index}.key"], outputs[f"cross.{index}.value"] = key, value
        if kept_indices is None or kept_mask is None or scores is None:
            raise CheckpointError("the language model has no cross-attention layer: there is nothing to trim")
        return {
            "logits": self.logits(hidden),
            **outputs,
            "cross_mask_full": full_mask[:, 0, -1],  # (B, N) the last prompt row
            "cross_mask_kept": kept_mask[:, 0, -1],  # (B, k)
            "text_row_mask": row_mask[:, 0, -1],  # (B, 1)
            "kept_indices": kept_indices,
            "scores": scores,
        }


class DecodeStep(_Text):
    """One greedy step over the self-attention cache and the (trimmed) cross-attention keys/values.

    inputs: input_ids (B, 1), attention_mask (B, C) (the cache's filled slots), position_ids (B, 1),
    ``past.{i}.key|value`` (B, KV, C, Dh) (the preallocated cache), ``cross.{i}.key|value``, cross_mask_full (B, N),
    cross_mask_kept (B, k), text_row_mask (B, 1).
    outputs: logits (B, V), ``new.{i}.key|value`` (B, KV, 1, Dh), which the runtime writes into the cache's next slot.
    """

    def __init__(self, model: nn.Module, trim_first_layer: bool):
        super().__init__(model)
        self.trim_first_layer = trim_first_layer
        masks = ["cross_mask_kept", "text_row_mask"] if trim_first_layer else ["cross_mask_full", "cross_mask_kept", "text_row_mask"]
        self.input_names = ["input_ids", "attention_mask", "position_ids", *masks,
                            *cache_names(self.self_layers, "past"), *cache_names(self.cross_layers, "cross")]
        self.output_names = ["logits", *cache_names(self.self_layers, "new")]

    def forward(self, *inputs):
        named = dict(zip(self.input_names, inputs))
        input_ids, attention_mask, position_ids = named["input_ids"], named["attention_mask"], named["position_ids"]
        cross_mask_full, cross_mask_kept, text_row_mask = named.get("cross_mask_full"), named["cross_mask_kept"], named["text_row_mask"]
        text = self.text
        hidden = text.embed_tokens(input_ids)  # (B, 1, D)
        rope = self.rope(hidden, position_ids)
        self_mask = cache_bias(attention_mask)  # (B, 1, 1, C)
        row_mask = text_row_mask[:, None, :, None]  # (B, 1, 1, 1)
        outputs = {}
        for index, layer in enumerate(text.layers):
            if index in self.self_layers:
                cache = named[f"past.{index}.key"], named[f"past.{index}.value"]
                hidden, key, value = self_attention_layer(layer, hidden, rope, self_mask, cache)
                outputs[f"new.{index}.key"], outputs[f"new.{index}.value"] = key, value
                continue
            full = index == self.cross_layers[0] and not self.trim_first_layer
            mask = (cross_mask_full if full else cross_mask_kept)[:, None, None, :]  # (B, 1, 1, L)
            hidden, _ = cross_attention_layer(layer, hidden, named[f"cross.{index}.key"], named[f"cross.{index}.value"], mask, row_mask)
        outputs["logits"] = self.logits(hidden)
        return tuple(outputs[name] for name in self.output_names)


class VisionEncoder(nn.Module):
    """pixel_values (B, images, tiles, 3, H, W), aspect_ratio_ids (B, images), aspect_ratio_mask (B, images, tiles)
    → cross_attention_states (B, N, D), N = images × tiles × tokens per tile (padded tiles included, as HF)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        inner = self.model.model
        vision = inner.vision_model(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
        ).last_hidden_state  # (B, images, tiles, tokens, Dv)
        projected = inner.multi_modal_projector(vision)  # (B, images, tiles, tokens, D)
        return projected.reshape(pixel_values.shape[0], -1, projected.shape[-1])  # (B, N, D)
