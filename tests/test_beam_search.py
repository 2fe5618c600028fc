"""Beam search (``--num-beams``): the pure search on hand-made log-probability tables, the KV cache's in-place row
reorder, and the runtime's tokens through ONNX Runtime equal to HF ``generate(num_beams=N)`` on the tiny BLIP-2, the
tiny Mllama and the shipped default model, for batches of questions of different lengths (left padding)."""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import REPO, run_cli
from runtime.errors import UsageError
from runtime.pipelines.beam import beam_search
from runtime.pipelines.decoding import KVCache

EOS, A, B, C = 0, 1, 2, 3  # the hand-made vocabulary
QUESTIONS = ["what color is the shape?", "how many?", "is there a red circle in the image on the left side?",
             "what shape"]


# ------------------------------------------------------------------------------------------------ hand-made tables


class TableModel:
    """A fake decode graph: each row's next-token probabilities are looked up by the row's tokens so far, which
    the row's "cache" (``history``) holds — reordered by ``reorder`` exactly as the KV cache is."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], batch: int, num_beams: int, vocab: int = 4):
        self.table, self.vocab = table, vocab
        self.history: list[tuple[int, ...]] = [()] * (batch * num_beams)
        self.steps, self.positions = 0, []

    def logits(self) -> np.ndarray:
        out = np.full((len(self.history), self.vocab), math.log(1e-12), dtype=np.float32)  # (B·N, V) log-probabilities
        for row, prefix in enumerate(self.history):
            for token, p in self.table.get(prefix, {}).items():
                out[row, token] = math.log(p)
        return out

    def reorder(self, rows: np.ndarray) -> None:
        self.history = [self.history[r] for r in rows]

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.steps += 1
        self.positions.append(positions.copy())
        self.history = [prefix + (int(t),) for prefix, t in zip(self.history, tokens)]
        return self.logits()


def search(table, num_beams=2, max_new_tokens=3, batch=1, row_limits=None, eos=(EOS,), vocab=4):
    model = TableModel(table, batch, num_beams, vocab)
    ids, scores = beam_search(model.step, model.logits(), np.full(batch, 10), list(eos), max_new_tokens, num_beams,
                              model.reorder, row_limits)
    return ids, scores, model


def length_table(p_bbb: float):
    """Step 0: a .5, b .4, EOS .1 (EOS is third: outside the top N = 2, it may not finish). Step 1: a → EOS .9
    (``a EOS`` finishes: log(.5·.9) / 2 = −0.399), b → b .99. Step 2 (the last): b b → b ``p_bbb``, c the rest."""
    return {(): {A: 0.5, B: 0.4, EOS: 0.1}, (A,): {EOS: 0.9, A: 0.1}, (B,): {B: 0.99, EOS: 0.01},
            (B, B): {B: p_bbb, C: 1 - p_bbb}, (A, A): {A: 1.0}}


def test_longer_hypothesis_wins_by_length_normalisation():
    # "a EOS": sum −0.799 over 2 tokens = −0.399; "b b b": sum log(.4·.99·.99) = −0.936, higher per token (−0.312)
    ids, scores, model = search(length_table(0.99))
    assert ids == [[B, B, B]]
    assert scores[0] == pytest.approx(math.log(0.4 * 0.99 * 0.99) / 3, abs=1e-6)
    assert model.steps == 2 and [p.tolist() for p in model.positions] == [[10, 10], [11, 11]]


def test_shorter_hypothesis_wins_by_length_normalisation():
    # "b b b" now sums log(.4·.99·.6) = −1.437 → −0.479 per token, below "a EOS"'s −0.399: the shorter one wins
    ids, scores, _ = search(length_table(0.6))
    assert ids == [[A]]  # EOS excluded
    assert scores[0] == pytest.approx(math.log(0.5 * 0.9) / 2, abs=1e-6)


def test_only_the_top_n_candidates_may_finish():
    """EOS is third at step 0 (log .31 = −1.17): outside the top N = 2 it may not finish, although it would beat
    every two-token hypothesis (at best log(.35·.16) / 2 = −1.44 over a vocabulary of 8)."""
    rest = {A: 0.16, B: 0.15, C: 0.14, 4: 0.14, 5: 0.14, 6: 0.14, 7: 0.13}
    ids, scores, _ = search({(): {A: 0.35, B: 0.34, EOS: 0.31}, (A,): rest, (B,): rest}, max_new_tokens=2, vocab=8)
    assert ids == [[A, A]] and scores[0] == pytest.approx(math.log(0.35 * 0.16) / 2, abs=1e-6)


def test_search_stops_early_when_no_live_beam_can_beat_the_finished():
    """Both finished slots fill by step 1 and the best live hypothesis, scored at today's length, is worse than the
    worst finished one: HF's early_stopping=False heuristic ends the search long before max_new_tokens."""
    table = {(): {EOS: 0.6, A: 0.3, B: 0.1}, (A,): {EOS: 0.6, A: 0.4}, (B,): {B: 0.99, EOS: 0.01}}
    ids, scores, model = search(table, max_new_tokens=10)
    assert ids == [[]]  # EOS at once: log .6 = −0.51 beats "a EOS" (−0.86 per token); the answer is empty
    assert scores[0] == pytest.approx(math.log(0.6), abs=1e-6)
    assert model.steps == 1


