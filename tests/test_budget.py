"""The accuracy budget: the choice rule on hand-made results (``export/budget.py``), and ``build.py --ratio-from``
on a hand-written results.json of the tiny test model (the eval side is tested through the CLI in
``tests/test_vqa_eval.py``)."""
from __future__ import annotations

import json
import math

import pytest

from export import build
from export.budget import budget_section, choose_ratio, held_out_section, markdown, summary_lines
from export.budget_io import EvalBudget, choose_for_build, read_results
from runtime.errors import UsageError


def row(series: str, ratio: float, accuracy: float, method: str | None = None, **settings) -> dict:
    unpruned = ratio == 0
    method = "unpruned" if unpruned else method or series.split()[0]
    settings = {"layer_weights": "uniform" if method == "catp" else None, "positions": None if unpruned else "original",
                "image_importance": False, "seed": None, **settings}
    name = "unpruned" if unpruned else f"{series}-r{ratio:g}"
    return {"config": name, "series": series, "method": method, "ratio": ratio, "k": max(1, round(32 * (1 - ratio))),
            "num_visual_tokens": 32, "accuracy": accuracy, **settings}


UNPRUNED = row("unpruned", 0.0, 0.80)


# ------------------------------------------------------------------------------------------------ the rule


def test_budget_holds_up_to_some_ratio():
    results = [UNPRUNED, row("l2", 0.875, 0.70), row("l2", 0.5, 0.795), row("l2", 0.75, 0.79)]  # rows in any order
    choice = choose_ratio(results, 1.0, "l2")
    assert (choice["ratio"], choice["k"], choice["accuracy"], choice["largest_within"]) == (0.75, 8, 0.79, 0.75)
    assert [(p["ratio"], p["within"]) for p in choice["checked"]] == [(0.5, True), (0.75, True), (0.875, False)]
    assert choose_ratio(results, 0.6, "l2")["ratio"] == 0.5  # 0.795 is 0.5 points below 0.80, 0.79 a full point
    assert choose_ratio(results, 10.0, "l2")["ratio"] == 0.875


def test_no_ratio_within_budget():
    choice = choose_ratio([UNPRUNED, row("catp", 0.5, 0.60), row("catp", 0.75, 0.50)], 1.0, "catp")
    assert choice["ratio"] is None and choice["largest_within"] is None and choice["accuracy"] is None
    assert [p["within"] for p in choice["checked"]] == [False, False]


def test_non_monotone_accuracy_is_chosen_conservatively():
    """A ratio that passes after one that fails is not chosen; it is recorded as largest_within."""
    results = [UNPRUNED, row("random", 0.5, 0.79), row("random", 0.75, 0.70), row("random", 0.875, 0.795)]
    choice = choose_ratio(results, 1.0, "random")
    assert choice["ratio"] == 0.5 and choice["largest_within"] == 0.875
    assert "0.875 is within too" in summary_lines(budget_section(results, 1.0))[0]
    only_later = choose_ratio([UNPRUNED, row("random", 0.5, 0.70), row("random", 0.75, 0.80)], 1.0, "random")
    assert only_later["ratio"] is None and only_later["largest_within"] == 0.75


def test_floor_ties_and_zero_budget():
    """Exactly the floor counts as within, whatever float rounding (0.88 - 0.01 is not 0.87 in binary)."""
    assert choose_ratio([row("unpruned", 0.0, 0.88), row("l2", 0.5, 0.87)], 1.0, "l2")["ratio"] == 0.5
    assert choose_ratio([row("unpruned", 0.0, 0.88), row("l2", 0.5, 0.8699)], 1.0, "l2")["ratio"] is None
    assert choose_ratio([UNPRUNED, row("l2", 0.5, 0.80), row("l2", 0.75, 0.7999)], 0, "l2")["ratio"] == 0.5


