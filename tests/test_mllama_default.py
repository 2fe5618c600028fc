"""The shipped Mllama model (models/mllama-easyvqa, ``--model mllama``): size and record, answers through the
runtime at ratio 0.5 from the README's commands, and a training smoke test."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, run_cli
from export.defaults import MLLAMA_MODEL, resolve_model
from runtime.manifest import Manifest

SAMPLES = REPO / "samples"


def test_checkpoint_is_complete_small_and_named():
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md", "training.json"):
        assert (MLLAMA_MODEL / name).is_file(), name
    size = sum(p.stat().st_size for p in MLLAMA_MODEL.rglob("*") if p.is_file())
    assert size < 20 * 1024**2
    training = json.loads((MLLAMA_MODEL / "training.json").read_text())
    # --max-minutes 20 is checked between steps (from the start, data loading included): the last step ends a
    # moment after
    assert training["seed"] == 0 and training["train_minutes"] <= 20.05
    assert training["visual_tokens_per_image"] == 260 and len(training["cross_attention_layers"]) >= 2
    config = json.loads((MLLAMA_MODEL / "config.json").read_text())
    assert config["architectures"] == ["MllamaForConditionalGeneration"]
    assert resolve_model(type(MLLAMA_MODEL)("mllama")) == MLLAMA_MODEL


@pytest.mark.slow
def test_build_mllama_ratio_half_then_infer_answers_the_samples(tmp_path):
    """The README's two commands for the Mllama default: build at ratio 0.5 (Trimmed Llama, trim-sum), then infer
    answers the shipped samples as the data set does."""
    engines = tmp_path / "mllama-r0.5"
    run_cli("export/build.py", "--model", "mllama", "--ratio", 0.5, "--out", engines, check=True)
    manifest = Manifest.load(engines)
    assert manifest.family == "mllama" and manifest.pruning.method == "trim-sum"
    assert (manifest.k, manifest.num_visual_tokens) == (130, 260)
    samples = [json.loads(line) for line in (SAMPLES / "questions.jsonl").read_text().splitlines()]
    result = run_cli("runtime/infer.py", "--engines", engines, "--jsonl", SAMPLES / "questions.jsonl", "--json", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["answer"] for r in records] == [s["answer"] for s in samples]
    assert all(len(r["kept_indices"]) == 130 for r in records)


@pytest.mark.slow
def test_training_smoke(tmp_path):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "smoke"
    run_cli("scripts/train_easyvqa_mllama.py", "--steps", 3, "--eval-limit", 16, "--out", out, check=True)
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 3 and 0.0 <= training["test_accuracy_torch_greedy"] <= 1.0
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
