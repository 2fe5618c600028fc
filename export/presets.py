"""Randomly initialised checkpoints with the real widths of public models, the depth reduced by flags.

    python scripts/make_preset.py blip2-opt-2.7b --out models/_presets/blip2-2.7b-d2
    python scripts/make_preset.py llama-3.2-11b-vision --out DIR --text-layers 10 --dtype fp16

Every width (hidden sizes, heads, vocabulary, image and patch size, tiles, query tokens) is the real checkpoint's;
only the layer counts are reduced (``--full-depth``: the real ones). The weights are random (init traps of papers.md
fixed as in ``export/tiny.py``); the tokenizer is tiny.py's small word-level stand-in, every id of it below the real
vocabulary, which the embedding and LM head keep. ``preset.json`` beside the checkpoint says what it is.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from export import tiny
from runtime.errors import UnsupportedError, UsageError, cli_errors
from runtime.memory import available_memory

DTYPES = {"fp32": "float32", "fp16": "float16"}
HEADROOM = 1 << 30  # bytes beyond the weights that building needs (Python, torch, the writer)


@dataclass(frozen=True)
class Family:
    """What differs between model families: HF classes, tokenizer, processor, image token, depth rules, init."""

    config_class: str
    model_class: str
    tokenizer: Callable[[], Any]
    processor: Callable[[Any, dict], Any]  # (tokenizer, real config) → processor; may add the image token
    image_token: str
    fix_init: Callable[[Any], None]
    depth_rules: Callable[[dict], dict] = lambda config: config  # what else a reduced depth changes
    init_overrides: dict = field(default_factory=dict)  # sub-config → values that only the random init needs


@dataclass(frozen=True)
class Preset:
    name: str
    mimics: str  # the real checkpoint (Hugging Face id)
    family: Family
    config: dict  # the real config's values that this preset reproduces (HF field names)
    depths: dict[str, tuple[str, str, int]]  # depth flag → (sub-config, field) of a layer count, reduced default

    def full_depths(self) -> dict[str, int]:
        return {flag: int(self.config[part][key]) for flag, (part, key, _) in self.depths.items()}

    def default_depths(self) -> dict[str, int]:
        return {flag: default for flag, (_, _, default) in self.depths.items()}

    def visual_tokens(self) -> int:
        """Tokens the vision tower hands on per image (patches + CLS, per tile), before any pruning."""
        vision = self.config["vision_config"]
        return ((vision["image_size"] // vision["patch_size"]) ** 2 + 1) * vision.get("max_num_tiles", 1)

    def depths_for(self, requested: dict[str, int | None], full_depth: bool = False) -> dict[str, int]:
        """Layer counts to build: the real ones with ``full_depth``, else ``requested`` over the defaults."""
        full = self.full_depths()
        given = {flag: n for flag, n in requested.items() if n is not None}
        foreign = sorted(set(given) - set(full))
        if foreign:
            raise UsageError(f"{', '.join(map(flag_name, foreign))} does not apply to {self.name} "
                             f"(its depth flags: {', '.join(map(flag_name, full))})")
        if full_depth and given:
            raise UsageError(f"--full-depth and {', '.join(map(flag_name, given))} exclude each other")
        chosen = full if full_depth else {**self.default_depths(), **given}
        for flag, n in chosen.items():
            if not 1 <= n <= full[flag]:
                raise UsageError(f"{flag_name(flag)} must be between 1 and {full[flag]} (the real depth), got {n}")
        return chosen

    def config_kwargs(self, depths: dict[str, int], tokenizer) -> dict:
        """The HF config's keyword arguments: the real values, ``depths``, the family's depth rules and init
        overrides, and the stand-in tokenizer's special ids."""
        config = copy.deepcopy(self.config)
        for flag, n in depths.items():
            part, key, _ = self.depths[flag]
            config[part][key] = n
        config = self.family.depth_rules(config)
        for part, values in self.family.init_overrides.items():
            config[part].update(values)
        config["text_config"].update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
        config["image_token_index"] = tokenizer.convert_tokens_to_ids(self.family.image_token)
        return config


def flag_name(flag: str) -> str:
    return "--" + flag.replace("_", "-")