def test_row_limits_and_every_question_searched_independently():
    """Two questions, the second with room for two tokens only (the model's positions): it finishes at its limit
    with the best of "a EOS" and "b b", and its rows are never fed a position past its last."""
    table = length_table(0.99)
    ids, scores, model = search(table, batch=2, row_limits=np.array([3, 2]))
    assert ids[0] == [B, B, B]
    assert ids[1] == [A]  # "a EOS" −0.399 vs "b b" log(.4·.99)/2 = −0.463
    assert max(int(p[2:].max()) for p in model.positions) <= 10 + 2 - 1


def test_several_eos_ids_and_the_heuristic_stop():
    """Two EOS ids (EOS, C), either ends a hypothesis. At step 1 the four best continuations all end in one: the top
    two ("a C" −0.80, "b EOS" −0.86 per token) fill the finished set, and the best live one, "a a" (−1.04 per token
    at today's length), cannot beat the worst of them: the search stops there — HF's early_stopping=False heuristic,
    although "a a a" would have scored −0.70 per token one step later."""
    table = {(): {A: 0.5, B: 0.45, EOS: 0.05}, (A,): {C: 0.4, EOS: 0.35, A: 0.25}, (B,): {EOS: 0.4, C: 0.35, B: 0.25},
             (A, A): {A: 0.99}, (B, B): {B: 0.99}}
    ids, scores, model = search(table, max_new_tokens=5, eos=(EOS, C))
    assert ids == [[A]] and scores[0] == pytest.approx(math.log(0.5 * 0.4) / 2, abs=1e-6)
    assert model.steps == 1
    ids, scores, _ = search(table, max_new_tokens=5, eos=(EOS,))  # C an ordinary token: "a C" lives on, and "b EOS"
    assert ids == [[B]] and scores[0] == pytest.approx(math.log(0.45 * 0.4) / 2, abs=1e-6)  # beats all it leads to


# ------------------------------------------------------------------------------------------------ the cache


def test_kv_cache_rows_repeat_and_reorder_in_place():
    prompt = {"present.0.key": np.arange(2 * 1 * 3 * 2, dtype=np.float32).reshape(2, 1, 3, 2)}  # (B=2, KV, T, Dh)
    cache = KVCache(prompt, np.array([[0, 1, 1], [1, 1, 1]]), capacity=5).repeat_rows(3)  # (6, 1, 5, 2)
    buffer, mask = cache.tensors["past.0.key"], cache.mask
    assert buffer.shape == (6, 1, 5, 2) and mask.shape == (6, 5)
    np.testing.assert_array_equal(buffer[:3, :, :3], np.repeat(prompt["present.0.key"][:1], 3, axis=0))
    buffer[:, :, 4] = -7.0  # beyond the filled slots: never copied
    before = buffer.copy()
    address = buffer.ctypes.data
    rows = np.array([2, 2, 0, 5, 3, 3])
    cache.reorder(rows)
    assert cache.tensors["past.0.key"] is buffer and buffer.ctypes.data == address and cache.mask is mask
    np.testing.assert_array_equal(buffer[:, :, :3], before[rows, :, :3])
    np.testing.assert_array_equal(buffer[:, :, 3:], before[:, :, 3:])
    assert mask[:3].tolist() == [[0, 1, 1, 0, 0]] * 3 and mask[3:].tolist() == [[1, 1, 1, 0, 0]] * 3
    cache.append({"new.0.key": np.full((6, 1, 1, 2), 9.0, dtype=np.float32)})
    cache.reorder(np.array([1, 0, 2, 3, 4, 5]))  # the appended slot moves too
    assert (buffer[:, :, 3] == 9.0).all() and cache.length == 4


