"""The VQA metric and normalisation on hand-made cases, the data loaders, and a small eval through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from runtime.vqa import exact_match, load_vqav2, normalize_answer, subset, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("a red ball", "red ball"),
    ("An Apple", "apple"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("hot dog?", "hot dog"),
    ("yes , sir", "yes sir"),
    ("dont", "don’t"),
    ("none", "0"),
    ("  black\tand white\n", "black and white"),
])
def test_official_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("matching, expected", [(10, 1.0), (4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)])
def test_vqa_accuracy_leave_one_out(matching, expected):
    """n humans of 10 agree: 10 subsets of 9; the subsets that drop a matching human see n-1 matches."""
    humans = ["cat"] * matching + ["dog", "cow", "pig", "hen", "owl", "bee", "ant", "elk", "emu", "yak"][: 10 - matching]
    assert vqa_accuracy("cat", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("the two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_exact_match():
    assert exact_match("Circle", ["circle"]) == 1.0
    assert exact_match("circle.", ["circle"]) == 1.0
    assert exact_match("square", ["circle"]) == 0.0


def test_easy_vqa_loader_and_subsets():
    pytest.importorskip("easy_vqa")
    from runtime.vqa import load_easy_vqa

    test = load_easy_vqa("test")
    assert len(test.samples) == 9673 and len({s.answers[0] for s in test.samples}) == 13
    first = subset(test, 50, seed=3)
    assert len(first.samples) == 50
    assert [s.question_id for s in first.samples] == [s.question_id for s in subset(test, 50, seed=3).samples]
    assert [s.question_id for s in first.samples] != [s.question_id for s in subset(test, 50, seed=4).samples]


@pytest.fixture(scope="module")
def vqav2_mini(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqav2")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    questions, annotations = [], []
    for number, (question, human) in enumerate([("what color is it?", ["red"] * 6 + ["blue"] * 4),
                                                 ("how many shapes?", ["1"] * 10),
                                                 ("is there a circle?", ["yes"] * 2 + ["no"] * 8)]):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"COCO_val2014_{number:012d}.jpg")
        questions.append({"image_id": number, "question": question, "question_id": 100 + number})
        annotations.append({"image_id": number, "question_id": 100 + number, "answers": [{"answer": a} for a in human]})
    (folder / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (folder / "a.json").write_text(json.dumps({"annotations": annotations}))
    return folder


def test_vqav2_loader(vqav2_mini):
    dataset = load_vqav2(vqav2_mini / "q.json", vqav2_mini / "a.json", vqav2_mini / "images")
    assert [s.question_id for s in dataset.samples] == [100, 101, 102]
    assert dataset.samples[0].image.endswith("COCO_val2014_000000000000.jpg") and len(dataset.samples[0].answers) == 10
    assert dataset.score("no", dataset.samples[2]) == 1.0 and dataset.score("yes", dataset.samples[2]) == pytest.approx(0.6)


def test_small_eval_through_cli_torch_equals_ort(tiny_blip2, tmp_path):
    pytest.importorskip("easy_vqa")
    outputs = {}
    for backend in ("ort-cpu", "torch"):
        out = tmp_path / backend
        run_cli("scripts/eval_vqa.py", "--model", tiny_blip2, "--ratios", "0,0.5", "--methods", "catp,first-k",
                "--positions", "original,compact", "--positions-for", "catp", "--limit", 48, "--batch-size", 16,
                "--max-new-tokens", 3, "--backend", backend, "--out", out, "--engines-cache", tmp_path / "cache", check=True)
        results = json.loads((out / "results.json").read_text())
        assert results["questions"] == 48
        assert [r["config"] for r in results["results"]] == ["unpruned", "catp-r0.5", "catp-compact-r0.5", "first-k-r0.5"]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["results"])
        assert "| 0.5 | 4/8 |" in (out / "results.md").read_text()
        with Image.open(out / "accuracy_vs_ratio.png") as image:
            assert image.size[0] > 300
        outputs[backend] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(outputs["torch"]) == 4 * 48
    assert [(p["config"], p["prediction"], p["kept_indices"]) for p in outputs["torch"]] == \
           [(p["config"], p["prediction"], p["kept_indices"]) for p in outputs["ort-cpu"]]


def test_eval_on_vqav2_format(tiny_blip2, vqav2_mini, tmp_path):
    out = tmp_path / "out"
    run_cli("scripts/eval_vqa.py", "--model", tiny_blip2, "--dataset", "vqav2", "--questions", vqav2_mini / "q.json",
            "--annotations", vqav2_mini / "a.json", "--images", vqav2_mini / "images", "--ratios", "0,0.75",
            "--methods", "l2", "--out", out, "--engines-cache", tmp_path / "cache", check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "vqa_accuracy" and results["questions"] == 3 and len(results["results"]) == 2


def test_eval_bad_flags(tiny_blip2, tmp_path):
    result = run_cli("scripts/eval_vqa.py", "--model", tiny_blip2, "--ratios", "1.0", "--out", tmp_path)
    assert result.returncode == 2 and "[0, 1)" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("scripts/eval_vqa.py", "--model", tiny_blip2, "--dataset", "vqav2", "--out", tmp_path)
    assert result.returncode == 2 and "--questions" in result.stderr
