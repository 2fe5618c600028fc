"""Parity's comparisons: pure numpy (no torch, no onnxruntime) — every verdict a stage reports is made here.

- float tensors: :func:`judge` — the calibrated criterion of ``runtime/tolerance.py``, optionally on some rows only
  (the rows whose kept set agrees, see :func:`same_kept_rows`);
- kept-index *sets*: :func:`compare_kept_sets` (continuous scores: a differing token is a near-tie when its
  reference score lies at the selection boundary) and :func:`compare_kept_sets_with_bounds` (rank-count scores such
  as CATP's: a swap the reference's reachable score bounds allow);
- rank-count scores: :func:`compare_scores_to_bounds` (inside the reference's [lower, upper], up to a slack);
- greedy tokens: :func:`compare_tokens` (a divergence is a near-tie when the reference's top-2 logit margin at the
  first differing step is within tolerance), :func:`strip_after_eos` and :func:`compare_hf_tokens` (the HF anchor);
- :func:`worst_exceedance`: the largest error / bound anywhere in a stage (what the CLI prints).

Every function takes numpy arrays (or lists of token ids) and returns the JSON-ready dict the report shows, with a
``passed`` verdict. The recording, the orchestration and the reference live elsewhere (``runtime/parity/stages.py``,
``export/reference.py``).
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from runtime.tolerance import Calibration, judge_tensors


def take_rows(tensors: dict[str, np.ndarray], names: list[str], rows: list[int]) -> dict[str, np.ndarray]:
    """``names``' tensors restricted to ``rows`` of their first (batch) axis."""
    return {name: tensors[name][rows] for name in names}


def judge(
    ref32: dict[str, np.ndarray], ref64: dict[str, np.ndarray] | None, actual: dict[str, np.ndarray], names: list[str],
    calibration: Calibration, rows: list[int] | None = None,
) -> dict[str, Any]:
    """Float tensors against the calibrated bound (``runtime.tolerance``; integers exactly), optionally on ``rows``
    only (then ``rows_compared`` says how many)."""
    if rows is not None:
        ref32, actual = take_rows(ref32, names, rows), take_rows(actual, names, rows)
        ref64 = None if ref64 is None else take_rows(ref64, names, rows)
    verdict = judge_tensors(ref32, ref64, actual, names, calibration)
    if rows is not None:
        verdict["rows_compared"] = len(rows)
    return verdict


def compare_kept_sets(ref_scores: np.ndarray, ref_kept: np.ndarray, kept: np.ndarray, tol: float) -> dict[str, Any]:
    """Kept-index *sets* per row (``ref_scores`` (B, N), kept (B, k)). A differing token counts as a near-tie only
    if its reference score lies within ``tol`` (relative to the row's largest |score|) of the reference's k-th best
    score (the selection boundary); anything else is a mismatch."""
    rows = []
    near_ties = mismatches = 0
    k = ref_kept.shape[1]
    for row in range(ref_kept.shape[0]):
        expected, got = set(ref_kept[row].tolist()), set(kept[row].tolist())
        if expected == got:
            rows.append({"row": row, "equal": True})
            continue
        boundary = float(np.sort(ref_scores[row])[::-1][k - 1])
        scale = max(float(np.abs(ref_scores[row]).max()), 1e-12)
        differing = sorted(expected ^ got)
        gaps = {int(i): abs(float(ref_scores[row, i]) - boundary) for i in differing}
        tie = all(gap <= tol * scale for gap in gaps.values())
        near_ties += int(tie)
        mismatches += int(not tie)
        rows.append({"row": row, "equal": False, "near_tie": tie, "only_reference": sorted(expected - got),
                     "only_onnx": sorted(got - expected), "boundary_gaps": gaps})
    return {"passed": mismatches == 0, "rows": rows, "near_ties": near_ties, "mismatches": mismatches}


def compare_scores_to_bounds(lower: np.ndarray, upper: np.ndarray, scores: np.ndarray, slack_rtol: float) -> dict[str, Any]:
    """Rank-count scores (CATP): every ONNX score must lie in the reference's [lower, upper] — the scores reachable
    when attention probabilities within the tie tolerance rank either way — up to ``slack_rtol`` of the largest score
    (float summation and image-importance weights)."""
    if lower.shape != scores.shape:
        return {"passed": False, "shape_reference": list(lower.shape), "shape_onnx": list(scores.shape)}
    scores64 = scores.astype(np.float64)
    slack = slack_rtol * max(float(np.abs(upper).max(initial=0.0)), 1e-12)
    below = np.maximum(lower - slack - scores64, 0.0)  # (B, N)
    above = np.maximum(scores64 - upper - slack, 0.0)  # (B, N)
    outside = (below > 0) | (above > 0)
    return {
        "passed": not bool(outside.any()),
        "mode": "rank bounds",
        "outside_bounds": int(outside.sum()),
        "max_violation": float(np.maximum(below, above).max(initial=0.0)),
        "max_bound_width": float((upper - lower).max(initial=0.0)),
        "tokens_with_rank_ties": int((upper - lower > slack).sum()),
        "tokens": int(scores.size),
    }