def test_missing_unpruned_unknown_series_and_bad_budgets():
    with pytest.raises(UsageError, match="no unpruned result"):
        choose_ratio([row("l2", 0.5, 0.8)], 1.0, "l2")
    with pytest.raises(UsageError, match="no unpruned result"):
        budget_section([row("l2", 0.5, 0.8)], 1.0)
    with pytest.raises(UsageError, match=r"no pruned result of series 'catp' \(series: l2\)"):
        choose_ratio([UNPRUNED, row("l2", 0.5, 0.8)], 1.0, "catp")
    for bad in (-1.0, math.nan, math.inf, True):
        with pytest.raises(UsageError, match="--max-drop must be a non-negative number"):
            choose_ratio([UNPRUNED, row("l2", 0.5, 0.8)], bad, "l2")
    with pytest.raises(UsageError, match="two results at one ratio"):
        choose_ratio([UNPRUNED, row("l2", 0.5, 0.8), row("l2", 0.5, 0.7)], 1.0, "l2")


def test_budget_section_and_report():
    results = [UNPRUNED, row("catp", 0.5, 0.70), row("l2", 0.5, 0.80), row("l2", 0.75, 0.78)]
    section = budget_section(results, 1.0)
    assert section["max_drop"] == 1.0 and section["unpruned_accuracy"] == 0.80 and section["floor"] == pytest.approx(0.79)
    assert list(section["series"]) == ["catp", "l2"]
    assert section["series"]["catp"]["ratio"] is None and section["series"]["l2"]["ratio"] == 0.5
    table = markdown(section)
    assert "## Accuracy budget: at most 1 point(s) below unpruned (80.00)" in table
    assert "| catp | none | | | — | 0.5: 70.00 ✗ |" in table
    assert "| l2 | 0.5 | 16/32 | 80.00 | 0.5 | 0.5: 80.00 ✓, 0.75: 78.00 ✗ |" in table
    lines = summary_lines(section)
    assert len(lines) == 2 and "no evaluated ratio within budget" in lines[0] and "ratio 0.5 (k=16)" in lines[1]


def test_held_out_section():
    calibration = {"dataset": "easy-vqa", "split": "train", "questions": 100,
                   "results": [UNPRUNED, row("catp", 0.5, 0.70), row("l2", 0.5, 0.80), row("l2", 0.75, 0.795),
                               row("first-k", 0.5, 0.80)]}
    here = [row("unpruned", 0.0, 0.90), row("l2", 0.75, 0.85), row("first-k", 0.5, 0.895)]
    section = held_out_section(calibration, here, 1.0)
    assert section["unpruned_accuracy"] == 0.90 and section["calibration"]["unpruned_accuracy"] == 0.80
    assert section["calibration"]["split"] == "train"
    series = section["series"]
    assert series["catp"] == {"ratio": None, "k": None, "calibration_accuracy": None, "accuracy": None,
                              "drop_points": None, "held": None}
    assert (series["l2"]["ratio"], series["l2"]["held"], series["l2"]["drop_points"]) == (0.75, False, pytest.approx(5.0))
    assert (series["first-k"]["ratio"], series["first-k"]["held"]) == (0.5, True)
    table = markdown(section)
    assert "| l2 | 0.75 | 8 | 79.50 | 85.00 | 5.00 | **no** |" in table and "| first-k | 0.5 | 16 | 80.00 | 89.50 | 0.50 | yes |" in table
    assert any("NOT held" in line for line in summary_lines(section))


def test_ratios_from_replaces_the_grid(tmp_path):
    """--ratios-from: the unpruned point plus each series at its chosen ratio, rebuilt from the rows; its weights
    must be this model's."""
    from export.eval_pipelines import Config
    from export.evaluate import parse_args

    rows = [UNPRUNED, row("catp (last) [compact]", 0.5, 0.80, "catp", layer_weights="last", positions="compact"),
            row("catp (last) [compact]", 0.75, 0.70, "catp", layer_weights="last", positions="compact"),
            row("random (seed 3)", 0.5, 0.60, "random", seed=3)]
    rows[1]["config"], rows[2]["config"] = "catp-wlast-compact-r0.5", "catp-wlast-compact-r0.75"
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"weights_sha256": {"model.safetensors": "ab"}, "results": rows}))
    unpruned = Config("first-k", 0.0)
    plan = EvalBudget.plan(parse_args(["--ratios-from", str(path), "--max-drop", "1"]), [unpruned], parse_args([]))
    assert plan.configs == [unpruned, Config("catp", 0.5, "last", "compact")]
    plan.check_weights({"model.safetensors": "ab"}, tmp_path)
    with pytest.raises(UsageError, match="other weights"):
        plan.check_weights({"model.safetensors": "cd"}, tmp_path)
    with pytest.raises(UsageError, match="pass --max-drop"):  # no budget section to take it from
        EvalBudget.plan(parse_args(["--ratios-from", str(path)]), [unpruned], parse_args([]))
    (tmp_path / "none.json").write_text(json.dumps({"results": [UNPRUNED, rows[3]]}))  # random: 0.60, not within
    with pytest.raises(UsageError, match="nothing to check"):
        EvalBudget.plan(parse_args(["--ratios-from", str(tmp_path / "none.json"), "--max-drop", "1"]), [unpruned],
                        parse_args([]))
    with pytest.raises(UsageError, match="leave out --methods"):
        EvalBudget.plan(parse_args(["--ratios-from", str(path), "--methods", "l2"]), [unpruned], parse_args([]))
    rows[1]["config"] = "something-else"
    path.write_text(json.dumps({"results": rows}))
    with pytest.raises(UsageError, match="cannot rebuild configuration"):
        EvalBudget.plan(parse_args(["--ratios-from", str(path), "--max-drop", "1"]), [unpruned], parse_args([]))


