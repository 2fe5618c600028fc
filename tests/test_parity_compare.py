"""Parity's comparisons (runtime/parity/compare.py) on synthetic numpy arrays: agreement, disagreement, ties within
tolerance, rank-bound violations, token divergences with their first differing position — no model, no backend, a
few seconds."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from runtime.parity.compare import (compare_hf_tokens, compare_kept_sets, compare_kept_sets_with_bounds,
                                    compare_scores_to_bounds, compare_tokens, judge, same_kept_rows, strip_after_eos,
                                    worst_exceedance)
from runtime.tolerance import Calibration

FLOAT64 = Calibration("float64", "fp32")
RELATIVE = Calibration("relative", "fp32", why="test")


def noisy(seed=0, shape=(3, 5)):
    """(ref32, ref64): a float64 tensor and its fp32 copy with rounding-sized noise."""
    rng = np.random.default_rng(seed)
    ref64 = rng.normal(0, 2, shape)
    return (ref64 + rng.normal(0, 1e-5, shape)).astype(np.float32), ref64


# ------------------------------------------------------------------------------------------------ tensors


def test_judge_agreeing_and_disagreeing_tensors():
    ref32, ref64 = noisy()
    close = (ref64 + 1e-6).astype(np.float32)
    verdict = judge({"x": ref32}, {"x": ref64}, {"x": close}, ["x"], FLOAT64)
    assert verdict["passed"] and verdict["calibration"] == "float64" and verdict["worst_exceedance"] < 1
    far = close.copy()
    far[2, 4] += 0.5
    verdict = judge({"x": ref32}, {"x": ref64}, {"x": far}, ["x"], FLOAT64)
    assert not verdict["passed"] and verdict["worst_exceedance"] > 10
    assert not judge({"x": ref32}, None, {"x": far}, ["x"], RELATIVE)["passed"]
    assert judge({"x": ref32}, None, {"x": close}, ["x"], RELATIVE)["passed"]


def test_judge_on_rows_leaves_the_other_rows_out():
    ref32, ref64 = noisy()
    actual = ref32.copy()
    actual[1] += 1.0  # a row whose kept set differed: not comparable elementwise
    assert not judge({"x": ref32}, {"x": ref64}, {"x": actual}, ["x"], FLOAT64)["passed"]
    verdict = judge({"x": ref32}, {"x": ref64}, {"x": actual}, ["x"], FLOAT64, rows=[0, 2])
    assert verdict["passed"] and verdict["rows_compared"] == 2
    assert not judge({"x": ref32}, {"x": ref64}, {"x": actual}, ["x"], FLOAT64, rows=[1])["passed"]


def test_judge_integers_exactly_and_shapes():
    kept = np.array([[0, 2], [1, 3]])
    assert judge({"k": kept}, None, {"k": kept.copy()}, ["k"], FLOAT64)["passed"]
    assert not judge({"k": kept}, None, {"k": kept[:, ::-1]}, ["k"], FLOAT64)["passed"]
    ref32, ref64 = noisy()
    assert not judge({"x": ref32}, {"x": ref64}, {"x": ref32[:, :4]}, ["x"], FLOAT64)["passed"]


# ------------------------------------------------------------------------------------------------ kept sets


def test_kept_sets_agree_in_any_order():
    scores = np.array([[0.9, 0.1, 0.5, 0.3]])
    result = compare_kept_sets(scores, np.array([[0, 2]]), np.array([[2, 0]]), 1e-5)
    assert result["passed"] and result["rows"] == [{"row": 0, "equal": True}] and result["near_ties"] == 0


def test_kept_sets_near_tie_at_the_boundary_passes():
    # tokens 2 and 3 tie at the boundary (2nd best) within 1e-6 of the largest score: either may be kept
    scores = np.array([[1.0, 0.1, 0.5, 0.5 - 1e-7]])
    result = compare_kept_sets(scores, np.array([[0, 2]]), np.array([[0, 3]]), 1e-5)
    assert result["passed"] and result["near_ties"] == 1 and result["mismatches"] == 0
    row = result["rows"][0]
    assert row["near_tie"] and row["only_reference"] == [2] and row["only_onnx"] == [3]
    assert row["boundary_gaps"][2] == 0.0 and row["boundary_gaps"][3] == pytest.approx(1e-7)


def test_kept_sets_exact_tie_passes():
    scores = np.array([[1.0, 0.5, 0.5, 0.0]])  # 1 and 2 tie exactly at the boundary
    result = compare_kept_sets(scores, np.array([[0, 1]]), np.array([[0, 2]]), 1e-5)
    assert result["passed"] and result["near_ties"] == 1


def test_kept_sets_far_from_the_boundary_fail():
    scores = np.array([[1.0, 0.1, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]])
    result = compare_kept_sets(scores, np.array([[0, 2], [2, 3]]), np.array([[0, 1], [2, 3]]), 1e-5)
    assert not result["passed"] and result["mismatches"] == 1 and result["near_ties"] == 0
    assert result["rows"][0]["near_tie"] is False and result["rows"][1] == {"row": 1, "equal": True}


def test_same_kept_rows_with_and_without_float64():
    ref = np.array([[0, 1], [2, 3], [1, 2]])
    onnx = np.array([[0, 1], [2, 4], [1, 2]])
    assert same_kept_rows(ref, onnx, None) == [0, 2]
    assert same_kept_rows(ref, onnx, {"kept_indices": np.array([[0, 1], [2, 3], [1, 3]])}) == [0]


# ------------------------------------------------------------------------------------------------ rank bounds


def test_scores_inside_bounds_pass_and_outside_fail():
    lower = np.array([[1.0, 5.0, 2.0]])
    upper = np.array([[3.0, 5.0, 2.0]])
    inside = compare_scores_to_bounds(lower, upper, np.array([[3.0, 5.0, 2.0]], dtype=np.float32), 1e-5)
    assert inside["passed"] and inside["outside_bounds"] == 0 and inside["tokens_with_rank_ties"] == 1
    assert inside["max_bound_width"] == 2.0 and inside["tokens"] == 3
    below = compare_scores_to_bounds(lower, upper, np.array([[0.5, 5.0, 2.0]], dtype=np.float32), 1e-5)
    assert not below["passed"] and below["outside_bounds"] == 1 and below["max_violation"] == pytest.approx(0.5, rel=1e-3)
    above = compare_scores_to_bounds(lower, upper, np.array([[1.0, 6.0, 2.5]], dtype=np.float32), 1e-5)
    assert not above["passed"] and above["outside_bounds"] == 2 and above["max_violation"] == pytest.approx(1.0, rel=1e-3)


def test_scores_within_the_slack_pass():
    lower = upper = np.array([[100.0, 50.0]])
    within = compare_scores_to_bounds(lower, upper, np.array([[100.0005, 50.0]]), 1e-5)  # slack 1e-5 × 100 = 1e-3
    assert within["passed"]
    beyond = compare_scores_to_bounds(lower, upper, np.array([[100.002, 50.0]]), 1e-5)
    assert not beyond["passed"]


def test_scores_of_another_shape_fail():
    bounds = np.zeros((1, 4))
    result = compare_scores_to_bounds(bounds, bounds, np.zeros((1, 3)), 1e-5)
    assert not result["passed"] and result["shape_reference"] == [1, 4] and result["shape_onnx"] == [1, 3]


def test_kept_sets_with_bounds_swap_allowed_only_by_overlapping_bounds():
    lower = np.array([[10.0, 8.0, 1.0, 7.5]])
    upper = np.array([[11.0, 9.0, 2.0, 8.5]])
    reference_kept = np.array([[0, 1]])
    swap = compare_kept_sets_with_bounds(lower, upper, reference_kept, np.array([[0, 3]]), 1e-5)  # 3 reaches 8.5 ≥ 8
    assert swap["passed"] and swap["near_ties"] == 1 and swap["rows"][0]["bounds"] == {1: [8.0, 9.0], 3: [7.5, 8.5]}
    wrong = compare_kept_sets_with_bounds(lower, upper, reference_kept, np.array([[0, 2]]), 1e-5)  # 2 reaches 2 < 8
    assert not wrong["passed"] and wrong["mismatches"] == 1 and wrong["rows"][0]["near_tie"] is False


# ------------------------------------------------------------------------------------------------ tokens


def test_tokens_equal():
    result = compare_tokens([[5, 6], [7]], [[5, 6], [7]], [[1.0, 1.0], [1.0]], 1e-4)
    assert result["passed"] and [r["tokens"] for r in result["rows"]] == [[5, 6], [7]]


def test_token_mismatch_names_the_first_differing_position():
    reference, actual = [[5, 6, 7, 8]], [[5, 6, 9, 8]]
    margins = [[2.0, 1.5, 0.7, 0.3]]
    result = compare_tokens(reference, actual, margins, 1e-4)
    assert not result["passed"] and result["mismatches"] == 1
    row = result["rows"][0]
    assert row["first_difference"] == 2 and row["reference_margin"] == 0.7 and row["near_tie"] is False
    assert row["reference"] == reference[0] and row["onnx"] == actual[0]


def test_token_divergence_at_a_near_tie_passes():
    result = compare_tokens([[5, 6, 7]], [[5, 4, 4]], [[2.0, 5e-5, 1.0]], 1e-4)
    assert result["passed"] and result["near_ties"] == 1 and result["rows"][0]["first_difference"] == 1


def test_token_divergence_in_a_tied_row_passes():
    result = compare_tokens([[1], [5, 6]], [[1], [5, 7]], [[1.0], [1.0, 1.0]], 1e-4, tied_rows={1})
    assert result["passed"] and result["near_ties"] == 1
    assert not compare_tokens([[1], [5, 6]], [[1], [5, 7]], [[1.0], [1.0, 1.0]], 1e-4, tied_rows={0})["passed"]


def test_a_shorter_answer_differs_where_it_stops():
    result = compare_tokens([[5, 6, 7]], [[5, 6]], [[1.0, 1.0, 1.0]], 1e-4)
    assert not result["passed"] and result["rows"][0]["first_difference"] == 2
    beyond = compare_tokens([[5, 6]], [[5, 6, 7]], [[1.0, 1.0]], 1e-4)  # no margin recorded past the reference's end
    assert not beyond["passed"] and beyond["rows"][0]["reference_margin"] == float("inf")


def test_eos_stripping_and_the_hf_anchor():
    assert strip_after_eos([4, 5, 2, 6], {2}) == [4, 5]
    assert strip_after_eos([4, 5], [2]) == [4, 5]
    assert strip_after_eos([2, 4], {2, 3}) == []
    anchor = compare_hf_tokens([[4, 5, 2, 9], [7, 3]], [[4, 5], [7]], [2, 3], "generate")
    assert anchor == {"passed": True, "applicable": True, "mode": "generate", "hf": [[4, 5], [7]], "reference": [[4, 5], [7]]}
    assert not compare_hf_tokens([[4, 6, 2]], [[4, 5]], [2], "generate")["passed"]


# ------------------------------------------------------------------------------------------------ worst exceedance


def test_worst_exceedance_finds_nested_judgements():
    ref32, ref64 = noisy()
    bad = ref32 + 0.1
    stage = {"passed": False, "calls": [
        {"tensors": judge({"x": ref32}, {"x": ref64}, {"x": ref32}, ["x"], FLOAT64)},
        {"scores": judge({"x": ref32}, {"x": ref64}, {"x": bad}, ["x"], FLOAT64)},
    ]}
    worst = worst_exceedance(stage)
    assert worst == stage["calls"][1]["scores"]["worst_exceedance"] and worst > 1
    assert worst_exceedance({"passed": True, "rows": [], "near_ties": 0}) is None


def test_compare_is_pure_numpy():
    tree = ast.parse((Path(__file__).resolve().parent.parent / "runtime" / "parity" / "compare.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "typing", "numpy", "runtime"}, imported


def test_replay_respects_max_batch():
    """Feeds concatenated over several calls are replayed at most max_batch rows at a time, outputs in order."""
    from runtime.parity.stages import run_in_batches

    class Doubler:
        def __init__(self):
            self.rows = []

        def run(self, feeds):
            self.rows.append(len(feeds["x"]))
            return {"y": feeds["x"] * 2}

    runner = Doubler()
    feeds = {"x": np.arange(5.0)[:, None]}
    out = run_in_batches(runner, feeds, 2)
    assert runner.rows == [2, 2, 1] and np.array_equal(out["y"], feeds["x"] * 2)
    runner.rows.clear()
    run_in_batches(runner, feeds, 8)
    assert runner.rows == [5]
