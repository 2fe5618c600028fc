"""The accuracy-vs-ratio harness: the official VQA normalisation and accuracy on hand-made cases, the data set
loaders, and small evaluations through ``scripts/eval_vqa.py`` (easy-VQA with ORT and torch, a VQAv2-format set)."""
from __future__ import annotations

import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from runtime.errors import UsageError
from export.vqa_data import load_dataset, load_vqav2, subset
from runtime.vqa import Sample, exact_match, normalize_answer, process_digit_article, process_punctuation, vqa_accuracy

# ------------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),  # number words → digits (manualMap), after lower-casing
    ("none", "0"),
    ("ten apples", "10 apples"),
    ("the dog.", "dog"),  # trailing period stripped, article dropped
    ("a red ball", "red ball"),
    ("An Apple", "apple"),
    ("yes!", "yes"),
    ("Yes", "yes"),
    ("3.5", "3.5"),  # a period followed by a digit stays
    ("5.", "5"),
    ("1.5.", "1.5"),
    ("1,000", "1000"),  # a comma between digits: every punctuation mark is deleted
    ("1,000 (approx)", "1000 approx"),
    ("hot dog?", "hot dog"),
    ("red,blue", "red blue"),  # a mark touching no space becomes a space ...
    ("red, blue", "red blue"),  # ... one touching a space is deleted
    ("2 (two)", "2 2"),  # the space test looks at the input: "(" is deleted, ")" becomes a space
    ("left-hand", "left hand"),
    ("dont", "don't"),  # contractions restored (ASCII apostrophes, current vqaEval.py)
    ("isnt", "isn't"),
    ("it's", "it's"),  # the apostrophe is no punctuation mark in the current script: kept as is
    ("its", "its"),  # and "its" is not in the contractions table
    ("Im", "im"),  # capitalised table keys never match: words are lower-cased first (as the official code)
    ("  black\tand white\n", "black and white"),
    ("", ""),
])
def test_official_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalisation_steps_separately():
    assert process_punctuation("the dog.") == "the dog"  # no lower-casing or articles here
    assert process_punctuation("yes , sir") == "yes  sir"
    assert process_digit_article("The  Two   dogs") == "2 dogs"
    assert process_digit_article("a an the") == ""


# ------------------------------------------------------------------------------------------------ accuracy

FILLERS = ["dog", "cow", "pig", "hen", "owl", "bee", "ant", "elk", "emu", "yak"]


