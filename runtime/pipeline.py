"""The pruned inference pipelines: image + question → answer, over any set of runners (ORT, TensorRT, or the
PyTorch reference that parity plugs in). One pipeline class per model family, registered by name.

BLIP-2 (+ CATP) sequence layout for a batch, left padded:

    [ k kept query embeds ][ pad … ][ BOS  Question: … Answer: ]   → prefill → greedy decode with the KV cache

Positions (``--positions``): ``original`` — kept query ``j`` keeps its position ``kept_indices[j]`` and text
token ``t`` sits at ``Q + t`` as in the unpruned model; ``compact`` — positions follow the attention mask
(queries ``0…k-1``, text ``k + t``), which is what HF/LAVIS do when fed pruned embeddings. Padding gets −1
(HF's convention; OPT's position offset maps it to a valid row that the mask hides).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from runtime.backends import Runner
from runtime.errors import UsageError
from runtime.manifest import POSITION_POLICIES, Manifest
from runtime.preprocess import load_image, preprocess
from runtime.text import TextCodec, check_text, format_prompt

@dataclass
class Answer:
    answer: str
    token_ids: list[int]
    kept_indices: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "eos"  # eos | max_new_tokens | context_limit (the model's last position was reached)


@dataclass
class PrefillBatch:
    """Everything the language model's prefill takes, plus what decoding needs to continue."""

    inputs_embeds: np.ndarray  # (B, k + T, E)
    attention_mask: np.ndarray  # (B, k + T) int64
    position_ids: np.ndarray  # (B, k + T) int64
    next_position: np.ndarray  # (B,) int64: position of the first generated token


def prefill_positions(
    policy: str, kept_indices: np.ndarray, num_queries: int, text_lengths: list[int], text_width: int
) -> np.ndarray:
    """Position ids for ``[k queries][left pad][text]``. kept_indices (B, k) → (B, k + text_width) int64."""
    if policy not in POSITION_POLICIES:
        raise UsageError(f"unknown positions policy {policy!r}; choose one of {', '.join(POSITION_POLICIES)}")
    batch, k = kept_indices.shape
    positions = np.full((batch, k + text_width), -1, dtype=np.int64)
    for row, length in enumerate(text_lengths):
        if policy == "original":
            positions[row, :k] = kept_indices[row]
            text_start = num_queries
        else:
            positions[row, :k] = np.arange(k)
            text_start = k
        positions[row, k + text_width - length :] = text_start + np.arange(length)
    return positions


