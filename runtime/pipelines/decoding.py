"""Prefill, one decode step, and the greedy loop over a preallocated KV cache (gpt-fast's ``KVCache`` model).

    prefill(runner, feeds, max_new_tokens)  → outputs, KVCache     the prompt's keys/values fill slots 0…T-1
    decode_step(runner, cache, tokens, …)   → logits; writes slot T, T+1, … in place
    DecodeStep(runner, cache, constant)     the same as a callable, over bound buffers where the runner binds
    StepPool()                              bound steps (cache + binding) kept for the next request of their shapes
    greedy_decode(step, logits, …)          argmax, EOS / limits, optional per-token callback
    beam.beam_search(step, logits, …)       HF ``generate(num_beams=N)``: N hypotheses per question, the cache's
                                            rows reordered in place after every step (``KVCache.reorder``)

The cache is sized per request for ``B × (T + max_new_tokens − 1)`` slots (the last token is never fed back), kept
with its binding for the next request of the same shapes (``StepPool``), and never copied: the decode graph reads
the whole buffer with a mask of its filled slots and returns only the new token's key/value, which
``KVCache.append`` writes into the next slot by position
(``export/models/kv_cache.py`` has the graph side). Every row of a left-padded batch fills the same slot at each
step; their positions (``position_ids``) differ.

Three ways to run a step, same numbers: ``runner.run(feeds)`` (host numpy in, fresh numpy out); where the runner
offers ``bind`` (ONNX Runtime's IO binding), inputs and outputs bound once per request to fixed host buffers, each
step only overwriting the token and position in place; where it offers ``resident_step`` (TensorRT), the cache is
copied to the device once and each step's keys/values are written into it there, only the token, position, mask
and logits crossing the bus. ``DecodeStep(..., bind=True)`` picks the last the runner has.

Beam search runs B × N rows through the decode graph: after the prefill (at B rows) the first logits, the cache and
the constant feeds are repeated N times per row (``KVCache.repeat_rows``, HF's ``_expand_inputs_for_generation``);
after every step the chosen hypotheses' rows are gathered into place in the same buffers (``KVCache.reorder``, HF's
``Cache.reorder_cache``), so bound buffers stay bound. The device-resident cache has no reorder: beams decode
through bound host buffers or plain runs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from runtime.backends.base import Runner
from runtime.errors import BackendError

CACHE_INPUT, PREFILL_OUTPUT, STEP_OUTPUT = "past.", "present.", "new."
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]  # (step, tokens (B,), finished (B,) bool)


class KVCache:
    """Self-attention keys/values of one request: ``past.{i}.key|value`` buffers (B, KV, C, Dh) and their
    ``attention_mask`` (B, C) int64, 1 on filled slots; ``length`` slots are filled (the same for every row)."""

    pool_key: tuple | None = None  # its shapes, where a StepPool may keep it
    bound_step: "DecodeStep | None" = None  # the StepPool's bound step over these buffers

    def __init__(self, prompt: dict[str, np.ndarray], prompt_mask: np.ndarray, capacity: int):
        """prompt: the prefill's ``present.{i}.key|value`` (B, KV, T, Dh); prompt_mask (B, T); capacity C ≥ T.
        Buffers of one shape and dtype (every layer's, in the families here) are views of one ``stacked`` array
        (L·2, B, KV, C, Dh), so that a step's keys/values go in with one copy (:class:`DecodeStep`)."""
        batch, width = prompt_mask.shape
        self.capacity, self.length = capacity, width
        names = [CACHE_INPUT + name[len(PREFILL_OUTPUT):] for name in prompt]
        values = list(prompt.values())
        kinds = {(value.shape[:2] + value.shape[3:], value.dtype) for value in values}
        self.stacked: np.ndarray | None = None
        if len(kinds) == 1:
            shape, dtype = kinds.pop()
            self.stacked = np.zeros((len(values), *shape[:2], capacity, shape[2]), dtype=dtype)  # (L·2, B, KV, C, Dh)
            self.tensors = dict(zip(names, self.stacked))
        else:
            self.tensors = {name: np.zeros((*value.shape[:2], capacity, value.shape[3]), dtype=value.dtype)
                            for name, value in zip(names, values)}  # (B, KV, C, Dh) each
        self.mask = np.zeros((batch, capacity), dtype=np.int64)  # (B, C)
        self.refill(prompt, prompt_mask)

    @staticmethod
    def prompt_of(outputs: dict[str, np.ndarray], prompt_mask: np.ndarray, max_new_tokens: int) -> tuple[dict, int]:
        """The prefill's ``present.*`` outputs and the capacity a cache for ``max_new_tokens`` more needs."""
        prompt = {name: value for name, value in outputs.items() if name.startswith(PREFILL_OUTPUT)}
        return prompt, prompt_mask.shape[1] + max(max_new_tokens - 1, 0)

    @classmethod
    def from_prefill(cls, outputs: dict[str, np.ndarray], prompt_mask: np.ndarray, max_new_tokens: int) -> "KVCache":
        prompt, capacity = cls.prompt_of(outputs, prompt_mask, max_new_tokens)
        return cls(prompt, prompt_mask, capacity)

    def refill(self, prompt: dict[str, np.ndarray], prompt_mask: np.ndarray) -> None:
        """Start over with another prompt of the same shapes, in the same buffers: what a new cache would hold (the
        prompt's slots, zeros after them), so buffers bound to a runner stay bound (:class:`StepPool`)."""
        width = prompt_mask.shape[1]
        for name, value in prompt.items():
            self.tensors[CACHE_INPUT + name[len(PREFILL_OUTPUT):]][:, :, :width] = value  # (B, KV, C, Dh)
        if self.stacked is not None:  # every layer's empty slots in one fill
            self.stacked[:, :, :, width:] = 0  # (L·2, B, KV, C - T, Dh)
        else:
            for buffer in self.tensors.values():
                buffer[:, :, width:] = 0
        self.mask[:] = 0  # (B, C)
        self.mask[:, :width] = prompt_mask
        self.length = width

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

    def repeat_rows(self, times: int) -> "KVCache":
        """A cache of B × ``times`` rows, each row repeated ``times`` times in a row (B → B·N, as HF expands inputs
        for beam search); fresh buffers, so call it before any are bound."""
        repeated = object.__new__(KVCache)
        repeated.capacity, repeated.length, repeated.stacked = self.capacity, self.length, None
        repeated.tensors = {name: np.repeat(buffer, times, axis=0)  # (B·N, KV, C, Dh)
                            for name, buffer in self.tensors.items()}
        repeated.mask = np.repeat(self.mask, times, axis=0)  # (B·N, C)
        return repeated

    def reorder(self, rows: np.ndarray) -> None:
        """Row ``r`` of every buffer becomes row ``rows[r]`` (the hypotheses a beam step kept), written in place: the
        same arrays, so buffers bound to ONNX Runtime stay bound. Only the filled slots are copied."""
        rows = np.asarray(rows, dtype=np.int64)  # (B·N,)
        if np.array_equal(rows, np.arange(len(rows))):
            return
        filled = self.length
        for buffer in self.tensors.values():  # (B·N, KV, C, Dh)
            buffer[:, :, :filled] = buffer[rows, :, :filled]  # the gather copies first, then writes in place
        self.mask[:] = self.mask[rows]  # (B·N, C)

    def advance(self) -> None:
        """Mark the next slot filled (``append`` after writing it; a device-resident cache after writing it there)."""
        self.mask[:, self.next_slot()] = 1
        self.length += 1


def prefill(runner: Runner, feeds: dict[str, np.ndarray], max_new_tokens: int,
            pool: "StepPool | None" = None) -> tuple[dict[str, np.ndarray], KVCache]:
    """Run the prompt; its keys/values fill a cache sized for ``max_new_tokens`` more (a kept one of the same
    shapes from ``pool`` where it has one). feeds must hold the prompt's ``attention_mask`` (B, T)."""
    outputs = runner.run(feeds)
    if pool is not None:
        return outputs, pool.cache(outputs, feeds["attention_mask"], max_new_tokens)
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

    def __init__(self, runner: Runner, cache: KVCache, constant: dict[str, np.ndarray] | None = None, bind: bool = False,
                 resident: bool = True):
        """``resident`` False: never the device-resident cache (beam search reorders the host cache)."""
        self.runner, self.cache, self.constant = runner, cache, constant or {}
        self.bound: Callable[[], None] | None = None
        self.resident: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        if bind and resident and hasattr(runner, "resident_step"):  # the cache moves to the device once and stays there
            self.resident = runner.resident_step(cache, self.constant)
        elif bind and hasattr(runner, "bind"):
            batch = cache.mask.shape[0]
            self.input_ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1), overwritten in place each step
            self.position_ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1)
            self.outputs = self._output_buffers()
            inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, **cache.feeds(), **self.constant}
            self.bound = runner.bind({name: inputs[name] for name in runner.input_names}, self.outputs)
            # what each step's append copies: (cache buffer, the step's new keys/values), every layer at once where
            # both are stacked (L·2, B, KV, C | 1, Dh), else per layer (B, KV, C | 1, Dh)
            if self.new_stacked is not None:
                self.appends = [(cache.stacked, self.new_stacked[:, :, :, 0], 3)]
            else:
                self.appends = [(cache.tensors[CACHE_INPUT + name[len(STEP_OUTPUT):]], buffer[:, :, 0], 2)
                                for name, buffer in self.outputs.items() if name.startswith(STEP_OUTPUT)]

    @property
    def nbytes(self) -> int:
        """Bytes the step holds on to: its cache and the constant feeds bound with it."""
        return self.cache.nbytes + sum(int(value.nbytes) for value in self.constant.values())

    def use_constants(self, constant: dict[str, np.ndarray]) -> bool:
        """Bound steps kept for another request (:class:`StepPool`): bind that request's constant feeds in place of
        the last one's; False where the bound call cannot rebind them (then the step is not reused)."""
        if constant.keys() != self.constant.keys() or (constant and not hasattr(self.bound, "rebind")):
            return False
        for name, value in constant.items():
            self.bound.rebind(name, value)
        self.constant = constant
        return True

    def _output_buffers(self) -> dict[str, np.ndarray]:
        """Host buffers for the step's outputs: logits (B, V) float32 and ``new.*`` (B, KV, 1, Dh) like the cache."""
        spec = getattr(self.runner, "output_shapes", None)
        if spec is None:
            raise BackendError("this runner can bind buffers but does not say its output shapes")
        batch = self.cache.mask.shape[0]
        buffers = {}
        self.new_stacked = None
        stacked = self.cache.stacked  # (L·2, B, KV, C, Dh)
        if stacked is not None and {STEP_OUTPUT + name[len(CACHE_INPUT):] for name in self.cache.tensors} <= set(
                self.runner.output_names):
            self.new_stacked = np.empty((*stacked.shape[:3], 1, stacked.shape[4]), dtype=stacked.dtype)  # (L·2, B, KV, 1, Dh)
            for name, new in zip(self.cache.tensors, self.new_stacked):  # the cache's order
                buffers[STEP_OUTPUT + name[len(CACHE_INPUT):]] = new
        for name in self.runner.output_names:
            if name in buffers:
                continue
            if name.startswith(STEP_OUTPUT):
                like = self.cache.tensors[CACHE_INPUT + name[len(STEP_OUTPUT):]]  # (B, KV, C, Dh)
                buffers[name] = np.empty((batch, like.shape[1], 1, like.shape[3]), dtype=like.dtype)
            else:
                shape, dtype = spec[name]
                buffers[name] = np.empty((batch, *shape[1:]), dtype=dtype)
        return buffers

    def reorder(self, rows: np.ndarray) -> None:
        """Beam search: the cache's row ``r`` becomes row ``rows[r]``, in place (bound buffers stay bound)."""
        if self.resident is not None:
            raise BackendError("the device-resident KV cache cannot be reordered for beam search")
        self.cache.reorder(rows)

    def __call__(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.resident is not None:
            return self.resident(tokens, positions)
        if self.bound is None:
            return decode_step(self.runner, self.cache, tokens, positions, self.constant)
        self.input_ids[:, 0] = tokens  # the bound buffers, overwritten in place
        self.position_ids[:, 0] = positions
        self.bound()
        slot = self.cache.next_slot()
        for buffer, value, axis in self.appends:  # KVCache.append, with the buffers looked up once
            buffer[(slice(None),) * axis + (slot,)] = value
        self.cache.advance()
        return self.outputs["logits"]


class StepPool:
    """Bound decode steps kept between requests, gpt-fast style (its caches are set up once, not per request): a
    request whose cache has the shapes of a kept step's (batch, prompt width, capacity) refills that step's cache
    (:meth:`KVCache.refill`: the same contents as a new cache) and decodes through its binding — no cache
    allocation and no bind per request (README "Speed"). A step is taken out while its cache is in use, so
    concurrent requests never share one; at most ``max_bytes`` are kept (caches and the constant feeds bound with
    them: a real checkpoint's are rarely worth keeping, its bind costs nothing next to its graphs), the least
    recently used dropped first."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.kept: OrderedDict[tuple, DecodeStep] = OrderedDict()
        self.lock = threading.Lock()

    def cache(self, outputs: dict[str, np.ndarray], prompt_mask: np.ndarray, max_new_tokens: int) -> KVCache:
        """``KVCache.from_prefill``, in a kept step's buffers where one has these shapes."""
        prompt, capacity = KVCache.prompt_of(outputs, prompt_mask, max_new_tokens)
        key = (tuple((name, value.shape, value.dtype.str) for name, value in prompt.items()), capacity)
        with self.lock:
            step = self.kept.pop(key, None)
        if step is None:
            cache = KVCache(prompt, prompt_mask, capacity)
            cache.pool_key = key
            return cache
        step.cache.refill(prompt, prompt_mask)
        return step.cache

    def step(self, runner: Runner, cache: KVCache, constant: dict[str, np.ndarray]) -> DecodeStep:
        """A bound step over ``cache``: the kept one it came with, else a new one (kept on ``release``)."""
        step = cache.bound_step
        if step is not None and step.runner is runner and step.use_constants(constant):
            return step
        cache.bound_step = DecodeStep(runner, cache, constant, bind=True)
        return cache.bound_step

    def release(self, cache: KVCache) -> None:
        """The request is done with ``cache``: keep its bound step for the next request of its shapes."""
        step = cache.bound_step
        if step is None or step.bound is None or cache.pool_key is None or step.nbytes > self.max_bytes:
            return
        with self.lock:
            self.kept.pop(cache.pool_key, None)
            self.kept[cache.pool_key] = step
            while sum(kept.nbytes for kept in self.kept.values()) > self.max_bytes:
                self.kept.popitem(last=False)


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
    finished = [False] * batch
    limits = [max_new_tokens] * batch if row_limits is None else np.minimum(row_limits, max_new_tokens).tolist()
    eos = set(eos_token_ids)
    tokens = np.empty(batch, dtype=np.int64)  # (B,) fed back: the chosen token, padding for finished rows
    position = next_position.astype(np.int64)  # (B,) a copy
    for index in range(max_new_tokens):
        chosen = logits.argmax(axis=-1).tolist()  # first maximum on ties, as torch.argmax; Python ints from here
        for row, token in enumerate(chosen):  # Python over rows: per-row numpy scalars cost more (README "Speed")
            if finished[row]:
                chosen[row] = pad_token_id
            elif token in eos:
                finished[row] = True
            else:
                generated[row].append(token)
                finished[row] = len(generated[row]) >= limits[row]
        tokens[:] = chosen
        if on_token is not None:
            on_token(index, tokens.copy(), np.array(finished))
        if all(finished) or index == max_new_tokens - 1:
            break
        logits = step(tokens, position)
        position = position + 1
    return generated
