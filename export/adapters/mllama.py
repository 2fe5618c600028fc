"""LLaMA-3.2-Vision (``MllamaForConditionalGeneration``) + Trimmed Llama: the adapter.

Graphs (static ``k``, dynamic batch; one image per prompt):

    vision   pixel_values (B,1,tiles,3,H,W), aspect_ratio_ids (B,1), aspect_ratio_mask (B,1,tiles)
             → cross_attention_states (B,N,D)                                  N = tiles × tokens per tile
    prefill  input_ids, attention_mask, position_ids (B,T), cross_attention_states, cross_attention_mask (B,T,1,tiles)
             → logits (B,V), present.{i}.key|value (self layers), cross.{i}.key|value (cross layers: k tokens, the
               first one N unless --trim-first-layer), cross_mask_full (B,N), cross_mask_kept (B,k),
               text_row_mask (B,1), kept_indices (B,k), scores (B,N)
    decode   input_ids (B,1), attention_mask (B,C), position_ids (B,1), the masks, past.* (the preallocated
             self-attention cache, C slots) and cross.* → logits (B,V), new.* (B,KV,1,Dh) for the cache's next slot
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from export import pruning
from export.defaults import DEFAULT_LAYER_WEIGHTS
from export.adapters.base import GraphExport, ModelAdapter, pixel_settings, processor_image_size, text_model_settings, token_settings
from export.adapters.registry import register
from export.models import mllama
from export.models.kv_cache import cache_names
from export.pruning import PruningConfig
from runtime.contract import ResolvedPruning
from runtime.errors import CheckpointError, UsageError

DEFAULT_PROMPT = "<|image|>Question: {} Answer:"


@register
class MllamaAdapter(ModelAdapter):
    name = "mllama"
    architectures = ("MllamaForConditionalGeneration",)
    methods = pruning.TRIM_METHODS
    default_method = "trim-sum"
    unpruned_method = "uniform"  # a graph constant: at k = N every token, in order
    default_prompt_template = DEFAULT_PROMPT
    tokenizer_note = " (the runtime needs the fast tokenizer)"

    def __init__(self, path: str | Path, precision: str = "fp32"):
        super().__init__(path, precision)
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        self.check_checkpoint_files()
        self.processor = AutoProcessor.from_pretrained(self.path)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = MllamaForConditionalGeneration.from_pretrained(self.path, attn_implementation="eager", dtype=dtype).eval()
        self.config = self.model.config

    # ------------------------------------------------------------------ facts
    @property
    def tokens_per_tile(self) -> int:
        return int(self.model.model.vision_model.num_patches)

    @property
    def max_tiles(self) -> int:
        """Tiles per image: the vision model's ``max_num_tiles``, which the processor must produce (HF's vision
        tower adds a per-tile embedding for exactly that many)."""
        tiles = int(self.config.vision_config.max_num_tiles)
        made = int(self.processor.image_processor.max_image_tiles)
        if made != tiles:
            raise CheckpointError(f"{self.path}: the processor makes {made} tiles per image but the vision model takes "
                                  f"{tiles} (max_image_tiles vs max_num_tiles); HF cannot run this checkpoint either")
        return tiles

    @property
    def num_visual_tokens(self) -> int:
        return self.max_tiles * self.tokens_per_tile  # one image per prompt

    def model_info(self) -> dict[str, Any]:
        text = self.config.text_config
        return {
            **self.checkpoint_info(),
            "cross_attention_layers": [int(i) for i in text.cross_attention_layers],
            "tile_size": int(self.config.vision_config.image_size),
            "max_num_tiles": self.max_tiles,
            "tokens_per_tile": self.tokens_per_tile,
        }

    @classmethod
    def check_options(cls, config: PruningConfig, positions: str) -> None:
        super().check_options(config, positions)
        if config.layer_weights != DEFAULT_LAYER_WEIGHTS or config.image_importance:
            raise UsageError("--layer-weights and --image-importance are CATP (BLIP-2) options; LLaMA-3.2-Vision scores at the first cross-attention layer")
        if positions != "original":
            raise UsageError("--positions applies to BLIP-2 only: Mllama's visual tokens are cross-attention keys and have no positions")

    def family_settings(self, config: PruningConfig) -> dict[str, Any]:
        return {
            "what": "cross_attention_states tokens (one image: tiles × tokens per tile, padded tiles included)",
            "images_per_prompt": 1,
            "max_num_tiles": self.max_tiles,
            "tokens_per_tile": self.tokens_per_tile,
            "scored_at_layer": int(self.config.text_config.cross_attention_layers[0]),
            "trim_first_layer": bool(config.trim_first_layer),
            "layer_weights": None,
            "image_importance": False,
        }

    # ------------------------------------------------------------------ graphs
    def prefill_module(self, settings: ResolvedPruning) -> mllama.TrimmedPrefill:
        score = pruning.trim_score_fn(settings.method, settings.k, settings.seed)
        return mllama.TrimmedPrefill(self.model, score, settings.k, settings.trim_first_layer, settings.method)

    def graphs(self, settings: ResolvedPruning) -> list[GraphExport]:
        vision_config, text = self.config.vision_config, self.config.text_config
        tile, tiles = int(vision_config.image_size), self.max_tiles
        num_tokens, k = settings.num_visual_tokens, settings.k
        kv_heads, head_dim = int(text.num_key_value_heads), int(text.hidden_size // text.num_attention_heads)
        float_dtype = self.model.dtype
        batch, length, past = 2, 5, 4  # non-degenerate sizes so that nothing specialises to 1
        image_token = int(self.config.image_token_id)

        vision = GraphExport(
            name="vision",
            module=mllama.VisionEncoder(self.model),
            args=(torch.randn(batch, 1, tiles, 3, tile, tile, dtype=float_dtype), torch.ones(batch, 1, dtype=torch.long),
                  torch.ones(batch, 1, tiles, dtype=torch.long)),
            input_names=["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"],
            output_names=["cross_attention_states"],
            dynamic_axes={name: {0: "batch"} for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_states")},
        )
        prefill_module = self.prefill_module(settings)
        input_ids = torch.randint(0, image_token, (batch, length))
        cross_attention_mask = torch.ones(batch, length, 1, tiles, dtype=torch.long)
        prefill = GraphExport(
            name="prefill",
            module=prefill_module,
            args=(input_ids, torch.ones(batch, length, dtype=torch.long), torch.arange(length).repeat(batch, 1),
                  torch.randn(batch, num_tokens, int(text.hidden_size), dtype=float_dtype), cross_attention_mask),
            input_names=["input_ids", "attention_mask", "position_ids", "cross_attention_states", "cross_attention_mask"],
            output_names=prefill_module.output_names,
            dynamic_axes={
                "input_ids": {0: "batch", 1: "prompt_len"}, "attention_mask": {0: "batch", 1: "prompt_len"},
                "position_ids": {0: "batch", 1: "prompt_len"}, "cross_attention_states": {0: "batch"},
                "cross_attention_mask": {0: "batch", 1: "prompt_len"},
                **{name: {0: "batch"} for name in prefill_module.output_names},
                **{name: {0: "batch", 2: "prompt_len"} for name in cache_names(prefill_module.self_layers, "present")},
            },
        )
        decode_module = mllama.DecodeStep(self.model, settings.trim_first_layer)
        first_cross = decode_module.cross_layers[0]
        example = {
            "input_ids": torch.randint(0, image_token, (batch, 1)),
            "attention_mask": torch.ones(batch, past, dtype=torch.long),
            "position_ids": torch.full((batch, 1), past),
            "cross_mask_full": torch.zeros(batch, num_tokens),
            "cross_mask_kept": torch.zeros(batch, k),
            "text_row_mask": torch.ones(batch, 1),
        }
        for name in cache_names(decode_module.self_layers, "past"):
            example[name] = torch.randn(batch, kv_heads, past, head_dim, dtype=float_dtype)
        for index in decode_module.cross_layers:
            width = num_tokens if index == first_cross and not settings.trim_first_layer else k
            for part in ("key", "value"):
                example[f"cross.{index}.{part}"] = torch.randn(batch, kv_heads, width, head_dim, dtype=float_dtype)
        decode = GraphExport(
            name="decode",
            module=decode_module,
            args=tuple(example[name] for name in decode_module.input_names),
            input_names=decode_module.input_names,
            output_names=decode_module.output_names,
            dynamic_axes={
                "attention_mask": {0: "batch", 1: "past_len"},
                **{name: {0: "batch"} for name in decode_module.input_names if name != "attention_mask"},
                **{name: {0: "batch", 2: "past_len"} for name in cache_names(decode_module.self_layers, "past")},
                **{name: {0: "batch"} for name in decode_module.output_names},
            },
        )
        return [vision, prefill, decode]

    # ------------------------------------------------------------------ runtime settings
    def preprocess_settings(self) -> dict[str, Any]:
        image_processor = self.processor.image_processor
        height, width = processor_image_size(image_processor)
        if height != width:
            raise CheckpointError(f"{self.path}: Mllama tiles must be square, got {height}×{width}")
        return {
            "kind": "mllama",
            "tile_size": height,
            "max_image_tiles": int(image_processor.max_image_tiles),
            **pixel_settings(image_processor),
        }

    def text_settings(self, prompt_template: str | None) -> dict[str, Any]:
        tokenizer = self.processor.tokenizer
        chat_template = getattr(self.processor, "chat_template", None)
        return {
            **token_settings(tokenizer, self.model.generation_config, self.config.text_config),
            "prompt_template": prompt_template,  # None: the chat template when there is one, else the default
            "default_prompt_template": DEFAULT_PROMPT,
            "chat_template": chat_template if isinstance(chat_template, str) else None,
            "bos_token": tokenizer.bos_token,
            "image_token": "<|image|>",
            "image_token_id": int(self.config.image_token_id),
        }

    def language_model_settings(self) -> dict[str, Any]:
        text = self.config.text_config
        cross = [int(i) for i in text.cross_attention_layers]
        return {
            "type": "mllama",
            **text_model_settings(text),
            "self_attention_layers": [i for i in range(int(text.num_hidden_layers)) if i not in cross],
            "cross_attention_layers": cross,
            "num_key_value_heads": int(text.num_key_value_heads),
        }
