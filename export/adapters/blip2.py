"""BLIP-2 (OPT language model) + CATP: prune the Q-Former's output query tokens before the language model.

Graphs:
    visual   pixel_values (B, 3, H, W) → query_embeds (B, k, E), kept_indices (B, k) int64, scores (B, Q) float32
    embed    input_ids (B, T) → inputs_embeds (B, T, E)
    prefill  inputs_embeds (B, S, E), attention_mask (B, S), position_ids (B, S) → logits (B, V), present.* (B, H, S, Dh)
    decode   input_ids (B, 1), attention_mask (B, C), position_ids (B, 1), past.* (B, H, C, Dh): the preallocated
             cache and its filled slots → logits (B, V), new.* (B, H, 1, Dh) (written into the cache's next slot)
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from export import pruning
from export.adapters.base import GraphExport, ModelAdapter, pixel_settings, processor_image_size, text_model_settings, token_settings
from export.adapters.registry import register
from export.models import opt
from export.models.kv_cache import cache_names
from export.pruning import PruningConfig, Signals
from export.selection import gather_tokens, select_top_k
from runtime.contract import ResolvedPruning
from runtime.errors import CheckpointError, UsageError


@contextmanager
def capture_attention_probs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the attention probabilities (second output, eager attention) of ``modules`` during a forward."""
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(slot: int):
        def hook(module, args, output):
            probs = output[1] if isinstance(output, tuple) else None
            if probs is None:
                raise CheckpointError("attention probabilities are missing: the model must use eager attention")
            captured[slot] = probs

        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        yield captured  # type: ignore[misc]
    finally:
        for handle in handles:
            handle.remove()


class PrunedVisual(nn.Module):
    """Vision encoder → Q-Former → score the Q queries → keep k (in order) → language projection."""

    def __init__(self, model: nn.Module, settings: ResolvedPruning):
        super().__init__()
        self.model = model
        self.settings = settings  # method, image_importance, seed, layer_weights, k
        layers = model.qformer.encoder.layer
        self.cross_modules = [layer.crossattention.attention for layer in layers if layer.has_cross_attention]
        self.self_modules = [layer.attention.attention for layer in layers]
        self.vision_last = model.vision_model.encoder.layers[-1].self_attn

    def signals(self, pixel_values: torch.Tensor) -> Signals:
        """Run vision encoder + Q-Former, capturing what the scoring methods read."""
        model = self.model
        watched = self.cross_modules + self.self_modules + [self.vision_last]
        with capture_attention_probs(watched) as probs:
            image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P, Dv)
            query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)  # (B, P) as HF
            query_output = model.qformer(
                query_embeds=query_tokens, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
            ).last_hidden_state  # (B, Q, Dq) float32: HF keeps the Q-Former in fp32
        num_cross = len(self.cross_modules)
        return Signals(
            tokens=query_output,
            cross_attentions=probs[:num_cross],  # each (B, heads, Q, P)
            self_attentions=probs[num_cross:-1],  # each (B, heads, Q, Q)
            vision_attention=probs[-1],  # (B, heads, P, P)
        )

    def forward(self, pixel_values: torch.Tensor):
        signals = self.signals(pixel_values)
        scores = pruning.score_tokens(signals, self.settings.layer_weights, self.settings)  # (B, Q) float32
        kept_indices = select_top_k(scores, self.settings.k)  # (B, k) ascending
        kept_tokens = gather_tokens(signals.tokens, kept_indices)  # (B, k, Dq)
        projection = self.model.language_projection
        query_embeds = projection(kept_tokens.to(projection.weight.dtype))  # (B, k, E)
        return query_embeds, kept_indices, scores

    @torch.no_grad()
    def score_bounds(self, pixel_values: torch.Tensor, tie_rtol: float):
        """(lower, upper) scores reachable under float-level differences (parity), or None for continuous methods."""
        return pruning.score_bounds(self.signals(pixel_values), self.settings.layer_weights, self.settings, tie_rtol)