def mllama_depth_rules(config: dict) -> dict:
    """Cross-attention layers: the real indices below the text depth (at least one must remain: >= 4 layers keep
    [3], >= 9 keep [3, 8]). Intermediate vision layers: each real index clipped to the last layer kept, so the
    projector keeps its real width (``vision_output_dim`` = hidden x (1 + 5)); HF reads ``hidden_states[i]`` of the
    local encoder, one entry per layer, so every index must be < the vision depth (repeats are fine)."""
    config = copy.deepcopy(config)
    text, vision = config["text_config"], config["vision_config"]
    cross = [i for i in text["cross_attention_layers"] if i < text["num_hidden_layers"]]
    if not cross:
        first = text["cross_attention_layers"][0]
        raise UsageError(f"--text-layers {text['num_hidden_layers']} keeps no cross-attention layer "
                         f"(the first is layer {first}): use at least {first + 1}")
    text["cross_attention_layers"] = cross
    last = vision["num_hidden_layers"] - 1
    vision["intermediate_layers_indices"] = [min(i, last) for i in vision["intermediate_layers_indices"]]
    return config


BLIP2 = Family(
    config_class="Blip2Config", model_class="Blip2ForConditionalGeneration",
    tokenizer=tiny.build_word_tokenizer,
    processor=lambda tokenizer, config: tiny.blip2_processor(
        tokenizer, config["vision_config"]["image_size"], config["num_query_tokens"]),
    image_token="<image>", fix_init=tiny.fix_blip2_init,
    init_overrides={"vision_config": {"initializer_range": 0.02}},  # HF's 1e-10: every attention uniform (papers.md)
)
MLLAMA = Family(
    config_class="MllamaConfig", model_class="MllamaForConditionalGeneration",
    tokenizer=tiny.build_mllama_tokenizer,
    processor=lambda tokenizer, config: tiny.mllama_processor(
        tokenizer, config["vision_config"]["image_size"], config["vision_config"]["max_num_tiles"], chat_template=True),
    image_token="<|image|>", fix_init=tiny.fix_mllama_init, depth_rules=mllama_depth_rules,
)


# ------------------------------------------------------------------------------------------------ the registry

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset(
        name="blip2-opt-2.7b", mimics="Salesforce/blip2-opt-2.7b", family=BLIP2,
        config=dict(
            vision_config=dict(hidden_size=1408, intermediate_size=6144, num_attention_heads=16, num_hidden_layers=39,
                               image_size=224, patch_size=14, layer_norm_eps=1e-6),
            qformer_config=dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                                cross_attention_frequency=2, encoder_hidden_size=1408, vocab_size=30522),
            text_config=dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                             num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
                             word_embed_proj_dim=2560, tie_word_embeddings=True, do_layer_norm_before=True),
            num_query_tokens=32,
        ),
        depths={"vision_layers": ("vision_config", "num_hidden_layers", 2), "qformer_layers": ("qformer_config", "num_hidden_layers", 2),
                "text_layers": ("text_config", "num_hidden_layers", 2)},
    ),
    Preset(
        name="llama-3.2-11b-vision", mimics="meta-llama/Llama-3.2-11B-Vision-Instruct", family=MLLAMA,
        config=dict(
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                               attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4,
                               vision_output_dim=7680, intermediate_layers_indices=[3, 7, 15, 23, 30], norm_eps=1e-5,
                               supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
            text_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256,
                             cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=8192),
                             max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5),
        ),
        depths={"vision_layers": ("vision_config", "num_hidden_layers", 2), "global_layers": ("vision_config", "num_global_layers", 1),
                "text_layers": ("text_config", "num_hidden_layers", 10)},
    ),
)}
DEPTH_FLAGS = sorted({flag for preset in PRESETS.values() for flag in preset.depths})


# ------------------------------------------------------------------------------------------------ building


def config_and_size(preset: Preset, depths: dict[str, int], tokenizer):
    """(HF config, parameter count): the model is counted on the meta device (nothing allocated; tied weights once)."""
    import torch
    import transformers

    config = getattr(transformers, preset.family.config_class)(**preset.config_kwargs(depths, tokenizer))
    with torch.device("meta"):
        model = getattr(transformers, preset.family.model_class)(config)
    return config, sum(p.numel() for p in model.parameters())


