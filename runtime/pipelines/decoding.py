"""Prefill, one decode step, and the greedy loop over a preallocated KV cache (gpt-fast's ``KVCache`` model).

    prefill(runner, feeds, max_new_tokens)  → outputs, KVCache     the prompt's keys/values fill slots 0…T-1
    decode_step(runner, cache, tokens, …)   → logits; writes slot T, T+1, … in place
    DecodeStep(runner, cache, constant)     the same as a callable, over bound buffers where the runner binds
    greedy_decode(step, logits, …)          argmax, EOS / limits, optional per-token callback

The cache is allocated once per request for ``B × (T + max_new_tokens − 1)`` slots (the last token is never fed
back) and never copied: the decode graph reads the whole buffer with a mask of its filled slots and returns only
the new token's key/value, which ``KVCache.append`` writes into the next slot by position
(``export/models/kv_cache.py`` has the graph side). Every row of a left-padded batch fills the same slot at each
step; their positions (``position_ids``) differ.

Three ways to run a step, same numbers: ``runner.run(feeds)`` (host numpy in, fresh numpy out); where the runner
offers ``bind`` (ONNX Runtime's IO binding), inputs and outputs bound once per request to fixed host buffers, each
step only overwriting the token and position in place; where it offers ``resident_step`` (TensorRT), the cache is
copied to the device once and each step's keys/values are written into it there, only the token, position, mask
and logits crossing the bus. ``DecodeStep(..., bind=True)`` picks the last the runner has.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from runtime.backends.base import Runner
from runtime.errors import BackendError

CACHE_INPUT, PREFILL_OUTPUT, STEP_OUTPUT = "past.", "present.", "new."
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]  # (step, tokens (B,), finished (B,) bool)


class KVCache:
    """Self-attention keys/values of one request: ``past.{i}.key|value`` buffers (B, KV, C, Dh) and their
    ``attention_mask`` (B, C) int64, 1 on filled slots; ``length`` slots are filled (the same for every row)."""

    def __init__(self, prompt: dict[str, np.ndarray], prompt_mask: np.ndarray, capacity: int):
        """prompt: the prefill's ``present.{i}.key|value`` (B, KV, T, Dh); prompt_mask (B, T); capacity C ≥ T."""
        batch, width = prompt_mask.shape
        self.capacity, self.length = capacity, width
        self.tensors: dict[str, np.ndarray] = {}
        for name, value in prompt.items():
            buffer = np.zeros((*value.shape[:2], capacity, value.shape[3]), dtype=value.dtype)  # (B, KV, C, Dh)
            buffer[:, :, :width] = value
            self.tensors[CACHE_INPUT + name[len(PREFILL_OUTPUT):]] = buffer
        self.mask = np.zeros((batch, capacity), dtype=np.int64)  # (B, C)
        self.mask[:, :width] = prompt_mask

    @classmethod
    def from_prefill(cls, outputs: dict[str, np.ndarray], prompt_mask: np.ndarray, max_new_tokens: int) -> "KVCache":
        prompt = {name: value for name, value in outputs.items() if name.startswith(PREFILL_OUTPUT)}
        return cls(prompt, prompt_mask, prompt_mask.shape[1] + max(max_new_tokens - 1, 0))

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (every ``past.*`` buffer, all rows, at its full capacity)."""
        return int(sum(buffer.nbytes for buffer in self.tensors.values()))

    def feeds(self) -> dict[str, np.ndarray]:
        """The decode graph's cache inputs: every ``past.*`` buffer and the mask, the arrays themselves."""
        return {**self.tensors, "attention_mask": self.mask}

    def next_slot(self) -> int:
        """The slot the next step's keys/values go to, checked before anything is written there."""
        if self.length >= self.capacity:
            raise BackendError(f"the KV cache is full ({self.capacity} slots): more decode steps than it was sized for")
        return self.length

    def append(self, step_outputs: dict[str, np.ndarray]) -> None:
        """Write a step's ``new.{i}.key|value`` (B, KV, 1, Dh) into the next slot, in place."""
        slot = self.next_slot()
        for name, value in step_outputs.items():
            if name.startswith(STEP_OUTPUT):
                self.tensors[CACHE_INPUT + name[len(STEP_OUTPUT):]][:, :, slot] = value[:, :, 0]
        self.advance()

    def advance(self) -> None:
        """Mark the next slot filled (``append`` after writing it; a device-resident cache after writing it there)."""
        self.mask[:, self.next_slot()] = 1
        self.length += 1


def prefill(runner: Runner, feeds: dict[str, np.ndarray], max_new_tokens: int) -> tuple[dict[str, np.ndarray], KVCache]:
    """Run the prompt; its keys/values fill a cache sized for ``max_new_tokens`` more. feeds must hold the
    prompt's ``attention_mask`` (B, T)."""
    outputs = runner.run(feeds)
    return outputs, KVCache.from_prefill(outputs, feeds["attention_mask"], max_new_tokens)