# ------------------------------------------------------------------------------------------------ against HF


@contextmanager
def eos_override(pipeline, reference, eos):
    """Both sides stop at ``eos`` (None: the checkpoint's own): the runtime's codec and every generation config HF
    reads (BLIP-2's generate calls its language model's)."""
    if eos is None:
        yield
        return
    model = reference.adapter.model
    configs = [m.generation_config for m in (model, getattr(model, "language_model", None))
               if hasattr(m, "generation_config")]
    saved = pipeline.text.eos_token_ids, [c.eos_token_id for c in configs]
    pipeline.text.eos_token_ids = list(eos)
    for config in configs:
        config.eos_token_id = list(eos)
    try:
        yield
    finally:
        pipeline.text.eos_token_ids = saved[0]
        for config, value in zip(configs, saved[1]):
            config.eos_token_id = value


class Family:
    """An engines folder at ratio 0 (HF can express it), its PyTorch reference (the parity anchor's HF model,
    attention implementation and precision), the ONNX Runtime pipeline, and the HF inputs of QUESTIONS."""

    def __init__(self, engines, images, questions=QUESTIONS):
        from export.reference import load_reference
        from runtime.backends import load_runners
        from runtime.manifest import Manifest
        from runtime.pipelines import make_pipeline
        from runtime.text import format_prompt

        self.engines, self.manifest = engines, Manifest.load(engines)
        self.questions, self.images = list(questions), images
        self.reference = load_reference(self.manifest, None)
        self.pixels = self.reference.hf_pixels(images)
        self.runners = load_runners(self.manifest, "ort-cpu")
        self.pipeline = make_pipeline(self.manifest, self.runners)
        if self.manifest.family == "mllama":
            texts = [format_prompt(self.pipeline.prompt.template, q) for q in self.questions]
            encoded = self.reference.hf_inputs(images, texts, False)
            self.generate = lambda tokens, beams: self.reference.hf_generate(encoded, tokens, beams)
        else:
            prompts = [self.pipeline.prompt_template.replace("{}", q, 1) for q in self.questions]
            self.generate = lambda tokens, beams: self.reference.hf_generate(images, prompts, None, tokens, beams)

    def runtime(self, num_beams, max_new_tokens, max_batch, io_binding=None):
        self.manifest.max_batch = max_batch
        self.pipeline.io_binding = io_binding
        return self.pipeline.answer([], self.questions, max_new_tokens=max_new_tokens, pixel_values=self.pixels,
                                    num_beams=num_beams)

    def check(self, num_beams, max_new_tokens, eos=None):
        """One request of every question (B × N rows, left padded) through ONNX Runtime vs HF generate, one
        question at a time, EOS stripped; returns the answers."""
        from runtime.parity.compare import strip_after_eos

        with eos_override(self.pipeline, self.reference, eos):
            answers = self.runtime(num_beams, max_new_tokens, len(self.questions) * num_beams)
            hf = self.generate(max_new_tokens, num_beams)
            stop = self.pipeline.text.eos_token_ids
        assert hf.mode.endswith(f"(num_beams={num_beams})")
        assert [a.token_ids for a in answers] == [strip_after_eos(t, stop) for t in hf.tokens]
        return answers


def sample_images(count, seed=0):
    from runtime.parity.stages import default_images

    return default_images(count, seed)


@pytest.fixture(scope="module")
def blip2(engines_factory):
    return Family(engines_factory(ratio=0.0), sample_images(len(QUESTIONS)))


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    from export.builder import BuildOptions, build
    from export.pruning import PruningConfig
    from export.tiny import make_tiny_mllama

    root = tmp_path_factory.mktemp("beam-mllama")
    model = make_tiny_mllama(root / "tiny-mllama")
    engines = build(BuildOptions(model=model, out=root / "r0", pruning=PruningConfig(method="trim-sum", ratio=0.0)),
                    root, quiet=True)
    return Family(engines, sample_images(len(QUESTIONS)))


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    import json

    from export.builder import BuildOptions, build
    from export.pruning import PruningConfig
    from runtime.preprocess import load_image

    root = tmp_path_factory.mktemp("beam-default")
    options = BuildOptions(model=REPO / "models" / "blip2-easyvqa", out=root / "r0", pruning=PruningConfig(ratio=0.0))
    engines = build(options, root, quiet=True)
    samples = [json.loads(line) for line in (REPO / "samples" / "questions.jsonl").read_text().splitlines()]
    images = [load_image(REPO / "samples" / s["image"]) for s in samples]
    return Family(engines, images, [s["question"] for s in samples])