def test_read_results_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_results(tmp_path / "nowhere.json", "--ratio-from")
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_results(tmp_path, "--ratio-from")  # a folder: its results.json
    (tmp_path / "results.json").write_text(json.dumps({"results": [{"series": "l2", "ratio": "0.5"}]}))
    with pytest.raises(UsageError, match="result 0 lacks a valid ratio, k, accuracy"):
        read_results(tmp_path, "--ratio-from")


# ------------------------------------------------------------------------------------------------ build.py --ratio-from


@pytest.fixture(scope="module")
def budget_results(tiny_blip2, tmp_path_factory):
    """A hand-written results.json for the tiny model: catp never within 1 point, l2 up to 0.75, a CATP variant
    (first-layer weights, compact positions) at 0.5 only."""
    from export.adapters.base import weights_sha256

    variant = {"layer_weights": "last", "positions": "compact"}
    rows = [UNPRUNED, row("catp", 0.5, 0.70), row("l2", 0.5, 0.80), row("l2", 0.75, 0.795), row("l2", 0.875, 0.60),
            row("catp (last) [compact]", 0.5, 0.795, "catp", **variant),
            row("catp (last) [compact]", 0.75, 0.50, "catp", **variant)]
    path = tmp_path_factory.mktemp("budget") / "results.json"
    path.write_text(json.dumps({"dataset": "easy-vqa", "split": "train", "questions": 100, "weights_sha256":
                                weights_sha256(tiny_blip2), "budget": {"max_drop": 1.0}, "results": rows}))
    return path


def build_main(*argv) -> int:
    try:
        return build.main(list(map(str, argv)))
    except SystemExit as stop:
        return stop.code


def test_build_ratio_from_reproduces_the_series(tiny_blip2, budget_results, tmp_path, capsys):
    out = tmp_path / "engines"
    code = build_main("--model", tiny_blip2, "--ratio-from", budget_results, "--series", "catp (last) [compact]",
                      "--out", out)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "series 'catp (last) [compact]' -> ratio 0.5 (k=16)" in captured.err and "0.75, scores 50.00%" in captured.err
    pruning = json.loads((out / "manifest.json").read_text())["pruning"]
    assert (pruning["method"], pruning["ratio"], pruning["positions"], pruning["layer_weights_preset"]) == (
        "catp", 0.5, "compact", "last")


def test_build_ratio_from_picks_method_series_without_building(tiny_blip2, budget_results):
    args = build.parse_args(["--model", str(tiny_blip2), "--ratio-from", str(budget_results), "--method", "l2"])
    said = []
    choose_for_build(args, build.parse_args([]), said.append)  # the budget of the results: 1 point
    assert (args.ratio, args.method, args.positions) == (0.75, "l2", "original") and "next evaluated ratio, 0.875" in said[0]
    args = build.parse_args(["--model", str(tiny_blip2), "--ratio-from", str(budget_results), "--method", "l2",
                             "--max-drop", "30"])
    choose_for_build(args, build.parse_args([]), said.append)
    assert args.ratio == 0.875 and "largest ratio evaluated" in said[-1]