def decode_step(runner: Runner, cache: KVCache, tokens: np.ndarray, positions: np.ndarray,
                constant: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """One decode-graph call: tokens (B,) at positions (B,) over the cache → logits (B, V); the new keys/values are
    written into the cache's next slot."""
    outputs = runner.run({"input_ids": tokens.astype(np.int64)[:, None], "position_ids": positions.astype(np.int64)[:, None],
                          **cache.feeds(), **(constant or {})})  # (B, 1) each, the cache, the request's constants
    cache.append(outputs)
    return outputs["logits"]


class DecodeStep:
    """``step(tokens (B,), positions (B,)) → logits (B, V)``: one decode-graph call that then writes the new
    keys/values into the cache. ``constant`` feeds (Mllama's cross-attention keys/values and masks) stay fixed for
    the request. With ``bind`` and a runner that has ``bind``, every buffer is bound once and reused (the returned
    logits are then overwritten by the next step: copy them to keep them)."""

    def __init__(self, runner: Runner, cache: KVCache, constant: dict[str, np.ndarray] | None = None, bind: bool = False):
        self.runner, self.cache, self.constant = runner, cache, constant or {}
        self.bound: Callable[[], None] | None = None
        self.resident: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        if bind and hasattr(runner, "resident_step"):  # the cache moves to the device once and stays there
            self.resident = runner.resident_step(cache, self.constant)
        elif bind and hasattr(runner, "bind"):
            batch = cache.mask.shape[0]
            self.input_ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1), overwritten in place each step
            self.position_ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1)
            self.outputs = self._output_buffers()
            inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, **cache.feeds(), **self.constant}
            self.bound = runner.bind({name: inputs[name] for name in runner.input_names}, self.outputs)

    def _output_buffers(self) -> dict[str, np.ndarray]:
        """Host buffers for the step's outputs: logits (B, V) float32 and ``new.*`` (B, KV, 1, Dh) like the cache."""
        spec = getattr(self.runner, "output_shapes", None)
        if spec is None:
            raise BackendError("this runner can bind buffers but does not say its output shapes")
        batch = self.cache.mask.shape[0]
        buffers = {}
        for name in self.runner.output_names:
            if name.startswith(STEP_OUTPUT):
                like = self.cache.tensors[CACHE_INPUT + name[len(STEP_OUTPUT):]]  # (B, KV, C, Dh)
                buffers[name] = np.empty((batch, like.shape[1], 1, like.shape[3]), dtype=like.dtype)
            else:
                shape, dtype = spec[name]
                buffers[name] = np.empty((batch, *shape[1:]), dtype=dtype)
        return buffers

    def __call__(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.resident is not None:
            return self.resident(tokens, positions)
        if self.bound is None:
            return decode_step(self.runner, self.cache, tokens, positions, self.constant)
        self.input_ids[:, 0] = tokens  # the bound buffers, overwritten in place
        self.position_ids[:, 0] = positions
        self.bound()
        self.cache.append(self.outputs)
        return self.outputs["logits"]


def greedy_decode(
    step: Callable[[np.ndarray, np.ndarray], np.ndarray],
    logits: np.ndarray,
    next_position: np.ndarray,
    eos_token_ids: list[int],
    pad_token_id: int,
    max_new_tokens: int,
    row_limits: np.ndarray | None = None,
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """Greedy decoding. logits (B, V) from the prefill; next_position (B,) the first generated token's position;
    ``step(tokens, positions)`` runs one decode step and returns the next logits.

    Returns the generated ids per row, EOS excluded. A row finishes at EOS, at ``max_new_tokens``, or at its own
    ``row_limits[row]`` tokens (the model's position limit); finished rows are fed padding (as HF does) until
    every row has finished. ``on_token(step, tokens, finished)`` is called after every chosen token (streaming,
    per-token timing).
    """
    batch = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, dtype=bool)
    limits = np.full(batch, max_new_tokens) if row_limits is None else np.minimum(row_limits, max_new_tokens)
    position = next_position.astype(np.int64).copy()  # (B,)
    for index in range(max_new_tokens):
        tokens = logits.argmax(axis=-1).astype(np.int64)  # (B,) first maximum on ties, as torch.argmax
        tokens = np.where(finished, pad_token_id, tokens)
        for row in range(batch):
            if not finished[row]:
                if int(tokens[row]) in eos_token_ids:
                    finished[row] = True
                else:
                    generated[row].append(int(tokens[row]))
                    finished[row] = len(generated[row]) >= limits[row]
        if on_token is not None:
            on_token(index, tokens, finished)
        if finished.all() or index == max_new_tokens - 1:
            break
        logits = step(tokens, position)
        position = position + 1
    return generated
