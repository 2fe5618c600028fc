"""What every family's pipeline shares: the batching front door (``BatchedPipeline.answer``), the answer record,
the registry that ``make_pipeline`` reads (``runtime/pipelines/__init__.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from runtime.backends.base import Runner
from runtime.errors import UsageError
from runtime.manifest import Manifest
from runtime.pipelines.beam import beam_search
from runtime.pipelines.decoding import DecodeStep, KVCache, StepPool, TokenCallback, greedy_decode
from runtime.preprocess import load_image
from runtime.text import TextCodec, check_text


@dataclass
class Answer:
    answer: str
    token_ids: list[int]
    kept_indices: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "eos"  # eos | max_new_tokens | context_limit (the model's last position was reached)


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


def check_num_beams(num_beams: int, max_batch: int) -> None:
    """Beam search runs N rows per question through graphs built for at most ``max_batch`` rows."""
    if num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, got {num_beams}")
    if num_beams > max_batch:
        raise UsageError(f"--num-beams {num_beams} is more than the max batch {max_batch} (every beam is a row of the "
                         f"decode graph): use at most {max_batch}, or engines built with a larger --max-batch")


class BatchedPipeline:
    """What every family's pipeline shares: ``answer()`` checks its arguments — the context limit included, for
    every question before anything runs — and splits the work into batches of at most the manifest's
    ``max_batch`` (images given as paths are decoded one batch at a time); the family implements
    ``answer_batch()`` and ``first_generated_positions()``."""

    family: str  # the manifest's model family this pipeline runs
    max_image_pixels: int | None = None  # decoding paths: refuse larger images (Pillow's bomb check)
    # decode through the runner's bound buffers (ORT IO binding) or device-resident cache (TensorRT) where it offers
    # them; None: ORT's CPU provider (measured faster: README "KV cache") and TensorRT, plain runs elsewhere
    io_binding: bool | None = None
    on_token: TokenCallback | None = None  # called after every generated token: streaming, per-token timing
    on_beam_margins: Callable[[int, np.ndarray], None] | None = None  # beam search: each step's closest tie (parity)

    def __init__(self, manifest: Manifest, runners: dict[str, Runner], prompt_template: str | None = None):
        self.manifest = manifest
        self.runners = runners
        self.text = TextCodec(manifest.path(manifest.text["tokenizer"]), manifest.text)
        self.float_dtype = np.dtype(np.float16 if manifest.precision == "fp16" else np.float32)
        self.steps = StepPool()  # bound decode steps kept for the next request of the same shapes

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

    def check_context(self, questions: list[str]) -> list[list[int]]:
        """Refuse (one line) any question whose prompt alone fills the model's positions; prompts that fit are
        answered, and generation stops at the limit (``finish_reason`` ``context_limit``). Returns the prompts'
        token ids (encoded once per request)."""
        for index, question in enumerate(questions):
            check_text(question, f"question {index + 1}")
        text_ids = self.encode_questions(questions)
        rooms = self.row_limits(text_ids)  # (B,)
        for index in np.flatnonzero(rooms < 1)[:1]:
            used = self.position_limit - int(rooms[index])
            raise UsageError(
                f"question {index + 1} is too long for this model: its prompt (+ visual tokens) takes {used} "
                f"positions and the model has {self.position_limit}, leaving none for the answer; shorten the question")
        return text_ids

    def answer(self, images: list, questions: list[str], max_new_tokens: int = 10, pixel_values=None,
               num_beams: int = 1) -> list[Answer]:
        """Answer (image, question) pairs. ``images``: PIL images or paths (decoded per batch); ``pixel_values``:
        already preprocessed inputs (skips preprocessing). ``num_beams`` > 1: beam search (HF ``generate(num_beams=N)``),
        N rows per question through the decode graph, so at most ``max_batch // N`` questions per request."""
        if len(questions) == 0:
            return []
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        max_batch = self.manifest.max_batch
        check_num_beams(num_beams, max_batch)
        text_ids = self.check_context(questions)
        per_request = max(1, max_batch // num_beams)  # questions per request: B × N rows within the graphs' batch
        answers: list[Answer] = []
        for start in range(0, len(questions), per_request):
            stop = start + per_request
            batch_images = [self.open_image(image) for image in images[start:stop]] if images else []
            answers += self.answer_batch(batch_images, questions[start:stop], max_new_tokens,
                                         slice_pixels(pixel_values, start, stop), text_ids[start:stop], num_beams)
        return answers

    def open_image(self, image) -> Image.Image:
        return image if isinstance(image, Image.Image) else load_image(image, self.max_image_pixels)

    def encode_questions(self, questions: list[str]) -> list[list[int]]:
        """Prompt token ids per question (the family's template)."""
        raise NotImplementedError

    def decode(self, prefill_out: dict[str, np.ndarray], cache: KVCache, next_position: np.ndarray,
               max_new_tokens: int, row_limits: np.ndarray | None = None, num_beams: int = 1) -> list[list[int]]:
        """Greedy decoding (``num_beams`` 1) or beam search after the prefill. The decode graph's inputs that the
        prefill produced by the same name (Mllama's cross-attention keys/values and masks) stay fixed for the
        request. Beam search repeats the first logits, the cache and those constant feeds N times per row (B → B·N)
        and decodes through bound host buffers or plain runs (the device-resident cache cannot be reordered)."""
        runner = self.runners["decode"]
        constant = {name: prefill_out[name] for name in runner.input_names if name in prefill_out}
        bind = self.io_binding if self.io_binding is not None else (
            getattr(runner, "device", None) == "cpu" or hasattr(runner, "resident_step"))
        if num_beams == 1:
            pooled = bind and hasattr(runner, "bind") and not hasattr(runner, "resident_step")
            step = self.steps.step(runner, cache, constant) if pooled else DecodeStep(runner, cache, constant, bind=bind)
            generated = greedy_decode(step, prefill_out["logits"], next_position, self.text.eos_token_ids,
                                      self.text.pad_token_id, max_new_tokens, row_limits, self.on_token)
            self.steps.release(cache)
            return generated
        constant = {name: np.repeat(value, num_beams, axis=0) for name, value in constant.items()}  # (B·N, ...)
        repeated = cache.repeat_rows(num_beams)
        self.steps.release(cache)
        step = DecodeStep(runner, repeated, constant, bind=bind, resident=False)
        logits = np.repeat(prefill_out["logits"], num_beams, axis=0)  # (B·N, V)
        generated, _ = beam_search(step, logits, next_position, self.text.eos_token_ids, max_new_tokens, num_beams,
                                   step.reorder, row_limits, on_token=self.on_token, on_margins=self.on_beam_margins)
        return generated

    def answer_batch(self, images, questions, max_new_tokens, pixel_values, text_ids=None, num_beams=1) -> list[Answer]:
        raise NotImplementedError


def left_pad(ids: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of unequal length → left-padded (B, T) int64 ids and their (B, T) int64 attention mask."""
    width = max(len(row) for row in ids)
    padded = np.full((len(ids), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, row_ids in enumerate(ids):
        padded[row, width - len(row_ids):] = row_ids
        mask[row, width - len(row_ids):] = 1
    return padded, mask


class Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = (now - self.last) * 1e3
        self.last = now

    def summary(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.laps.items()}, "total": round((self.last - self.start) * 1e3, 3)}


PIPELINES: dict[str, type["BatchedPipeline"]] = {}


def register(pipeline: type["BatchedPipeline"]) -> type["BatchedPipeline"]:
    """Class decorator: make a family's pipeline available to ``make_pipeline`` under its ``family`` name."""
    PIPELINES[pipeline.family] = pipeline
    return pipeline
