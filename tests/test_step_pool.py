"""Bound decode steps kept between requests (``StepPool``): a refilled cache holds what a new one would, a kept
step is reused only by a request of its shapes and never by two requests at once, the pool stays within its
bytes, and answers through kept steps equal answers through fresh ones, logits included (BLIP-2; Mllama, whose
cross-attention keys/values are rebound per request, in the slow tier)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.pipelines.decoding import DecodeStep, KVCache, StepPool


def prompt_outputs(seed: int, batch: int = 2, width: int = 4) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    outputs = {f"present.{layer}.{kind}": rng.standard_normal((batch, 3, width, 5)).astype(np.float32)
               for layer in range(2) for kind in ("key", "value")}
    mask = np.ones((batch, width), np.int64)
    mask[0, : seed % width] = 0  # left padding differs per prompt
    return outputs, mask


def test_refill_holds_what_a_new_cache_holds():
    first, first_mask = prompt_outputs(1)
    cache = KVCache.from_prefill(first, first_mask, max_new_tokens=4)
    for _ in range(3):  # a whole request's steps: slots after the prompt written
        cache.append({f"new.{layer}.{kind}": np.full((2, 3, 1, 5), 9, np.float32)
                      for layer in range(2) for kind in ("key", "value")})
    second, second_mask = prompt_outputs(2)
    cache.refill(second, second_mask)
    fresh = KVCache.from_prefill(second, second_mask, max_new_tokens=4)
    assert cache.length == fresh.length == 4 and cache.capacity == fresh.capacity
    np.testing.assert_array_equal(cache.mask, fresh.mask)
    for name, buffer in fresh.tensors.items():
        np.testing.assert_array_equal(cache.tensors[name], buffer)


class _BindingRunner:
    """Stands in for an ONNX Runtime runner: ``bind`` counted, the call a no-op."""

    input_names = ["input_ids", "position_ids", "attention_mask", "past.0.key", "past.0.value", "past.1.key",
                   "past.1.value"]
    output_names = ["logits", "new.0.key", "new.0.value", "new.1.key", "new.1.value"]
    output_shapes = {"logits": (["batch", 7], np.float32)}

    def __init__(self):
        self.binds = 0

    def bind(self, inputs, outputs):
        self.binds += 1
        return lambda: None


def test_pool_reuses_a_step_for_its_shapes_only_and_never_lends_it_twice():
    runner, pool = _BindingRunner(), StepPool()
    outputs, mask = prompt_outputs(1)
    cache = pool.cache(outputs, mask, max_new_tokens=3)
    step = pool.step(runner, cache, {})
    assert runner.binds == 1
    twin = pool.cache(outputs, mask, max_new_tokens=3)  # a concurrent request of the same shapes: its own buffers
    assert twin is not cache and pool.step(runner, twin, {}) is not step and runner.binds == 2
    pool.release(cache)
    pool.release(twin)
    again = pool.cache(*prompt_outputs(3), max_new_tokens=3)  # same shapes, other values
    assert again in (cache, twin) and runner.binds == 2
    assert pool.step(runner, again, {}).cache is again and runner.binds == 2
    other = pool.cache(outputs, mask, max_new_tokens=5)  # another capacity: a new cache
    wider = pool.cache(*prompt_outputs(1, width=6), max_new_tokens=3)  # another prompt width: a new cache
    assert {id(other), id(wider)}.isdisjoint({id(cache), id(twin)})
    assert isinstance(pool.step(runner, other, {}), DecodeStep) and runner.binds == 3


def test_pool_keeps_at_most_max_bytes_least_recently_used_dropped():
    runner = _BindingRunner()
    one_cache = KVCache.from_prefill(*prompt_outputs(1), max_new_tokens=3).nbytes
    pool = StepPool(max_bytes=2 * one_cache + one_cache // 2)  # room for two
    caches = [pool.cache(*prompt_outputs(1), max_new_tokens=new) for new in (2, 3, 4)]  # three shapes
    for cache in caches:
        pool.step(runner, cache, {})
        pool.release(cache)
    assert sum(step.cache.nbytes for step in pool.kept.values()) <= pool.max_bytes and len(pool.kept) == 2
    assert pool.cache(*prompt_outputs(1), max_new_tokens=2) is not caches[0]  # the oldest was dropped
    assert pool.cache(*prompt_outputs(1), max_new_tokens=4) is caches[2]
    big = StepPool(max_bytes=2 * one_cache)  # a step's bound constant feeds count too
    cache = big.cache(*prompt_outputs(1), max_new_tokens=3)
    big.step(runner, cache, {"cross": np.zeros(one_cache // 4 * 2, np.float32)})  # 2 caches' bytes more
    big.release(cache)
    assert not big.kept
    nothing = StepPool(max_bytes=0)
    cache = nothing.cache(*prompt_outputs(1), max_new_tokens=2)
    nothing.step(runner, cache, {})
    nothing.release(cache)
    assert not nothing.kept


class _CountingRunner:
    """An ONNX Runtime runner whose ``bind`` calls are counted (everything else passes through)."""

    def __init__(self, runner):
        self._runner, self.binds = runner, 0

    def bind(self, inputs, outputs):
        self.binds += 1
        return self._runner.bind(inputs, outputs)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def answers_through(pipeline, requests, monkeypatch):
    """Token ids and every step's logits per request, and the decode step objects used."""
    seen: list = []
    steps: set[int] = set()
    call = DecodeStep.__call__

    def recording(self, tokens, positions):
        logits = call(self, tokens, positions)
        seen.append(logits.copy())
        steps.add(id(self))
        return logits

    monkeypatch.setattr(DecodeStep, "__call__", recording)
    results = []
    for images, questions in requests:
        seen.clear()
        answers = pipeline.answer(images, questions, max_new_tokens=6)
        results.append(([answer.token_ids for answer in answers], [logits for logits in seen]))
    monkeypatch.setattr(DecodeStep, "__call__", call)
    return results, steps