def compare_kept_sets_with_bounds(
    lower: np.ndarray, upper: np.ndarray, ref_kept: np.ndarray, kept: np.ndarray, slack_rtol: float
) -> dict[str, Any]:
    """Kept-index sets of a rank-count method. A differing row is a near-tie when every token only ONNX kept could
    score at least as high as every token only the reference kept (``upper[a] >= lower[b]``): rank ties in the
    attention probabilities explain the swap. Anything else is a mismatch."""
    rows = []
    near_ties = mismatches = 0
    for row in range(ref_kept.shape[0]):
        expected, got = set(ref_kept[row].tolist()), set(kept[row].tolist())
        if expected == got:
            rows.append({"row": row, "equal": True})
            continue
        slack = slack_rtol * max(float(np.abs(upper[row]).max()), 1e-12)
        only_reference, only_onnx = sorted(expected - got), sorted(got - expected)
        tie = min(upper[row, a] for a in only_onnx) >= max(lower[row, b] for b in only_reference) - slack
        near_ties += int(tie)
        mismatches += int(not tie)
        rows.append({"row": row, "equal": False, "near_tie": bool(tie), "only_reference": only_reference,
                     "only_onnx": only_onnx,
                     "bounds": {int(i): [float(lower[row, i]), float(upper[row, i])] for i in only_reference + only_onnx}})
    return {"passed": mismatches == 0, "mode": "rank bounds", "rows": rows, "near_ties": near_ties, "mismatches": mismatches}


def compare_tokens(
    reference: list[list[int]], actual: list[list[int]], margins: list[list[float]], tol: float, tied_rows=frozenset()
) -> dict[str, Any]:
    """Greedy tokens per row. A divergence is a near-tie when the reference's top-2 logit margin at the first
    differing step is within ``tol`` (either pick is a correct greedy decode within the tolerance), or when the row's
    kept-index set already differed by a near-tie (the two pipelines then decode from different tokens)."""
    rows = []
    near_ties = mismatches = 0
    for row, (ref, act) in enumerate(zip(reference, actual)):
        if ref == act:
            rows.append({"row": row, "equal": True, "tokens": ref})
            continue
        step = next((i for i, (a, b) in enumerate(zip(ref, act)) if a != b), min(len(ref), len(act)))
        margin = margins[row][step] if step < len(margins[row]) else float("inf")
        tie = margin <= tol or row in tied_rows
        near_ties += int(tie)
        mismatches += int(not tie)
        rows.append({"row": row, "equal": False, "near_tie": tie, "first_difference": step, "reference_margin": margin,
                     "reference": ref, "onnx": act})
    return {"passed": mismatches == 0, "rows": rows, "near_ties": near_ties, "mismatches": mismatches}


def strip_after_eos(tokens: list[int], eos: Iterable[int]) -> list[int]:
    """``tokens`` up to (not including) the first end-of-sequence id: what the runtime's answer holds."""
    eos = set(eos)
    out = []
    for token in tokens:
        if token in eos:
            break
        out.append(token)
    return out


def compare_hf_tokens(hf_tokens: list[list[int]], reference: list[list[int]], eos: Iterable[int], mode: str) -> dict[str, Any]:
    """The HF anchor: HF's own ``generate`` (its tokens cut at EOS) must give exactly the reference's tokens."""
    eos = set(eos)
    hf = [strip_after_eos(tokens, eos) for tokens in hf_tokens]
    return {"passed": hf == reference, "applicable": True, "mode": mode, "hf": hf, "reference": reference}


def same_kept_rows(ref_kept: np.ndarray, onnx_kept: np.ndarray, ref64_outputs: dict | None) -> list[int]:
    """Rows whose kept set is the same in the fp32 reference, the ONNX graph and (when present) the float64
    reference: only there are tensors after the selection comparable elementwise (other rows are near-ties, judged
    by the kept-set logic)."""
    rows = [row for row in range(ref_kept.shape[0]) if np.array_equal(ref_kept[row], onnx_kept[row])]
    if ref64_outputs is not None:
        rows = [row for row in rows if np.array_equal(ref_kept[row], ref64_outputs["kept_indices"][row])]
    return rows


def worst_exceedance(stage: Any) -> float | None:
    """The largest ``error / bound`` of any float tensor judged in ``stage`` (nested results included); None when
    the stage judged no float tensor. Below 1 passes; a failure's value says how far above the noise it is."""
    found = []
    if isinstance(stage, dict):
        if "worst_exceedance" in stage and "tensors" in stage:
            found.append(stage["worst_exceedance"])
        found += [w for value in stage.values() if (w := worst_exceedance(value)) is not None]
    elif isinstance(stage, list):
        found += [w for value in stage if (w := worst_exceedance(value)) is not None]
    return max(found) if found else None