def presents_as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step's ``present.{i}.key|value`` outputs become the next step's ``past.{i}.key|value`` inputs."""
    return {name.replace("present.", "past.", 1): value for name, value in outputs.items() if name.startswith("present.")}


def greedy_decode(
    decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    logits: np.ndarray,
    cache: dict[str, np.ndarray],
    attention_mask: np.ndarray,
    next_position: np.ndarray,
    eos_token_ids: list[int],
    pad_token_id: int,
    max_new_tokens: int,
    row_limits: np.ndarray | None = None,
) -> list[list[int]]:
    """Greedy decoding with an explicit KV cache.

    logits (B, V) from the prefill; cache ``past.{i}.key|value`` (B, H, P, Dh); attention_mask (B, P).
    Returns the generated ids per row, EOS excluded. A row finishes at EOS, at ``max_new_tokens``, or at its own
    ``row_limits[row]`` tokens (the model's position limit); finished rows are fed padding (as HF does) until
    every row has finished.
    """
    batch = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, dtype=bool)
    limits = np.full(batch, max_new_tokens) if row_limits is None else np.minimum(row_limits, max_new_tokens)
    position = next_position.astype(np.int64).copy()
    for step in range(max_new_tokens):
        tokens = logits.argmax(axis=-1).astype(np.int64)  # (B,) first maximum on ties, as torch.argmax
        tokens = np.where(finished, pad_token_id, tokens)
        for row in range(batch):
            if not finished[row]:
                if int(tokens[row]) in eos_token_ids:
                    finished[row] = True
                else:
                    generated[row].append(int(tokens[row]))
                    finished[row] = len(generated[row]) >= limits[row]
        if finished.all() or step == max_new_tokens - 1:
            break
        attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        outputs = decode(
            {
                "input_ids": tokens[:, None],  # (B, 1)
                "attention_mask": attention_mask,  # (B, P + 1)
                "position_ids": position[:, None],  # (B, 1)
                **cache,
            }
        )
        logits = outputs["logits"]
        cache = presents_as_past(outputs)
        position = position + 1
    return generated


def slice_pixels(pixel_values, start: int, stop: int):
    """Rows ``start:stop`` of preprocessed inputs: one array (BLIP-2) or a dict of arrays (Mllama)."""
    if pixel_values is None:
        return None
    if isinstance(pixel_values, dict):
        return {name: value[start:stop] for name, value in pixel_values.items()}
    return pixel_values[start:stop]


def finish_reasons(generated: list[list[int]], row_limits: np.ndarray, max_new_tokens: int) -> list[str]:
    """Why each row stopped: ``context_limit`` (its position budget ran out before ``max_new_tokens``),
    ``max_new_tokens``, or ``eos``."""
    reasons = []
    for ids, limit in zip(generated, row_limits):
        if len(ids) >= limit and limit < max_new_tokens:
            reasons.append("context_limit")
        elif len(ids) >= max_new_tokens:
            reasons.append("max_new_tokens")
        else:
            reasons.append("eos")
    return reasons


class BatchedPipeline:
    """What every family's pipeline shares: ``answer()`` checks its arguments — the context limit included, for
    every question before anything runs — and splits the work into batches of at most the manifest's
    ``max_batch`` (images given as paths are decoded one batch at a time); the family implements
    ``answer_batch()`` and ``first_generated_positions()``."""

    manifest: Manifest
    max_image_pixels: int | None = None  # decoding paths: refuse larger images (Pillow's bomb check)

    @property
    def position_limit(self) -> int:
        """Positions the language model has (its ``max_position_embeddings``)."""
        return int(self.manifest.language_model["max_position_embeddings"])

    def first_generated_positions(self, text_ids: list[list[int]]) -> np.ndarray:
        """(B,) the position the first generated token takes, per prompt."""
        raise NotImplementedError

    def row_limits(self, text_ids: list[list[int]]) -> np.ndarray:
        """(B,) how many tokens each prompt leaves room for before the position limit."""
        return self.position_limit - self.first_generated_positions(text_ids)

    def check_context(self, questions: list[str]) -> None:
        """Refuse (one line) any question whose prompt alone fills the model's positions; prompts that fit are
        answered, and generation stops at the limit (``finish_reason`` ``context_limit``)."""
        for index, question in enumerate(questions):
            check_text(question, f"question {index + 1}")
        rooms = self.row_limits(self.encode_questions(questions))  # (B,)
        for index in np.flatnonzero(rooms < 1)[:1]:
            used = self.position_limit - int(rooms[index])
            raise UsageError(
                f"question {index + 1} is too long for this model: its prompt (+ visual tokens) takes {used} "
                f"positions and the model has {self.position_limit}, leaving none for the answer; shorten the question")

    def answer(self, images: list, questions: list[str], max_new_tokens: int = 10, pixel_values=None) -> list[Answer]:
        """Answer (image, question) pairs. ``images``: PIL images or paths (decoded per batch); ``pixel_values``:
        already preprocessed inputs (skips preprocessing)."""
        if len(questions) == 0:
            return []
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.check_context(questions)
        max_batch = self.manifest.max_batch
        answers: list[Answer] = []
        for start in range(0, len(questions), max_batch):
            stop = start + max_batch
            batch_images = [self.open_image(image) for image in images[start:stop]] if images else []
            answers += self.answer_batch(batch_images, questions[start:stop], max_new_tokens,
                                         slice_pixels(pixel_values, start, stop))
        return answers

    def open_image(self, image) -> Image.Image:
        return image if isinstance(image, Image.Image) else load_image(image, self.max_image_pixels)

    def answer_batch(self, images, questions, max_new_tokens, pixel_values) -> list[Answer]:
        raise NotImplementedError


class Blip2Pipeline(BatchedPipeline):
    """BLIP-2 (OPT) with a pruned Q-Former output: graphs ``visual``, ``embed``, ``prefill``, ``decode``."""

    family = "blip2-opt"

    def __init__(self, manifest: Manifest, runners: dict[str, Runner], prompt_template: str | None = None):
        self.manifest = manifest
        self.runners = runners
        self.text = TextCodec(manifest.path(manifest.text["tokenizer"]), manifest.text)
        self.prompt_template = prompt_template if prompt_template is not None else manifest.text["prompt_template"]
        format_prompt(self.prompt_template, "")  # validate early
        self.positions = manifest.pruning["positions"]
        self.float_dtype = np.dtype(np.float16 if manifest.precision == "fp16" else np.float32)

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return preprocess(images, self.manifest.preprocess)["pixel_values"]

    def encode_questions(self, questions: list[str]) -> list[list[int]]:
        return [self.text.encode(format_prompt(self.prompt_template, q)) for q in questions]

    def visual(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """pixel_values (B, 3, H, W) → query_embeds (B, k, E), kept_indices (B, k), scores (B, Q)."""
        return self.runners["visual"].run({"pixel_values": pixel_values.astype(np.float32)})

    def build_prefill(self, query_embeds: np.ndarray, kept_indices: np.ndarray, text_ids: list[list[int]]) -> PrefillBatch:
        batch, k, _ = query_embeds.shape
        width = max(len(ids) for ids in text_ids)
        padded = np.full((batch, width), self.text.pad_token_id, dtype=np.int64)
        text_mask = np.zeros((batch, width), dtype=np.int64)
        for row, ids in enumerate(text_ids):
            padded[row, width - len(ids) :] = ids
            text_mask[row, width - len(ids) :] = 1
        text_embeds = self.runners["embed"].run({"input_ids": padded})["inputs_embeds"]  # (B, T, E)
        inputs_embeds = np.concatenate([query_embeds.astype(self.float_dtype), text_embeds.astype(self.float_dtype)], axis=1)
        attention_mask = np.concatenate([np.ones((batch, k), dtype=np.int64), text_mask], axis=1)
        position_ids = prefill_positions(
            self.positions, kept_indices, self.manifest.num_visual_tokens, [len(t) for t in text_ids], width
        )
        return PrefillBatch(inputs_embeds, attention_mask, position_ids, position_ids.max(axis=1) + 1)

    def prefill(self, batch: PrefillBatch) -> dict[str, np.ndarray]:
        return self.runners["prefill"].run(
            {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        )

    def first_generated_positions(self, text_ids: list[list[int]]) -> np.ndarray:
        """``original``: text at ``Q + t``; ``compact``: at ``k + t``."""
        start = self.manifest.num_visual_tokens if self.positions == "original" else self.manifest.k
        return np.array([start + len(ids) for ids in text_ids], dtype=np.int64)

    def decode(self, prefill_out: dict[str, np.ndarray], batch: PrefillBatch, max_new_tokens: int,
               row_limits: np.ndarray | None = None) -> list[list[int]]:
        return greedy_decode(
            self.runners["decode"].run,
            prefill_out["logits"],
            presents_as_past(prefill_out),
            batch.attention_mask,
            batch.next_position,
            self.text.eos_token_ids,
            self.text.pad_token_id,
            max_new_tokens,
            row_limits,
        )

    # ------------------------------------------------------------------ end to end
    def answer_batch(self, images: list[Image.Image], questions: list[str], max_new_tokens: int,
                     pixel_values: np.ndarray | None) -> list[Answer]:
        clock = _Clock()
        if pixel_values is None:
            pixel_values = self.preprocess(images)
        text_ids = self.encode_questions(questions)
        clock.lap("preprocess")
        visual = self.visual(pixel_values)
        clock.lap("visual")
        batch = self.build_prefill(visual["query_embeds"], visual["kept_indices"], text_ids)
        prefill_out = self.prefill(batch)
        clock.lap("prefill")
        limits = self.row_limits(text_ids)
        generated = self.decode(prefill_out, batch, max_new_tokens, limits)
        clock.lap("decode")
        timings = clock.summary()
        reasons = finish_reasons(generated, limits, max_new_tokens)
        return [
            Answer(
                answer=self.text.decode(ids),
                token_ids=ids,
                kept_indices=[int(i) for i in visual["kept_indices"][row]],
                timings_ms=timings,
                finish_reason=reasons[row],
            )
            for row, ids in enumerate(generated)
        ]


class _Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = (now - self.last) * 1e3
        self.last = now

    def summary(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.laps.items()}, "total": round((self.last - self.start) * 1e3, 3)}


PIPELINES: dict[str, type] = {Blip2Pipeline.family: Blip2Pipeline}


def make_pipeline(manifest: Manifest, runners: dict[str, Runner], prompt_template: str | None = None):
    from runtime.mllama import MllamaPipeline  # registered here: runtime.mllama builds on this module

    PIPELINES.setdefault(MllamaPipeline.family, MllamaPipeline)
    if manifest.family not in PIPELINES:
        raise UsageError(f"this runtime has no pipeline for model family {manifest.family!r} (known: {', '.join(PIPELINES)})")
    return PIPELINES[manifest.family](manifest, runners, prompt_template)
