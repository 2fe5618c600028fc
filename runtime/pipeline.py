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
from runtime.manifest import Manifest
from runtime.preprocess import preprocess
from runtime.text import TextCodec, format_prompt

POSITION_POLICIES = ("original", "compact")


@dataclass
class Answer:
    answer: str
    token_ids: list[int]
    kept_indices: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


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
) -> list[list[int]]:
    """Greedy decoding with an explicit KV cache.

    logits (B, V) from the prefill; cache ``past.{i}.key|value`` (B, H, P, Dh); attention_mask (B, P).
    Returns the generated ids per row, EOS excluded. Finished rows are fed padding (as HF does) until every row
    has finished or ``max_new_tokens`` is reached.
    """
    batch = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, dtype=bool)
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


class BatchedPipeline:
    """What every family's pipeline shares: ``answer()`` checks its arguments and splits the work into batches of
    at most the manifest's ``max_batch``; the family implements ``answer_batch()``."""

    manifest: Manifest

    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 10,
               pixel_values=None) -> list[Answer]:
        """Answer (image, question) pairs. ``pixel_values``: already preprocessed inputs (skips preprocessing)."""
        if len(questions) == 0:
            return []
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        max_batch = self.manifest.max_batch
        answers: list[Answer] = []
        for start in range(0, len(questions), max_batch):
            stop = start + max_batch
            answers += self.answer_batch(images[start:stop] if images else [], questions[start:stop], max_new_tokens,
                                         slice_pixels(pixel_values, start, stop))
        return answers

    def answer_batch(self, images, questions, max_new_tokens, pixel_values) -> list[Answer]:
        raise NotImplementedError


class Blip2Pipeline(BatchedPipeline):
    """BLIP-2 (OPT) with a pruned Q-Former output: graphs ``visual``, ``embed``, ``prefill``, ``decode``."""

    family = "blip2-opt"

    def __init__(self, manifest: Manifest, runners: dict[str, Runner], prompt_template: str | None = None):
        self.manifest = manifest
        self.runners = runners
        self.text = TextCodec(manifest.path(manifest.text["tokenizer"]), manifest.text)
        self.prompt_template = prompt_template or manifest.text["prompt_template"]
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

    def decode(self, prefill_out: dict[str, np.ndarray], batch: PrefillBatch, max_new_tokens: int) -> list[list[int]]:
        return greedy_decode(
            self.runners["decode"].run,
            prefill_out["logits"],
            presents_as_past(prefill_out),
            batch.attention_mask,
            batch.next_position,
            self.text.eos_token_ids,
            self.text.pad_token_id,
            max_new_tokens,
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
        generated = self.decode(prefill_out, batch, max_new_tokens)
        clock.lap("decode")
        timings = clock.summary()
        return [
            Answer(
                answer=self.text.decode(ids),
                token_ids=ids,
                kept_indices=[int(i) for i in visual["kept_indices"][row]],
                timings_ms=timings,
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
