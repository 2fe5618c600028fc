"""Torch-free parity against a saved reference: on a machine without torch (TensorRT, CUDA),

    python -m runtime.parity --engines E --reference-outputs REF.json --backend ort-cuda

replays every graph call ``--save-reference`` recorded (``runtime/parity/run_results.py``: inputs, fp32 and float64
outputs in Polygraphy's formats) through the chosen backend, and judges each call's outputs with the criterion of
the full run (``runtime/tolerance.py``): against the saved float64 outputs, calibrated on the saved fp32 ones' noise;
where no float64 outputs were saved (parity ran with the relative calibration) by the relative criterion, which the
report and the CLI say. Each graph is fed the reference's own inputs, so a graph's error never reaches the next.

A call whose graph selects tokens (outputs ``kept_indices`` and ``scores``) is judged as the full run judges
continuous scores: the scores by the criterion, the kept *sets* with near-ties at the selection boundary allowed
(``score_rtol``), the other outputs on the rows whose kept set agrees. The rank-count bounds of CATP and trim-union
need the PyTorch model, so a replay holds those scores to the plain criterion: stricter than the full run, which
remains the judge of a rank-tie swap. Token generation and the HF anchors are the full run's (they need torch).

The report (``ENGINES/parity.json`` unless ``--out``) has one stage per graph, each listing its calls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UsageError
from runtime.parity import run_results
from runtime.parity.compare import (compare_kept_sets, compare_kept_sets_with_bounds, compare_scores_to_bounds, judge,
                                    same_kept_rows)
from runtime.parity.report import check_report_path, show_summary, write_report
from runtime.parity.stages import cast_feeds, open_engines, report_head, stderr_say
from runtime.tolerance import Calibration

SELECTION = ("kept_indices", "scores")  # the outputs of a graph that selects visual tokens


def replay_calibration(saved: run_results.SavedReference, precision: str, requested: str) -> Calibration:
    """float64 where the float64 outputs were saved (``auto``, ``float64``), else relative and why."""
    if requested == "relative":
        return Calibration("relative", precision, why="--calibration relative")
    if saved.float64 is None:
        if requested == "float64":
            raise UsageError(f"--calibration float64: {saved.outputs_path} has no {run_results.FLOAT64_RUNNER!r} outputs "
                             "(the reference was saved with the relative calibration)")
        return Calibration("relative", precision, why=f"{saved.outputs_path} has no float64 outputs "
                                                     "(the reference was saved with the relative calibration)")
    return Calibration("float64", precision)


def judge_call(ref32: dict[str, np.ndarray], ref64: dict[str, np.ndarray] | None, actual: dict[str, np.ndarray],
               calibration: Calibration, tol: dict[str, float], bounds: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """One call's verdict: every output by the criterion; a token selection's kept sets with near-ties allowed, and
    rank-count scores (CATP, trim-union) inside the saved bounds, as the full parity run judges them."""
    names = list(ref32)
    if not set(SELECTION) <= set(names):
        return judge(ref32, ref64, actual, names, calibration)
    rows = same_kept_rows(ref32["kept_indices"], actual["kept_indices"], ref64)
    if bounds:
        lower, upper = bounds[run_results.LOWER], bounds[run_results.UPPER]  # (B, N) each
        scores = compare_scores_to_bounds(lower, upper, actual["scores"], tol["score_rtol"])
        kept = compare_kept_sets_with_bounds(lower, upper, ref32["kept_indices"], actual["kept_indices"], tol["score_rtol"])
    else:
        scores = judge(ref32, ref64, actual, ["scores"], calibration)
        kept = compare_kept_sets(ref32["scores"], ref32["kept_indices"], actual["kept_indices"], tol["score_rtol"])
    verdict = {
        "scores": scores,
        "kept_indices": kept,
        "tensors": judge(ref32, ref64, actual, [name for name in names if name not in SELECTION], calibration, rows),
    }
    verdict["passed"] = all(part["passed"] for part in verdict.values())
    return verdict


def graph_stage(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """A graph's stage: passes when every call does; near-ties and mismatches of kept sets summed over the calls."""
    stage: dict[str, Any] = {"passed": all(call["passed"] for call in calls), "calls": calls}
    kept = [call["kept_indices"] for call in calls if "kept_indices" in call]
    if kept:
        stage["near_ties"] = sum(k["near_ties"] for k in kept)
        stage["mismatches"] = sum(k["mismatches"] for k in kept)
    return stage


def replay_parity(
    engines: str | Path,
    reference_outputs: str | Path,
    reference_inputs: str | Path | None = None,
    backend: str = "ort-cpu",
    out_json: str | Path | None = None,
    quiet: bool = False,
    calibration: str = "auto",
) -> dict[str, Any]:
    """Judge the engines in ``engines`` against a reference saved by ``run_parity(save_reference=...)``; write
    ``parity.json`` (or ``out_json``); return the report."""
    from runtime.backends import load_runners

    say = stderr_say(quiet)
    manifest, checked, tol = open_engines(engines, calibration, backend)
    out_path = check_report_path(out_json, engines)
    saved = run_results.load_saved_reference(reference_outputs, reference_inputs)
    signatures = run_results.graph_signatures(manifest)
    graphs = [run_results.graph_of(signatures, feeds, outputs, index)
              for index, (feeds, outputs) in enumerate(zip(saved.feeds, saved.fp32))]
    chosen = replay_calibration(saved, manifest.precision, calibration)
    if chosen.mode != "float64":
        say(f"float tensors judged with a relative tolerance: {chosen.why}")
    runners = load_runners(manifest, backend)

    say(f"replaying {len(graphs)} saved graph call(s) through {backend}")
    verdicts: dict[str, list[dict[str, Any]]] = {graph: [] for graph in manifest.graphs}
    for index, graph in enumerate(graphs):
        actual = runners[graph].run(cast_feeds(saved.feeds[index], manifest.graphs[graph]))
        ref64 = saved.float64[index] if chosen.mode == "float64" else None
        bounds = saved.bounds[index] if saved.bounds is not None else None
        verdicts[graph].append({"call": index, **judge_call(saved.fp32[index], ref64, actual, chosen, tol, bounds)})
    stages: dict[str, Any] = {"integrity": checked}
    for graph, calls in verdicts.items():
        stages[graph] = graph_stage(calls) if calls else {"passed": True, "skipped": "the saved reference never ran this graph"}
    report = {
        **report_head(engines, backend, manifest, tol, chosen),
        "reference": {"outputs": str(saved.outputs_path), "inputs": str(saved.inputs_path), "calls": len(graphs),
                      "float64": saved.float64 is not None},
        "stages": stages,
        "passed": all(stage["passed"] for stage in stages.values()),
    }
    write_report(out_path, report)
    if not quiet:
        show_summary(stages, report["passed"], out_path)
    return report
