"""Greedy decoding with an explicit KV cache: the loop every family's pipeline runs after its prefill."""
from __future__ import annotations

from typing import Callable

import numpy as np


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