@pytest.mark.parametrize("extra, message", [
    ([], "no evaluated ratio of series 'catp' stays within 1 point(s) of unpruned (80.00%); the smallest, 0.5, scores 70.00%"),
    (["--ratio", "0.5"], "--ratio and --ratio-from are mutually exclusive"),
    (["--series", "catp (last) [compact]", "--layer-weights", "uniform"], "--layer-weights uniform differs from series"),
    (["--series", "l2", "--method", "catp"], "--method catp but series 'l2'"),
    (["--method", "self-attn"], "has no series 'self-attn' (series: catp, l2, catp (last) [compact]); pick one with --series"),
    (["--max-drop", "-1"], "--max-drop must be a non-negative number"),
])
def test_build_ratio_from_errors(tiny_blip2, budget_results, tmp_path, capsys, extra, message):
    out = tmp_path / "engines"
    code = build_main("--model", tiny_blip2, "--ratio-from", budget_results, "--out", out, *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_build_ratio_from_other_weights(tiny_blip2, budget_results, tmp_path, capsys):
    data = json.loads(budget_results.read_text())
    data["weights_sha256"] = {"model.safetensors": "0" * 64}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    code = build_main("--model", tiny_blip2, "--ratio-from", other, "--method", "l2", "--out", tmp_path / "engines")
    err = capsys.readouterr().err
    assert code == 2 and "evaluated on other weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "engines").exists()
    args = build.parse_args(["--model", str(tiny_blip2), "--ratio-from", str(other), "--method", "l2", "--allow-other-weights"])
    said = []
    choose_for_build(args, build.parse_args([]), said.append)
    assert args.ratio == 0.75 and said[0].startswith("warning: ")
    assert build_main("--model", tiny_blip2, "--max-drop", "1", "--out", tmp_path / "engines") == 2
    assert "go with --ratio-from" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ eval_vqa.py


@pytest.mark.slow  # ~15 s: two evaluations through the CLI
def test_eval_max_drop_then_ratios_from(tiny_blip2, tmp_path):
    """``--max-drop`` on 16 test questions (torch reference: no engines to build), then ``--ratios-from`` that run on 8
    train questions: unpruned + each series at its chosen ratio; a budget of 100 points holds whatever it answers."""
    pytest.importorskip("easy_vqa")
    from test_vqa_eval import check, eval_cli

    cal, held = tmp_path / "cal", tmp_path / "held"
    result = check(eval_cli("--model", tiny_blip2, "--ratios", "0,0.5,0.75", "--methods", "first-k,l2", "--limit", 16,
                            "--backend", "torch", "--max-drop", 1, "--out", cal))
    results = json.loads((cal / "results.json").read_text())
    assert results["budget"] == json.loads(json.dumps(budget_section(results["results"], 1.0)))
    assert list(results["budget"]["series"]) == ["first-k", "l2"]
    assert "## Accuracy budget: at most 1 point(s) below unpruned" in (cal / "results.md").read_text()
    assert sum(line.startswith("budget 1 point(s): ") for line in result.stderr.splitlines()) == 2

    report = check(eval_cli("--model", tiny_blip2, "--split", "train", "--limit", 8, "--ratios-from", cal,
                            "--max-drop", 100, "--backend", "torch", "--out", held))
    assert report.stdout.strip() == str(held)
    data = json.loads((held / "results.json").read_text())
    assert data["split"] == "train" and [r["config"] for r in data["results"]] == ["unpruned", "first-k-r0.75", "l2-r0.75"]
    section = data["budget"]
    assert section["max_drop"] == 100 and section["calibration"]["split"] == "test" and not section["calibration"]["same_split"]
    assert section["calibration"]["results"] == str(cal / "results.json")
    assert all(s["ratio"] == 0.75 and s["held"] is True for s in section["series"].values())
    assert "## Accuracy budget on held-out data: at most 100 point(s)" in (held / "results.md").read_text()
    assert sum("(chosen on calibration" in line for line in report.stderr.splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0.5", "--max-drop", "1"], "--max-drop needs 0 among --ratios"),
    (["--ratios-from", "results.json", "--methods", "catp"], "leave out --methods"),
])
def test_eval_budget_flag_errors_before_any_work(args, message, tmp_path, capsys):
    from export.evaluate import main

    with pytest.raises(SystemExit) as stop:
        main(["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
