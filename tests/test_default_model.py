"""The shipped default model (models/blip2-easyvqa): size, answers through the runtime, README samples, and a
training smoke test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from export.builder import BuildOptions, build
from export.pruning import PruningConfig
from runtime.backends import load_runners
from runtime.manifest import Manifest
from runtime.pipelines import make_pipeline
from runtime.preprocess import load_image

MODEL = REPO / "models" / "blip2-easyvqa"
SAMPLES = REPO / "samples"
# every "what …" question (shape or colour) among the first 40 of the easy-VQA test split, with its ground truth
# (the model is at 93-100% on these kinds; its yes/no questions about shapes are its weak spot, see the README)
FIXED = [
    (0, "what is the red shape?", "triangle"),
    (0, "what is the color of the triangle?", "red"),
    (0, "what is the color of the shape?", "red"),
    (1, "what is the color of the rectangle?", "yellow"),
    (2, "what is the blue shape?", "triangle"),
    (2, "what is the color of the triangle?", "blue"),
    (3, "what color is the circle?", "yellow"),
    (3, "what is the color of the circle?", "yellow"),
    (3, "what color is the shape?", "yellow"),
    (3, "what is the color of the shape?", "yellow"),
]


@pytest.fixture(scope="module")
def default_engines(tmp_path_factory):
    return build(BuildOptions(model=MODEL, out=tmp_path_factory.mktemp("default") / "r0", pruning=PruningConfig(ratio=0.0)),
                 REPO / "engines", quiet=True)


def test_checkpoint_is_complete_and_small():
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md", "training.json"):
        assert (MODEL / name).is_file(), name
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size < 20 * 1024**2
    training = json.loads((MODEL / "training.json").read_text())
    assert training["seed"] == 0 and training["train_minutes"] <= 15


def test_answers_fixed_test_questions(default_engines):
    easy_vqa = pytest.importorskip("easy_vqa")
    paths = easy_vqa.get_test_image_paths()
    manifest = Manifest.load(default_engines)
    pipeline = make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
    answers = pipeline.answer([load_image(paths[image]) for image, _, _ in FIXED], [q for _, q, _ in FIXED], max_new_tokens=4)
    assert [a.answer for a in answers] == [expected for _, _, expected in FIXED]


def test_readme_samples_answer_correctly(default_engines):
    """The samples the README's infer.py example uses, through the CLI."""
    samples = [json.loads(line) for line in (SAMPLES / "questions.jsonl").read_text().splitlines()]
    result = run_cli("runtime/infer.py", "--engines", default_engines, "--jsonl", SAMPLES / "questions.jsonl", "--json", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["answer"] for r in records] == [s["answer"] for s in samples]


# easy-VQA test questions whose CATP votes differ between PyTorch and ONNX Runtime at ratio 0.5 (found by
# scripts/compare_evals.py on a 200-question subset): attention probabilities that tie to float precision rank
# differently on the two backends, and a swapped token at the selection boundary follows
NEAR_TIES = [(116, "is no gray shape present?"), (191, "is there not a teal shape in the image?"),
             (836, "is a blue shape present?"), (940, "is there a black shape?")]


def test_parity_on_trained_model_with_catp_rank_ties(tmp_path):
    """CATP scores are vote counts, discontinuous in the attention probabilities: parity must accept differences
    that float-level rank ties explain (rank bounds) and still compare everything else strictly."""
    easy_vqa = pytest.importorskip("easy_vqa")
    from runtime.parity import run_parity

    paths = easy_vqa.get_test_image_paths()
    engines = build(BuildOptions(model=MODEL, out=tmp_path / "catp", pruning=PruningConfig(ratio=0.5)), REPO / "engines", quiet=True)
    report = run_parity(engines, images=[load_image(paths[i]) for i, _ in NEAR_TIES], questions=[q for _, q in NEAR_TIES],
                        max_new_tokens=4, quiet=True)
    visual = report["stages"]["visual"]
    assert report["passed"], json.dumps(visual)[:2000]
    assert visual["scores"]["mode"] == visual["kept_indices"]["mode"] == "rank bounds"
    assert visual["scores"]["reference_within_bounds"] and visual["scores"]["outside_bounds"] == 0
    # the bounds are narrow: a small fraction of the score, not "anything goes"
    assert visual["scores"]["max_bound_width"] < 0.1 * 8000
    for row in visual["kept_indices"]["rows"]:
        if not row["equal"]:
            assert row["near_tie"] and row["bounds"]


@pytest.mark.slow
def test_training_smoke(tmp_path):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "smoke"
    run_cli("scripts/train_easyvqa.py", "--steps", 3, "--eval-limit", 16, "--out", out, check=True)
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 3 and 0.0 <= training["test_accuracy_torch_greedy"] <= 1.0
    manifest = Manifest.load(build(BuildOptions(model=out, out=tmp_path / "engines", pruning=PruningConfig(ratio=0.5)), tmp_path, quiet=True))
    assert manifest.k == 16 and manifest.num_visual_tokens == 32