def check_memory(preset: Preset, params: int, dtype: str, available: int | None) -> int:
    """Estimated bytes of the weights; refused (exit 2) when they and ``HEADROOM`` do not fit in ``available``."""
    needed = params * (2 if dtype == "fp16" else 4)
    if available is not None and needed + HEADROOM > available:
        hint = " or --dtype fp16" if dtype == "fp32" else ""
        raise UnsupportedError(f"{preset.name} ({params / 1e9:.2f}B parameters) needs about {needed / 1e9:.1f} GB in "
                               f"{dtype}, {available / 1e9:.1f} GB of memory is available: use fewer layers{hint}")
    return needed


def build_model(preset: Preset, config, dtype: str, seed: int):
    """Built with ``dtype`` as the default dtype (fp16 never holds an fp32 copy); HF's init, then the init fixes."""
    import torch
    import transformers

    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(getattr(torch, DTYPES[dtype]))
    try:
        model = getattr(transformers, preset.family.model_class)(config).eval()
    finally:
        torch.set_default_dtype(previous)
    preset.family.fix_init(model)
    return model


def prepare_out(out: Path, force: bool) -> None:
    """An existing non-empty ``out`` is replaced only with ``force`` and only when it is a preset (preset.json)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (force and (out / "preset.json").is_file()):
            raise UsageError(f"--out {out} exists and is not empty (--force replaces a folder written by this script)")
        shutil.rmtree(out)


def make_preset(name: str, out: str | Path, depths: dict[str, int | None] | None = None, full_depth: bool = False,
                dtype: str = "fp32", seed: int = 0, force: bool = False, say: Callable[[str], None] = print) -> dict:
    """Write preset ``name`` to ``out`` (model, processor, tokenizer, preset.json); returns preset.json's dict."""
    started = time.monotonic()
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    preset, out = PRESETS[name], Path(out)
    chosen = preset.depths_for(depths or {}, full_depth)
    say(f"{name}: widths of {preset.mimics}, depths {chosen} (full {preset.full_depths()}), {dtype}, seed {seed}")
    tokenizer = preset.family.tokenizer()
    processor = preset.family.processor(tokenizer, preset.config)  # before the config: it may add the image token
    config, params = config_and_size(preset, chosen, tokenizer)
    needed = check_memory(preset, params, dtype, available_memory())
    prepare_out(out, force)  # every refusal above leaves --out as it was
    say(f"building {preset.family.model_class}: {params / 1e9:.3f}B parameters, {needed / 1e9:.2f} GB in {dtype}")
    model = build_model(preset, config, dtype, seed)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        say(f"writing the weights to {out}")
        model.save_pretrained(staging, max_shard_size="4GB")
        del model
        say("writing the processor and tokenizer")
        processor.save_pretrained(staging)
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        info = {"preset": name, "mimics": preset.mimics, "depths": chosen, "full_depths": preset.full_depths(),
                "parameters": params, "bytes": size, "seed": seed, "dtype": dtype, "visual_tokens_per_image": preset.visual_tokens(),
                "note": "random weights (not a trained model); the tokenizer is a small word-level stand-in "
                        f"({len(tokenizer)} tokens) for the real one; embedding and LM head keep the real vocabulary size"}
        (staging / "preset.json").write_text(json.dumps(info, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info["seconds"] = round(time.monotonic() - started, 1)
    say(f"{out}: {params:,} parameters, {info['bytes']:,} bytes on disk, {info['seconds']} s")
    return info


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make_preset.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=PRESETS, help=", ".join(f"{n}: {p.mimics}" for n, p in PRESETS.items()))
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. models/_presets/NAME)")
    for flag in DEPTH_FLAGS:
        defaults = ", ".join(f"{n}: {p.default_depths()[flag]} of {p.full_depths()[flag]}" for n, p in PRESETS.items() if flag in p.depths)
        parser.add_argument(flag_name(flag), dest=flag, type=int, default=None, help=f"layers ({defaults})" + (
            "; llama-3.2-11b-vision keeps the real cross-attention layers below it: >= 4 gives 1, >= 9 gives 2"
            if flag == "text_layers" else ""))
    parser.add_argument("--full-depth", action="store_true", help="the real depths (refused when it does not fit in memory)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights' dtype (default fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="replace --out when it holds a preset written by this script")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("make_preset.py"):
        depths = {flag: getattr(args, flag) for flag in DEPTH_FLAGS}
        make_preset(args.preset, args.out, depths, args.full_depth, args.dtype, args.seed, args.force,
                    say=lambda line: print(line, flush=True))
    return 0
