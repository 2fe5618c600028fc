"""LLaMA-3.2-Vision (Mllama) with trimmed cross-attention keys/values: the torch-free pipeline.

    image ─ preprocess (tiles) ─ vision ─ cross_attention_states (B, N, D)
    prompt ─ render + tokenise (as MllamaProcessor) ─ ids, cross_attention_mask (B, T, 1, tiles)
    prefill: self-attention cache + cross keys/values, the later layers' from the k kept tokens only
    decode:  greedy or beam search, one token at a time over both caches

One image per prompt, and the prompt must contain exactly one ``<|image|>`` (the default template and chat
templates put it first). Graphs: ``vision``, ``prefill``, ``decode`` (see ``export/adapters/mllama.py``).
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from PIL import Image

from runtime.backends.base import Runner
from runtime.errors import UsageError
from runtime.manifest import Manifest
from runtime.pipelines.base import Answer, BatchedPipeline, Clock, finish_reasons, left_pad, register
from runtime.pipelines.decoding import prefill
from runtime.preprocess import preprocess
from runtime.text import TextCodec, format_prompt


# ------------------------------------------------------------------------------------------------ prompt


def render_chat_template(template: str, question: str, bos_token: str | None, eos_token: str | None = None) -> str:
    """The checkpoint's chat template for one user turn (an image, then the question) + the generation prompt,
    rendered with jinja2 as transformers does (sandboxed, trim_blocks, lstrip_blocks, loopcontrols)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UsageError(f"the chat template refused the prompt: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    try:
        compiled = environment.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise UsageError(f"the chat template does not parse (line {err.lineno}: {err.message})") from None
    try:
        return compiled.render(messages=messages, add_generation_prompt=True, bos_token=bos_token or "",
                               eos_token=eos_token or "")
    except UsageError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as err:
        raise UsageError(f"the chat template failed to render ({type(err).__name__}: {err})") from None


def insert_bos(text: str, bos_token: str, image_token: str) -> str:
    """MllamaProcessor's ``build_string_from_input``: unless the text already has BOS somewhere, BOS goes after the
    leading image tokens."""
    if bos_token in text:
        return text
    count = 0
    while text.startswith(image_token, count * len(image_token)):
        count += 1
    return image_token * count + bos_token + text[count * len(image_token) :]


class MllamaPrompt:
    """Prompt text and ids as MllamaProcessor makes them.

    ``--prompt-template`` (build or run time) when given: BOS inserted as the processor does and the tokenizer's
    own special ids added (``processor(images, text)``). Else the checkpoint's chat template: rendered, encoded
    without adding special ids — the template writes BOS itself (``processor(images, text, add_special_tokens=False)``,
    as the model card shows). Else ``<|image|>Question: {} Answer:``.
    """

    def __init__(self, codec: TextCodec, settings: dict[str, Any], prompt_template: str | None):
        self.codec, self.settings = codec, settings
        self.template = prompt_template if prompt_template is not None else settings.get("prompt_template")
        self.chat_template = None if self.template else settings.get("chat_template")
        if self.template is None and not self.chat_template:
            self.template = settings["default_prompt_template"]
        if self.template is not None:
            format_prompt(self.template, "")  # validate early
        self.image_token, self.image_token_id = settings["image_token"], int(settings["image_token_id"])
        self.bos_token = settings.get("bos_token")

    @property
    def description(self) -> str:
        return self.template if self.template else "chat template"

    def text(self, question: str) -> str:
        if self.chat_template:
            return render_chat_template(self.chat_template, question, self.bos_token)
        text = format_prompt(self.template, question)
        return insert_bos(text, self.bos_token, self.image_token) if self.bos_token else text

    def ids(self, question: str) -> list[int]:
        text = self.text(question)
        core = self.codec.tokenizer.encode(text, add_special_tokens=False).ids
        ids = core if self.chat_template else self.codec.prefix_ids + core + self.codec.suffix_ids
        images = ids.count(self.image_token_id)
        if images != 1:
            raise UsageError(f"the prompt must contain exactly one {self.image_token} (one image per prompt), "
                             f"found {images} in {text!r}")
        return ids


def cross_attention_mask(ids: list[list[int]], width: int, image_token_id: int, num_tiles: np.ndarray, max_tiles: int) -> np.ndarray:
    """Left-padded (B, width, 1, max_tiles) int64: from the ``<|image|>`` token to the end, the image's real tiles
    (MllamaProcessor's ``get_cross_attention_token_mask`` + dense conversion, one image per prompt)."""
    mask = np.zeros((len(ids), width, 1, max_tiles), dtype=np.int64)
    for row, row_ids in enumerate(ids):
        start = width - len(row_ids) + row_ids.index(image_token_id)
        mask[row, start:, 0, : int(num_tiles[row])] = 1
    return mask


# ------------------------------------------------------------------------------------------------ pipeline


@register
class MllamaPipeline(BatchedPipeline):
    """LLaMA-3.2-Vision with Trimmed-Llama cross-attention: graphs ``vision``, ``prefill``, ``decode``."""

    family = "mllama"

    def __init__(self, manifest: Manifest, runners: dict[str, Runner], prompt_template: str | None = None):
        super().__init__(manifest, runners, prompt_template)
        self.prompt = MllamaPrompt(self.text, manifest.text, prompt_template)
        self.prompt_template = self.prompt.description
        self.lm = manifest.language_model
        self.pruning = manifest.pruning

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        return preprocess(images, self.manifest.preprocess)

    def encode_questions(self, questions: list[str]) -> list[list[int]]:
        return [self.prompt.ids(q) for q in questions]

    def vision(self, pixels: dict[str, np.ndarray]) -> np.ndarray:
        """→ cross_attention_states (B, N, D)."""
        feeds = {"pixel_values": pixels["pixel_values"].astype(self.float_dtype),
                 "aspect_ratio_ids": pixels["aspect_ratio_ids"], "aspect_ratio_mask": pixels["aspect_ratio_mask"]}
        return self.runners["vision"].run(feeds)["cross_attention_states"]

    def prefill_feeds(self, ids: list[list[int]], states: np.ndarray, num_tiles: np.ndarray) -> dict[str, np.ndarray]:
        input_ids, attention_mask = left_pad(ids, self.text.pad_token_id)  # (B, T)
        width = input_ids.shape[1]
        position_ids = np.where(attention_mask > 0, np.cumsum(attention_mask, axis=1) - 1, 1)  # as HF generate
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids.astype(np.int64),
            "cross_attention_states": states.astype(self.float_dtype),
            "cross_attention_mask": cross_attention_mask(
                ids, width, self.prompt.image_token_id, num_tiles, int(self.pruning.max_num_tiles)),
        }

    def first_generated_positions(self, text_ids: list[list[int]]) -> np.ndarray:
        """Text positions count from 0 (the visual tokens are cross-attended, they take no positions)."""
        return np.array([len(ids) for ids in text_ids], dtype=np.int64)

    def cross_kv_bytes(self, prefill_out: dict[str, np.ndarray]) -> dict[str, Any]:
        """Per sample: bytes of the cross-attention keys/values untrimmed (N tokens in every cross layer) and as
        kept (the first layer N unless trimmed, the others k)."""
        names = [name for name in prefill_out if name.startswith("cross.")]
        kept = sum(prefill_out[name][0].nbytes for name in names)
        full = sum(prefill_out[name][0].nbytes // prefill_out[name].shape[2] * self.pruning.num_visual_tokens for name in names)
        return {"full": int(full), "kept": int(kept), "kept_fraction": round(kept / full, 6) if full else 1.0}

    # ------------------------------------------------------------------ end to end
    def answer_batch(self, images: list[Image.Image], questions: list[str], max_new_tokens: int,
                     pixel_values: dict[str, np.ndarray] | None, text_ids: list[list[int]] | None = None,
                     num_beams: int = 1) -> list[Answer]:
        clock = Clock()
        pixels = pixel_values if pixel_values is not None else self.preprocess(images)
        ids = text_ids if text_ids is not None else self.encode_questions(questions)
        clock.lap("preprocess")
        states = self.vision(pixels)
        clock.lap("visual")
        feeds = self.prefill_feeds(ids, states, pixels["aspect_ratio_mask"][:, 0].sum(axis=-1))
        limits = self.row_limits(ids)  # (B,) tokens each row has room for: the cache needs no more
        new_tokens = min(max_new_tokens, int(limits.max()))
        prefill_out, cache = prefill(self.runners["prefill"], feeds, new_tokens, self.steps)
        clock.lap("prefill")
        next_position = feeds["position_ids"].max(axis=1) + 1
        generated = self.decode(prefill_out, cache, next_position, max_new_tokens, limits, num_beams)
        clock.lap("decode")
        timings = clock.summary()
        kv_bytes = self.cross_kv_bytes(prefill_out)
        reasons = finish_reasons(generated, limits, max_new_tokens)
        return [
            Answer(answer=self.text.decode(row_ids), token_ids=row_ids,
                   kept_indices=prefill_out["kept_indices"][row].tolist(), timings_ms=timings,
                   extra={"cross_kv_bytes": kv_bytes, "self_kv_bytes": cache.nbytes * num_beams // len(generated)},
                   finish_reason=reasons[row])
            for row, row_ids in enumerate(generated)
        ]