def check_kept_steps_answer_as_fresh_ones(manifest, requests, monkeypatch):
    from runtime.backends import load_runners
    from runtime.pipelines import make_pipeline

    runners = load_runners(manifest, "ort-cpu")
    counted = _CountingRunner(runners["decode"])
    pooled = make_pipeline(manifest, {**runners, "decode": counted})
    pooled.io_binding = True
    fresh = make_pipeline(manifest, runners)
    fresh.io_binding = True
    fresh.steps = StepPool(max_bytes=0)  # keeps nothing: a new cache and binding per request
    kept_results, kept_steps = answers_through(pooled, requests, monkeypatch)
    fresh_results, fresh_steps = answers_through(fresh, requests, monkeypatch)
    assert counted.binds == 1 and len(kept_steps) == 1, "every request has the same shapes: one binding for all"
    assert len(fresh_steps) == len(requests)
    for (kept_ids, kept_logits), (fresh_ids, fresh_logits) in zip(kept_results, fresh_results):
        assert kept_ids == fresh_ids
        assert len(kept_logits) == len(fresh_logits) > 0
        for kept, new in zip(kept_logits, fresh_logits):
            np.testing.assert_array_equal(kept, new)


def test_kept_steps_answer_as_fresh_ones_blip2(engines, monkeypatch):
    from runtime.manifest import Manifest

    def request(values):
        return [Image.fromarray(np.full((64, 64, 3), value, np.uint8)) for value in values]

    questions = ["what shape is it?", "what color is it?"]  # the same prompt widths in every request
    requests = [(request((40, 200)), questions), (request((120, 10)), questions[::-1]), (request((40, 200)), questions)]
    check_kept_steps_answer_as_fresh_ones(Manifest.load(engines), requests, monkeypatch)


@pytest.mark.slow
def test_kept_steps_answer_as_fresh_ones_mllama(tmp_path, monkeypatch):
    """Mllama's decode graph takes the request's cross-attention keys/values as constant feeds: a kept step rebinds
    them per request."""
    from conftest import run_cli
    from export.tiny import make_tiny_mllama
    from runtime.manifest import Manifest

    checkpoint = make_tiny_mllama(tmp_path / "tiny-mllama")
    engines = tmp_path / "engines"
    run_cli("export/build.py", "--model", str(checkpoint), "--ratio", "0.5", "--out", str(engines), "--quiet", check=True)
    rng = np.random.default_rng(0)

    def request():
        return [Image.fromarray(rng.integers(0, 255, (40, 100, 3), dtype=np.uint8)) for _ in range(2)]

    questions = ["what color is the shape?", "what shape is in it?"]
    requests = [(request(), questions), (request(), questions[::-1]), (request(), questions)]
    check_kept_steps_answer_as_fresh_ones(Manifest.load(engines), requests, monkeypatch)