def leave_one_out_by_definition(predicted: str, humans: list[str]) -> float:
    """min(#matches among 9 / 3, 1) averaged over every subset of len-1 humans (already-normalised inputs)."""
    subsets = list(itertools.combinations(range(len(humans)), len(humans) - 1))
    return sum(min(1.0, sum(humans[i] == predicted for i in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("matching, expected", [(10, 1.0), (5, 1.0), (4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)])
def test_vqa_accuracy_leave_one_out(matching, expected):
    """n of 10 humans gave the answer: the 10 - n subsets keeping all n see n matches, the n others n - 1."""
    humans = ["cat"] * matching + FILLERS[: 10 - matching]
    assert vqa_accuracy("cat", humans) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("cat", humans) == pytest.approx(leave_one_out_by_definition("cat", humans), abs=1e-12)


def test_vqa_accuracy_matches_the_definition_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        humans = list(rng.choice(["2", "3", "red", "yes"], size=int(rng.integers(2, 11))))
        predicted = str(rng.choice(["2", "3", "red", "yes", "no"]))
        assert vqa_accuracy(predicted, humans) == pytest.approx(leave_one_out_by_definition(predicted, humans), abs=1e-12)


def test_vqa_accuracy_normalisation_as_the_official_script():
    # the prediction is always normalised
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("The two", ["2"] * 3 + FILLERS[:7]) == pytest.approx(0.9)
    # identical human answers are compared as they are (no processing at all) ...
    assert vqa_accuracy("hot dog", ["hot dog?"] * 10) == 0.0
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0
    # ... differing ones get processPunctuation, and only that (no lower-casing, no number words, no articles)
    assert vqa_accuracy("hot dog", ["hot-dog"] * 3 + FILLERS[:7]) == pytest.approx(0.9)
    assert vqa_accuracy("1,000", ["1,000"] * 2 + FILLERS[:8]) == pytest.approx(0.6)
    # a quirk kept from the official code: "hot dog?" becomes "hot dog " (the mark turns into a space and human
    # answers are not stripped again), which no normalised prediction equals
    assert process_punctuation("hot dog?") == "hot dog "
    assert vqa_accuracy("hot dog", ["hot dog?"] * 3 + FILLERS[:7]) == 0.0
    assert vqa_accuracy("two", ["Two"] * 3 + FILLERS[:7]) == 0.0
    assert vqa_accuracy("cat", ["the cat"] * 3 + FILLERS[:7]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_exact_match():
    assert exact_match("Circle", "circle") == 1.0
    assert exact_match("circle.", "circle") == 1.0
    assert exact_match("the circle", "circle") == 1.0
    assert exact_match("square", "circle") == 0.0
    assert exact_match("circle circle", "circle") == 0.0


# ------------------------------------------------------------------------------------------------ data sets


def test_easy_vqa_loader_counts_and_seeded_subsets():
    pytest.importorskip("easy_vqa")
    test = load_dataset("easy-vqa", "test")
    assert test.metric == "exact_match" and test.split == "test"
    assert len(test.samples) == 9673 and len({s.answers[0] for s in test.samples}) == 13
    assert all(len(s.answers) == 1 and os.path.isfile(s.image) for s in test.samples[:20])
    assert [s.question_id for s in test.samples[:3]] == [0, 1, 2]
    kinds = {s.answer_type for s in test.samples}
    assert kinds == {"yes/no", "color", "shape"}
    assert all((s.answer_type == "yes/no") == (s.answers[0] in ("yes", "no")) for s in test.samples)
    assert all((s.answer_type == "shape") == (s.answers[0] in ("circle", "rectangle", "triangle")) for s in test.samples)

    first = load_dataset("easy-vqa", "test", limit=50, seed=3)
    again = load_dataset("easy-vqa", "test", limit=50, seed=3)
    other = load_dataset("easy-vqa", "test", limit=50, seed=4)
    ids = [s.question_id for s in first.samples]
    assert len(ids) == 50 and ids == sorted(ids) and len(set(ids)) == 50
    assert ids == [s.question_id for s in again.samples]
    assert ids != [s.question_id for s in other.samples]
    assert all(test.samples[i] == s for i, s in zip(ids, first.samples))
    assert len(subset(test, 10**6, seed=0).samples) == 9673
    with pytest.raises(UsageError):
        subset(test, 0, seed=0)


def test_easy_vqa_errors(monkeypatch):
    with pytest.raises(UsageError, match="splits"):
        load_dataset("easy-vqa", "val")
    with pytest.raises(UsageError, match="--questions"):
        load_dataset("vqav2")
    with pytest.raises(UsageError, match="easy-vqa or vqav2"):
        load_dataset("coco")
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # as if the package were not installed
    with pytest.raises(UsageError, match="pip install easy-vqa"):
        load_dataset("easy-vqa", "test")


def write_vqav2(folder, entries, subtype="val2014"):
    """entries: (image file name or None, image_id, question, human answers). Returns (questions, annotations)."""
    questions, annotations = [], []
    for number, (image_name, image_id, question, humans) in enumerate(entries):
        questions.append({"image_id": image_id, "question": question, "question_id": 100 + number})
        answer_type = "yes/no" if humans[0] in ("yes", "no") else "number" if humans[0].isdigit() else "other"
        annotations.append({"image_id": image_id, "question_id": 100 + number, "multiple_choice_answer": humans[0],
                            "answer_type": answer_type,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)]})
    q_file, a_file = folder / "questions.json", folder / "annotations.json"
    q_file.write_text(json.dumps({"data_subtype": subtype, "questions": questions} if subtype else {"questions": questions}))
    a_file.write_text(json.dumps({"annotations": annotations}))
    return q_file, a_file


def test_vqav2_loader_image_names_and_metric(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("COCO_val2014_000000000007.jpg", "abc_000000000008.png", "9.jpg", "COCO_train2014_000000000010.jpg"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(images / name)
    q_file, a_file = write_vqav2(tmp_path, [
        (None, 7, "what color is it?", ["red"] * 6 + ["blue"] * 4),
        (None, 8, "how many shapes?", ["1"] * 10),
        (None, 9, "is there a circle?", ["yes"] * 2 + ["no"] * 8),
        (None, 10, "other split, found by its id suffix?", ["yes"] * 10),
    ])
    dataset = load_vqav2(q_file, a_file, images)
    assert dataset.name == "vqav2" and dataset.split == "val2014" and dataset.metric == "vqa_accuracy"
    assert [os.path.basename(s.image) for s in dataset.samples] == [
        "COCO_val2014_000000000007.jpg", "abc_000000000008.png", "9.jpg", "COCO_train2014_000000000010.jpg"]
    assert [s.question_id for s in dataset.samples] == [100, 101, 102, 103] and len(dataset.samples[0].answers) == 10
    assert [s.answer_type for s in dataset.samples] == ["other", "number", "yes/no", "yes/no"]
    assert dataset.score("no", dataset.samples[2]) == 1.0
    assert dataset.score("Yes.", dataset.samples[2]) == pytest.approx(0.6)
    assert dataset.score("one", dataset.samples[1]) == 1.0

    (tmp_path / "missing").mkdir()
    missing_q, missing_a = write_vqav2(tmp_path / "missing", [(None, 11, "where is it?", ["here"] * 10)])
    with pytest.raises(UsageError, match="no image for image_id 11"):
        load_vqav2(missing_q, missing_a, images)
    a_file.write_text(json.dumps({"annotations": []}))
    with pytest.raises(UsageError, match="no annotation"):
        load_vqav2(q_file, a_file, images)
    with pytest.raises(UsageError, match="--annotations"):
        load_vqav2(q_file, None, images)


# ------------------------------------------------------------------------------------------------ the CLI


def eval_cli(*args) -> subprocess.CompletedProcess:
    """``python scripts/eval_vqa.py ...`` as a user runs it. One OpenMP thread: on a small shared machine torch's
    spinning threads make the tiny model's reference pipeline a hundred times slower."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "eval_vqa.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"eval_vqa.py exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from export.tiny import TinyBlip2Spec, build_word_tokenizer, make_tiny_blip2

    return make_tiny_blip2(tmp_path_factory.mktemp("vqa-model") / "tiny-blip2", TinyBlip2Spec(image_size=32, num_queries=8),
                           tokenizer=build_word_tokenizer())


@pytest.fixture(scope="module")
def easy_runs(tiny_model, tmp_path_factory):
    """50 easy-VQA questions, ratios 0 and 0.5, catp and first-k, through ORT and through the torch reference."""
    pytest.importorskip("easy_vqa")
    root = tmp_path_factory.mktemp("vqa-eval")
    runs = {"cache": root / "cache"}
    for backend in ("ort-cpu", "torch"):
        out = root / backend
        result = check(eval_cli("--model", tiny_model, "--ratios", "0,0.5", "--methods", "catp,first-k", "--limit", 50,
                                "--batch-size", 16, "--backend", backend, "--out", out, "--engines-cache", runs["cache"]))
        runs[backend] = (out, result)
    return runs


def test_easy_vqa_eval_through_cli(easy_runs, tiny_model):
    for backend in ("ort-cpu", "torch"):
        out, result = easy_runs[backend]
        assert result.stdout.strip() == str(out)
        results = json.loads((out / "results.json").read_text())
        assert results["dataset"] == "easy-vqa" and results["split"] == "test" and results["metric"] == "exact_match"
        assert results["questions"] == 50 and results["limit"] == 50 and results["seed"] == 0 and results["backend"] == backend
        assert results["weights_sha256"] and results["model"] == str(tiny_model.resolve())
        rows = results["results"]
        assert [r["config"] for r in rows] == ["unpruned", "catp-r0.5", "first-k-r0.5"]
        assert [(r["method"], r["ratio"], r["k"], r["num_visual_tokens"], r["kept_fraction"]) for r in rows] == [
            ("unpruned", 0.0, 8, 8, 1.0), ("catp", 0.5, 4, 8, 0.5), ("first-k", 0.5, 4, 8, 0.5)]
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["questions"] == 50 and r["seconds"] >= 0 for r in rows)
        assert rows[1]["layer_weights"] == "first" and rows[1]["positions"] == "original"
        assert rows[1]["layer_weights_resolved"] == [1.0, 0.0]  # the default: the first cross-attention layer alone
        for row in rows:  # per answer type: counts add up, the weighted mean is the overall accuracy
            by_type = row["accuracy_by_type"]
            assert set(by_type) <= {"yes/no", "color", "shape"} and sum(t["questions"] for t in by_type.values()) == 50
            assert sum(t["accuracy"] * t["questions"] for t in by_type.values()) / 50 == pytest.approx(row["accuracy"])

        predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == 3 * 50
        for row in rows:
            mine = [p for p in predictions if p["config"] == row["config"]]
            assert all(p["score"] == exact_match(p["prediction"], p["answers"][0]) for p in mine)
            assert row["accuracy"] == pytest.approx(sum(p["score"] for p in mine) / 50)
        first_k = [p["kept_indices"] for p in predictions if p["config"] == "first-k-r0.5"]
        assert all(kept == [0, 1, 2, 3] for kept in first_k)

        table = (out / "results.md").read_text()
        assert "| ratio | kept k/N | catp | first-k |" in table
        assert "| 0 (unpruned) | 8/8 (1) |" in table and "| 0.5 | 4/8 (0.5) |" in table
        assert "| configuration | k/N | all | color | shape | yes/no |" in table and "| catp-r0.5 | 4/8 |" in table
        with Image.open(out / "accuracy_vs_ratio.png") as image:
            image.verify()
        with Image.open(out / "accuracy_vs_ratio.png") as image:
            assert image.format == "PNG" and image.size == (900, 576)  # 7.5 x 4.8 in at dpi 120


def test_torch_and_ort_give_the_same_predictions(easy_runs):
    """Parity users care about: the engines answer every question as the PyTorch reference does."""
    def answers(backend):
        out, _ = easy_runs[backend]
        return [(p["config"], p["question_id"], p["prediction"], p["kept_indices"])
                for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())]

    assert answers("torch") == answers("ort-cpu")
    accuracies = {b: [r["accuracy"] for r in json.loads((easy_runs[b][0] / "results.json").read_text())["results"]]
                  for b in ("torch", "ort-cpu")}
    assert accuracies["torch"] == accuracies["ort-cpu"]


def test_vqav2_format_eval_through_cli(easy_runs, tiny_model, tmp_path):
    """The first batch of the easy-VQA run, re-posed as a VQAv2-format set whose human answers contain the model's
    own (normalised) answer 0, 1, 2, 3, 4 or 10 times: the same batch gives the same answers, so the official
    accuracy is known exactly. Reuses the engines cached by the easy-VQA run."""
    out_easy, _ = easy_runs["ort-cpu"]
    unpruned = [p for p in map(json.loads, (out_easy / "predictions.jsonl").read_text().splitlines())
                if p["config"] == "unpruned"][:16]  # --batch-size 16: exactly the first batch
    images = tmp_path / "images"
    images.mkdir()
    entries, expected = [], []
    for number, record in enumerate(unpruned):
        image_id = 1000 + number
        name = f"easyvqa_{image_id:012d}.png" if number % 2 else f"{image_id}.png"  # two of the naming rules
        shutil.copyfile(record["image"], images / name)
        matching = (0, 1, 2, 3, 4, 10)[number % 6]
        humans = [normalize_answer(record["prediction"])] * matching + FILLERS[: 10 - matching]
        entries.append((name, image_id, record["question"], humans))
        expected.append((0.0, 0.3, 0.6, 0.9, 1.0, 1.0)[number % 6])
    q_file, a_file = write_vqav2(tmp_path, entries, subtype=None)

    out = tmp_path / "out"
    result = check(eval_cli("--model", tiny_model, "--dataset", "vqav2", "--questions", q_file, "--annotations", a_file,
                            "--images", images, "--ratios", "0,0.5", "--methods", "catp", "--batch-size", 16,
                            "--out", out, "--engines-cache", easy_runs["cache"]))
    assert result.stderr.count(": cached (") == 2  # both engines reused, nothing rebuilt
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "vqav2" and results["split"] == "custom" and results["metric"] == "vqa_accuracy"
    assert results["questions"] == 16 and [r["config"] for r in results["results"]] == ["unpruned", "catp-r0.5"]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    mine = [p for p in predictions if p["config"] == "unpruned"]
    assert [p["prediction"] for p in mine] == [r["prediction"] for r in unpruned]
    assert [p["score"] for p in mine] == pytest.approx(expected)
    assert results["results"][0]["accuracy"] == pytest.approx(sum(expected) / 16)
    for p in predictions:
        assert p["score"] == pytest.approx(vqa_accuracy(p["prediction"], p["answers"]))
        assert len(p["answers"]) == 10


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0,1.0"], "[0, 1)"),
    (["--methods", "catp,topk"], "unknown --method 'topk'"),
    (["--positions", "sideways"], "--positions"),
    (["--backend", "trt"], "--backend"),
    (["--dataset", "vqav2"], "--questions"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "5"], "model folder not found"),
])
def test_bad_flags_one_line_exit_2(args, message, tmp_path):
    result = eval_cli("--model", tmp_path / "no-model", "--out", tmp_path / "out", *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_configuration_fails_before_any_evaluation(tiny_model, tmp_path):
    """A custom weight list of the wrong length is only known against the model: still one line, exit 2, and
    nothing evaluated or written (torch: every configuration is resolved before the first one runs)."""
    result = eval_cli("--model", tiny_model, "--ratios", "0,0.5", "--methods", "catp", "--layer-weights", "1,0,1",
                      "--limit", 5, "--backend", "torch", "--out", tmp_path / "out")
    assert result.returncode == 2 and "--layer-weights has 3 weight(s)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ grid parsing


@pytest.fixture(scope="module")
def eval_vqa():
    return importlib.import_module("export.evaluate")  # what scripts/eval_vqa.py runs


def test_grid(eval_vqa):
    assert eval_vqa.layer_weight_specs("uniform") == ["uniform"]
    assert eval_vqa.layer_weight_specs("uniform,first,first+last") == ["uniform", "first", "first+last"]
    assert eval_vqa.layer_weight_specs("0.5,1") == ["0.5,1"]
    assert eval_vqa.layer_weight_specs("uniform;0.5,1;last") == ["uniform", "0.5,1", "last"]

    args = eval_vqa.parse_args(["--ratios", "0.5,0,0.75", "--methods", "catp,l2,random", "--layer-weights", "uniform;1,0",
                                "--positions", "original,compact", "--seed", "3"])
    grid = eval_vqa.make_grid(args)
    names = [c.name for c in grid]
    assert names[0] == "unpruned" and len(names) == len(set(names)) == 1 + 2 * (2 * 2 + 2 + 2)
    assert names[1:9] == ["catp-wuniform-r0.5", "catp-wuniform-compact-r0.5", "catp-w1_0-r0.5", "catp-w1_0-compact-r0.5",
                          "l2-r0.5", "l2-compact-r0.5", "random-s3-r0.5", "random-s3-compact-r0.5"]
    assert {c.series for c in grid} == {"unpruned", "catp (uniform)", "catp (uniform) [compact]", "catp (1,0)", "catp (1,0) [compact]",
                                       "l2", "l2 [compact]", "random (seed 3)", "random (seed 3) [compact]"}
    assert all(c.seed == 3 for c in grid if c.method == "random")
    no_zero = eval_vqa.make_grid(eval_vqa.parse_args(["--ratios", "0.5", "--methods", "first-k"]))
    assert [c.name for c in no_zero] == ["first-k-r0.5"]


def test_runtime_vqa_is_torch_free():
    code = ("import sys, runtime.vqa; leaked = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
            "'export')]; assert not leaked, leaked")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_sample_is_a_plain_record():
    sample = Sample("a.png", "what?", ("yes",), 7)
    assert (sample.image, sample.question, sample.answers, sample.question_id) == ("a.png", "what?", ("yes",), 7)


def test_compare_evals_and_kept_token_effect_clis(easy_runs, tmp_path):
    """The analysis scripts over the two runs of the fixture: answers agree (exit 0); a changed answer → exit 1;
    the token split adds up to every pruned question."""
    def script(name, *args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    torch_run, ort_run = easy_runs["torch"][0], easy_runs["ort-cpu"][0]
    report = tmp_path / "agreement.json"
    result = script("compare_evals.py", torch_run, ort_run, "--out", report)
    assert result.returncode == 0, result.stderr
    agreement = json.loads(report.read_text())
    assert agreement["questions"] == agreement["answers_equal"] == 150 and len(agreement["configs"]) == 3

    changed = tmp_path / "changed"
    shutil.copytree(ort_run, changed)
    lines = (changed / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["prediction"] = first["prediction"] + " not"
    (changed / "predictions.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    result = script("compare_evals.py", torch_run, changed)
    assert result.returncode == 1 and "answers equal 149/150" in result.stdout

    result = script("compare_evals.py", torch_run, tmp_path / "nowhere")
    assert result.returncode == 2 and result.stderr.count("\n") == 1

    split = tmp_path / "token0.json"
    result = script("kept_token_effect.py", ort_run, "--token", 0, "--json", split)
    assert result.returncode == 0, result.stderr
    configs = json.loads(split.read_text())["configs"]
    assert set(configs) == {"catp-r0.5", "first-k-r0.5"}
    for sides in configs.values():
        assert sum(cell["questions"] for side in sides.values() for cell in side.values()) == 50
    assert all(cell["questions"] == 0 for cell in configs["first-k-r0.5"]["dropped"].values())  # first-k keeps 0
