"""BLIP-2 (OPT) + CATP: the torch-free pipeline over graphs ``visual``, ``embed``, ``prefill``, ``decode``.

Sequence layout for a batch, left padded:

    [ k kept query embeds ][ pad … ][ BOS  Question: … Answer: ]   → prefill → greedy / beam decode, KV cache

Positions (``--positions``): ``original`` — kept query ``j`` keeps its position ``kept_indices[j]`` and text
token ``t`` sits at ``Q + t`` as in the unpruned model; ``compact`` — positions follow the attention mask
(queries ``0…k-1``, text ``k + t``), which is what HF/LAVIS do when fed pruned embeddings. Padding gets −1
(HF's convention; OPT's position offset maps it to a valid row that the mask hides).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.backends.base import Runner
from runtime.errors import UsageError
from runtime.contract import POSITION_POLICIES
from runtime.manifest import Manifest
from runtime.pipelines.base import Answer, BatchedPipeline, Clock, finish_reasons, left_pad, register
from runtime.pipelines.decoding import prefill
from runtime.preprocess import preprocess
from runtime.text import format_prompt


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


@register
class Blip2Pipeline(BatchedPipeline):
    """BLIP-2 (OPT) with a pruned Q-Former output: graphs ``visual``, ``embed``, ``prefill``, ``decode``."""

    family = "blip2-opt"

    def __init__(self, manifest: Manifest, runners: dict[str, Runner], prompt_template: str | None = None):
        super().__init__(manifest, runners, prompt_template)
        self.prompt_template = prompt_template if prompt_template is not None else manifest.text["prompt_template"]
        format_prompt(self.prompt_template, "")  # validate early
        self.positions = manifest.pruning.positions

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return preprocess(images, self.manifest.preprocess)["pixel_values"]

    def encode_questions(self, questions: list[str]) -> list[list[int]]:
        return self.text.encode_many([format_prompt(self.prompt_template, q) for q in questions])

    def visual(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """pixel_values (B, 3, H, W) → query_embeds (B, k, E), kept_indices (B, k), scores (B, Q)."""
        return self.runners["visual"].run({"pixel_values": pixel_values.astype(np.float32)})

    def build_prefill(self, query_embeds: np.ndarray, kept_indices: np.ndarray, text_ids: list[list[int]]) -> PrefillBatch:
        batch, k, _ = query_embeds.shape
        padded, text_mask = left_pad(text_ids, self.text.pad_token_id)  # (B, T)
        width = padded.shape[1]
        text_embeds = self.runners["embed"].run({"input_ids": padded})["inputs_embeds"]  # (B, T, E)
        inputs_embeds = np.concatenate([query_embeds, text_embeds], axis=1, dtype=self.float_dtype)  # (B, k + T, E)
        attention_mask = np.ones((batch, k + width), dtype=np.int64)  # (B, k + T)
        attention_mask[:, k:] = text_mask
        position_ids = prefill_positions(
            self.positions, kept_indices, self.manifest.num_visual_tokens, [len(t) for t in text_ids], width
        )
        return PrefillBatch(inputs_embeds, attention_mask, position_ids, position_ids.max(axis=1) + 1)

    def prefill_feeds(self, batch: PrefillBatch) -> dict[str, np.ndarray]:
        return {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}

    def first_generated_positions(self, text_ids: list[list[int]]) -> np.ndarray:
        """``original``: text at ``Q + t``; ``compact``: at ``k + t``."""
        start = self.manifest.num_visual_tokens if self.positions == "original" else self.manifest.k
        return np.array([start + len(ids) for ids in text_ids], dtype=np.int64)

    # ------------------------------------------------------------------ end to end
    def answer_batch(self, images: list[Image.Image], questions: list[str], max_new_tokens: int,
                     pixel_values: np.ndarray | None, text_ids: list[list[int]] | None = None,
                     num_beams: int = 1) -> list[Answer]:
        clock = Clock()
        if pixel_values is None:
            pixel_values = self.preprocess(images)
        if text_ids is None:
            text_ids = self.encode_questions(questions)
        clock.lap("preprocess")
        visual = self.visual(pixel_values)
        clock.lap("visual")
        batch = self.build_prefill(visual["query_embeds"], visual["kept_indices"], text_ids)
        limits = self.row_limits(text_ids)  # (B,) tokens each row has room for: the cache needs no more
        new_tokens = min(max_new_tokens, int(limits.max()))
        prefill_out, cache = prefill(self.runners["prefill"], self.prefill_feeds(batch), new_tokens, self.steps)
        clock.lap("prefill")
        generated = self.decode(prefill_out, cache, batch.next_position, max_new_tokens, limits, num_beams)
        clock.lap("decode")
        timings = clock.summary()
        reasons = finish_reasons(generated, limits, max_new_tokens)
        return [
            Answer(
                answer=self.text.decode(ids),
                token_ids=ids,
                kept_indices=visual["kept_indices"][row].tolist(),
                timings_ms=timings,
                extra={"self_kv_bytes": cache.nbytes * num_beams // len(generated)},  # N beams: N rows each
                finish_reason=reasons[row],
            )
            for row, ids in enumerate(generated)
        ]