@pytest.mark.parametrize("num_beams, eos", [(5, None), (3, (13, 48))])
def test_blip2_beams_equal_hf_generate(blip2, num_beams, eos):
    """The tiny model never says its EOS: with (13, 48) as EOS ids hypotheses end at EOS too."""
    blip2.check(num_beams, 6, eos)


def test_blip2_beams_same_tokens_split_requests_and_with_or_without_io_binding(blip2):
    whole = [a.token_ids for a in blip2.runtime(5, 6, max_batch=20)]
    assert [a.token_ids for a in blip2.runtime(5, 6, max_batch=8)] == whole  # one question per request
    assert [a.token_ids for a in blip2.runtime(5, 6, max_batch=20, io_binding=True)] == whole
    assert [a.token_ids for a in blip2.runtime(5, 6, max_batch=20, io_binding=False)] == whole
    greedy = blip2.runtime(1, 6, max_batch=8)
    assert all(a.finish_reason == "max_new_tokens" and len(a.token_ids) == 6 for a in greedy)
    with pytest.raises(UsageError, match="--num-beams 9 is more than the max batch 8"):
        blip2.runtime(9, 6, max_batch=8)
    with pytest.raises(UsageError, match="--num-beams must be at least 1"):
        blip2.runtime(0, 6, max_batch=8)


@pytest.mark.parametrize("num_beams, eos", [(5, (2, 29)), (3, (16, 46, 50))])
def test_mllama_beams_equal_hf_generate(mllama, num_beams, eos):
    """Several EOS ids (as Llama 3.2 Vision has three): (1 + #EOS)·N candidates per step; some answers end at EOS,
    others at max_new_tokens."""
    answers = mllama.check(num_beams, 6, eos)
    assert {a.finish_reason for a in answers} == {"eos", "max_new_tokens"}


@pytest.mark.parametrize("num_beams", [3, 5])
def test_default_model_beams_equal_hf_generate(default_model, num_beams):
    answers = default_model.check(num_beams, 6)
    assert [a.answer for a in answers] == ["triangle", "yellow", "no", "yellow"]


# ------------------------------------------------------------------------------------------------ the CLIs


def test_infer_cli_num_beams(default_model):
    import json

    args = ["--engines", default_model.engines, "--jsonl", REPO / "samples" / "questions.jsonl", "--json"]
    result = run_cli("runtime/infer.py", *args, "--num-beams", "3", "--batch-size", "2", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = default_model.runtime(3, 10, max_batch=8)
    assert [r["token_ids"] for r in records] == [a.token_ids for a in expected]
    assert [r["answer"] for r in records] == ["triangle", "yellow", "no", "yellow"]
    refused = run_cli("runtime/infer.py", *args, "--num-beams", "9")
    assert refused.returncode == 2 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "infer.py: error: --num-beams 9 is more than the max batch 8 (every beam is a row of the decode graph): use at "
        "most 8, or engines built with a larger --max-batch"]


def test_eval_num_beams_flag():
    from export.evaluate import check_flags, parse_args

    check_flags(parse_args(["--num-beams", "4", "--batch-size", "4"]))
    assert parse_args([]).num_beams == 1
    for flags in (["--num-beams", "0"], ["--num-beams", "5", "--batch-size", "4"]):
        with pytest.raises(UsageError, match="--num-beams must be between 1 and --batch-size"):
            check_flags(parse_args(flags))


@pytest.mark.slow
def test_parity_cli_num_beams(blip2, tmp_path):
    import json

    report = tmp_path / "parity.json"
    result = run_cli("runtime/parity", "--engines", blip2.engines, "--num-beams", "3", "--max-new-tokens", "5",
                     "--out", report)
    assert result.returncode == 0, result.stderr
    report = json.loads(report.read_text())
    anchor = report["stages"]["hf_anchor"]
    assert report["num_beams"] == 3 and report["passed"]
    assert anchor["applicable"] and anchor["mode"].endswith("(num_beams=3)") and anchor["hf"] == anchor["reference"]


@pytest.mark.slow
def test_eval_cli_num_beams(tmp_path):
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("easy_vqa")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_vqa.py"), "--ratios", "0", "--limit", "12",
                             "--batch-size", "6", "--num-beams", "3", "--out", str(out), "--engines-cache",
                             str(tmp_path / "cache")], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["num_beams"] == 3 and results["results"][0]["questions"] == 12