@register
class Blip2OptAdapter(ModelAdapter):
    name = "blip2-opt"
    architectures = ("Blip2ForConditionalGeneration",)
    methods = tuple(pruning.METHODS)
    default_method = "catp"
    unpruned_method = "first-k"
    default_prompt_template = "Question: {} Answer:"
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")

    def __init__(self, path: str | Path, precision: str = "fp32"):
        super().__init__(path, precision)
        from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration

        config = Blip2Config.from_pretrained(self.path)
        text_type = getattr(config.text_config, "model_type", None)
        if text_type != "opt" or not config.use_decoder_only_language_model:
            raise CheckpointError(
                f"{self.path}: BLIP-2 with a {text_type!r} language model is not supported; this adapter exports OPT"
            )
        self.check_checkpoint_files()
        self.processor = AutoProcessor.from_pretrained(self.path)
        # Loaded in the target precision: no fp32 copy of the whole model is ever held for an fp16 build. As HF runs
        # BLIP-2 in half precision: vision, projection and LM in fp16, the Q-Former and its query tokens in fp32
        # (HF's ``_keep_in_fp32_modules``; checked below). The OPT path computes LayerNorm and softmax in fp32 itself.
        dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = Blip2ForConditionalGeneration.from_pretrained(
            self.path, attn_implementation="eager", dtype=dtype
        ).eval()
        if self.model.qformer.dtype != torch.float32 or self.model.query_tokens.dtype != torch.float32:
            raise CheckpointError(f"{self.path}: transformers loaded the Q-Former in {self.model.qformer.dtype}; "
                                  "the exporter needs it in fp32 (HF's _keep_in_fp32_modules)")
        self.config = self.model.config

    # ------------------------------------------------------------------ facts
    @property
    def num_queries(self) -> int:
        return int(self.config.num_query_tokens)

    @property
    def num_visual_tokens(self) -> int:
        return self.num_queries  # the Q-Former's output queries are what is pruned

    @property
    def num_cross_layers(self) -> int:
        return sum(1 for layer in self.model.qformer.encoder.layer if layer.has_cross_attention)

    def model_info(self) -> dict[str, Any]:
        return {
            **self.checkpoint_info(),
            "num_query_tokens": self.num_queries,
            "cross_attention_layers": self.num_cross_layers,
            "image_size": int(self.config.vision_config.image_size),
        }

    @classmethod
    def check_options(cls, config: PruningConfig, positions: str) -> None:
        super().check_options(config, positions)
        if config.trim_first_layer:
            raise UsageError("--trim-first-layer is a Trimmed-Llama (LLaMA-3.2-Vision) option; BLIP-2 has no cross-attention cache")

    def family_settings(self, config: PruningConfig) -> dict[str, Any]:
        return {
            "what": "Q-Former output query tokens",
            "layer_weights_preset": config.layer_weights,
            "layer_weights": pruning.parse_layer_weights(config.layer_weights, self.num_cross_layers),
            "image_importance": bool(config.image_importance),
        }

    # ------------------------------------------------------------------ graphs
    def graphs(self, settings: ResolvedPruning) -> list[GraphExport]:
        lm = self.model.language_model
        lm_config = self.config.text_config
        num_layers, heads = lm_config.num_hidden_layers, lm_config.num_attention_heads
        head_dim = lm_config.hidden_size // heads
        float_dtype = lm.dtype
        image_size = int(self.config.vision_config.image_size)
        batch, text, past = 2, 3, 5  # trace with non-degenerate sizes so nothing specialises to 1
        present = cache_names(range(num_layers), "present")
        past_names = cache_names(range(num_layers), "past")
        new_names = cache_names(range(num_layers), "new")
        embed_dim = lm.get_input_embeddings().embedding_dim

        visual = GraphExport(
            name="visual",
            module=PrunedVisual(self.model, settings),
            args=(torch.randn(batch, 3, image_size, image_size),),
            input_names=["pixel_values"],
            output_names=["query_embeds", "kept_indices", "scores"],
            dynamic_axes={name: {0: "batch"} for name in ("pixel_values", "query_embeds", "kept_indices", "scores")},
        )
        embed = GraphExport(
            name="embed",
            module=opt.EmbedTokens(lm),
            args=(torch.randint(0, lm_config.vocab_size, (batch, text)),),
            input_names=["input_ids"],
            output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch", 1: "text_len"}, "inputs_embeds": {0: "batch", 1: "text_len"}},
        )
        seq = settings.k + text
        prefill = GraphExport(
            name="prefill",
            module=opt.Prefill(lm),
            args=(
                torch.randn(batch, seq, embed_dim, dtype=float_dtype),
                torch.ones(batch, seq, dtype=torch.long),
                torch.arange(seq).repeat(batch, 1),
            ),
            input_names=["inputs_embeds", "attention_mask", "position_ids"],
            output_names=["logits", *present],
            dynamic_axes={
                "inputs_embeds": {0: "batch", 1: "prefill_len"},
                "attention_mask": {0: "batch", 1: "prefill_len"},
                "position_ids": {0: "batch", 1: "prefill_len"},
                "logits": {0: "batch"},
                **{name: {0: "batch", 2: "prefill_len"} for name in present},
            },
        )
        decode = GraphExport(
            name="decode",
            module=opt.DecodeStep(lm),
            args=(
                torch.randint(0, lm_config.vocab_size, (batch, 1)),
                torch.ones(batch, past, dtype=torch.long),
                torch.full((batch, 1), past),
                *[torch.randn(batch, heads, past, head_dim, dtype=float_dtype) for _ in past_names],
            ),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *new_names],
            dynamic_axes={
                "input_ids": {0: "batch"},
                "attention_mask": {0: "batch", 1: "past_len"},
                "position_ids": {0: "batch"},
                "logits": {0: "batch"},
                **{name: {0: "batch", 2: "past_len"} for name in past_names},
                **{name: {0: "batch"} for name in new_names},
            },
        )
        return [visual, embed, prefill, decode]

    # ------------------------------------------------------------------ runtime settings
    def preprocess_settings(self) -> dict[str, Any]:
        image_processor = self.processor.image_processor
        return {
            "kind": "blip",
            "size": list(processor_image_size(image_processor)),
            "do_resize": bool(image_processor.do_resize),
            **pixel_settings(image_processor),
        }

    def text_settings(self, prompt_template: str | None) -> dict[str, Any]:
        return {
            **token_settings(self.processor.tokenizer, self.model.generation_config, self.config.text_config),
            "prompt_template": prompt_template or self.default_prompt_template,
            "image_token_id": int(self.config.image_token_id),
        }

    def language_model_settings(self) -> dict[str, Any]:
        return {"type": "opt", **text_model_settings(self.config.text_config)}
