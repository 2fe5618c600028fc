"""The preallocated KV cache: the graph side (attention over a static-length cache equals attention over the
concatenated past), the runtime side (slots written in place by position, the mask, the capacity), the greedy
loop's per-token callback, and ONNX Runtime's IO binding giving the same tokens and logits as plain runs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.errors import BackendError
from runtime.pipelines.decoding import DecodeStep, KVCache, greedy_decode


def test_cached_attention_equals_attention_over_the_concatenated_past():
    import torch

    from export.models.kv_cache import attend_cached, cache_bias

    generator = torch.Generator().manual_seed(0)
    batch, heads, filled, capacity, head_dim = 2, 3, 5, 9, 4
    query, new_key, new_value = (torch.randn(batch, heads, 1, head_dim, generator=generator) for _ in range(3))
    past_key, past_value = (torch.randn(batch, heads, filled, head_dim, generator=generator) for _ in range(2))
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left padded
    # the reference: HF-style attention over [past, new] with the padding masked
    keys, values = torch.cat([past_key, new_key], 2), torch.cat([past_value, new_value], 2)
    scores = query @ keys.transpose(-1, -2) + torch.cat([(1 - padding) * torch.finfo(torch.float32).min,
                                                         torch.zeros(batch, 1)], 1)[:, None, None, :]
    expected = torch.softmax(scores, -1) @ values  # (B, H, 1, Dh)
    # the static cache: the same past in the first slots, garbage in the unfilled ones
    cache_key = torch.randn(batch, heads, capacity, head_dim, generator=generator) * 100
    cache_value = torch.randn(batch, heads, capacity, head_dim, generator=generator) * 100
    cache_key[:, :, :filled], cache_value[:, :, :filled] = past_key, past_value
    mask = torch.zeros(batch, capacity, dtype=torch.long)
    mask[:, :filled] = padding
    actual = attend_cached(query, new_key, new_value, cache_key, cache_value, cache_bias(mask))
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_cache_is_filled_by_position_in_place():
    prompt = {"present.0.key": np.ones((2, 3, 4, 5), np.float32), "present.0.value": np.full((2, 3, 4, 5), 2, np.float32)}
    prompt_mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    cache = KVCache.from_prefill({**prompt, "logits": np.zeros((2, 7), np.float32)}, prompt_mask, max_new_tokens=3)
    assert cache.capacity == 6 and cache.length == 4  # T + max_new_tokens - 1: the last token is never fed back
    buffer = cache.tensors["past.0.key"]
    assert buffer.shape == (2, 3, 6, 5) and not buffer[:, :, 4:].any()
    np.testing.assert_array_equal(cache.mask, [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    cache.append({"logits": np.zeros((2, 7)), "new.0.key": np.full((2, 3, 1, 5), 7, np.float32),
                  "new.0.value": np.full((2, 3, 1, 5), 8, np.float32)})
    assert cache.tensors["past.0.key"] is buffer, "written in place, not reallocated"
    assert (buffer[:, :, 4] == 7).all() and (cache.tensors["past.0.value"][:, :, 4] == 8).all() and not buffer[:, :, 5].any()
    np.testing.assert_array_equal(cache.mask[:, 4], [1, 1])
    cache.append({"new.0.key": np.zeros((2, 3, 1, 5), np.float32), "new.0.value": np.zeros((2, 3, 1, 5), np.float32)})
    with pytest.raises(BackendError, match="KV cache is full"):
        cache.append({"new.0.key": np.zeros((2, 3, 1, 5), np.float32)})


def test_greedy_decode_calls_back_per_token_and_stops_at_eos():
    vocab, eos = 6, 5
    script = iter([[0, 0, 0, 9, 0, 0], [0, 0, 0, 0, 0, 9]])  # after the prefill's 1: 3, then EOS

    def step(tokens, positions):
        return np.array([next(script)], dtype=np.float32)

    seen = []
    first = np.eye(vocab, dtype=np.float32)[[1]]  # (1, V): argmax 1
    generated = greedy_decode(step, first, np.array([4]), [eos], 0, max_new_tokens=10,
                              on_token=lambda index, tokens, finished: seen.append((index, int(tokens[0]), bool(finished[0]))))
    assert generated == [[1, 3]]
    assert seen == [(0, 1, False), (1, 3, False), (2, eos, True)]


class _PlainRunner:
    """An ORT runner without ``bind``: what DecodeStep falls back to (and what parity's recorders look like)."""

    def __init__(self, runner):
        self.runner, self.input_names, self.output_names = runner, runner.input_names, runner.output_names

    def run(self, feeds):
        return self.runner.run(feeds)


def test_io_binding_gives_the_same_tokens_and_logits(engines):
    from runtime.backends import load_runners
    from runtime.manifest import Manifest
    from runtime.pipelines import make_pipeline

    manifest = Manifest.load(engines)
    runners = load_runners(manifest, "ort-cpu")
    images = [Image.fromarray(np.full((64, 64, 3), value, np.uint8)) for value in (40, 200)]
    questions = ["what shape is it?", "what color?"]
    results = {}
    for bind in (False, True):
        pipeline = make_pipeline(manifest, runners)
        pipeline.io_binding = bind
        logits_seen = []
        step_class_call = DecodeStep.__call__

        def recording_call(self, tokens, positions, _call=step_class_call, _seen=logits_seen):
            logits = _call(self, tokens, positions)
            _seen.append(logits.copy())
            assert (self.bound is not None) == bind
            return logits

        DecodeStep.__call__ = recording_call
        try:
            answers = pipeline.answer(images, questions, max_new_tokens=6)
        finally:
            DecodeStep.__call__ = step_class_call
        results[bind] = ([a.token_ids for a in answers], logits_seen)
    assert results[True][0] == results[False][0]
    assert len(results[True][1]) == len(results[False][1]) > 0
    for bound, plain in zip(results[True][1], results[False][1]):
        np.testing.assert_allclose(bound, plain, rtol=0, atol=1e-6)
    # a runner without bind falls back to run() even when binding is asked for
    pipeline = make_pipeline(manifest, {name: _PlainRunner(runner) for name, runner in runners.items()})
    pipeline.io_binding = True
    assert [a.token_ids for a in pipeline.answer(images, questions, max_new_tokens=6)] == results[False][0]


def test_infer_io_binding_flag(engines):
    import json

    from conftest import REPO, run_cli

    sample = REPO / "samples" / "easyvqa-test-0.png"

    records = {}
    for mode in ("off", "on", "auto"):
        result = run_cli("runtime/infer.py", "--engines", engines, "--image", sample, "--question", "what shape?",
                         "--json", "--io-binding", mode, check=True)
        record = json.loads(result.stdout)
        records[mode] = (record["answer"], record["token_ids"])
    assert records["off"] == records["on"] == records["auto"]
    result = run_cli("runtime/infer.py", "--engines", engines, "--image", sample, "--question", "q", "--io-binding", "yes")
    assert result.returncode == 2 and "--io-binding" in result.stderr
