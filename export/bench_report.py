"""The bench's numbers: medians and spread per row, speedups against the HF baselines, the FLOP model's predicted
speedup per pruned stage next to the measured one, the JSON and the PNG."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from export.bench_systems import STAGES

REFERENCE = "hf-sdpa"  # speedups are against HF generate with sdpa attention, the same batch
MIN_FIT_SPREAD = 0.2  # fit fixed + slope × FLOPs only where the ratios change a stage's FLOPs by 20% or more
TOLERANCE = 0.15  # a pruned stage's measured speedup "matches" the FLOP model within this relative difference
CPU_SYSTEMS = ("ort-cpu", "hf-sdpa", "hf-eager")  # the systems the machine's CPU peaks bound (HF runs on the CPU here)


def spread(values: list[float]) -> dict[str, float]:
    """Median and the 10th / 90th percentiles (nearest rank) of a list of timings."""
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]

    return {"median": round(statistics.median(ordered), 4), "p10": round(at(0.1), 4), "p90": round(at(0.9), 4)}


def row_summary(row: dict) -> dict:
    runs = row["runs"]
    batch = row["batch"]
    totals = [run.total_ms for run in runs]
    outside = [run.total_ms - run.graph_ms for run in runs]
    total = statistics.median(totals)
    return {
        **{key: value for key, value in row.items() if key != "runs"},
        "stages_ms": {stage: spread([run.stages_ms[stage] for run in runs]) for stage in STAGES},
        # the request's time outside the four stages: argument checks and prompt encoding, answer assembly (runtime);
        # generate()'s own work between the model's calls (HF)
        "other_ms": spread([run.total_ms - sum(run.stages_ms[stage] for stage in STAGES) for run in runs]),
        # the first token comes from the prefill: the decode stage runs generated_tokens - 1 steps
        "decode_per_token_ms": spread([run.stages_ms["decode"] / max(1, run.generated_tokens - 1) for run in runs]),
        "ttft_ms": spread([run.ttft_ms for run in runs]),
        "total_ms": spread(totals),
        "per_answer_ms": round(total / batch, 4),
        "answers_per_s": round(batch * 1e3 / total, 2),
        "graph_ms": spread([run.graph_ms for run in runs]),
        "outside_graph_ms": spread(outside),
        "outside_graph_share": round(statistics.median(outside) / total, 4),
        "kv_cache_bytes": runs[0].kv_cache_bytes,
        "generated_tokens": runs[0].generated_tokens,
    }


def speedups(rows: list[dict]) -> list[dict]:
    """Every row's total time against each HF baseline's at the same batch (> 1: faster than HF)."""
    baselines = {(row["system"], row["batch"]): row["total_ms"]["median"] for row in rows if row["system"].startswith("hf-")}
    result = []
    for row in rows:
        against = {name: round(ms / row["total_ms"]["median"], 3)
                   for (name, batch), ms in baselines.items() if batch == row["batch"]}
        result.append({"system": row["system"], "ratio": row["ratio"], "batch": row["batch"], "speedup": against})
    return result


def flop_lines(rows: list[dict], meta: dict, config: dict) -> list[dict]:
    """Per runtime backend and batch, each pruned ratio against ratio 0: per stage, the FLOP model's predicted
    speedup and the measured one (medians)."""
    from export import flops
    from export.roofline import stage_bounds

    unpruned = {(row["system"], row["batch"]): row for row in rows if not row["system"].startswith("hf-") and row["ratio"] == 0}
    lines = []
    for row in rows:
        base = unpruned.get((row["system"], row["batch"]))
        if base is None or row["ratio"] == 0:
            continue
        costs = {name: flops.stage_costs(config, kept=r["k"], text_len=meta["text_tokens"], batch=row["batch"],
                                         new_tokens=meta["new_tokens"]) for name, r in (("full", base), ("pruned", row))}
        peaks = meta.get("machine_peaks") if row["system"] in CPU_SYSTEMS else None
        bounds = {name: stage_bounds(cost, peaks) for name, cost in costs.items()} if peaks else None
        for stage in ("visual", "prefill", "decode", "total"):
            if stage == "total":
                full = sum(costs["full"][s].flops for s in ("visual", "prefill", "decode"))
                pruned = sum(costs["pruned"][s].flops for s in ("visual", "prefill", "decode"))
                measured = base["total_ms"]["median"] / row["total_ms"]["median"]
            else:
                full, pruned = costs["full"][stage].flops, costs["pruned"][stage].flops
                measured = base["stages_ms"][stage]["median"] / row["stages_ms"][stage]["median"]
            predicted = full / pruned
            line = {"system": row["system"], "batch": row["batch"], "ratio": row["ratio"], "stage": stage,
                    "flops_removed": round(1 - pruned / full, 4), "predicted_speedup": round(predicted, 3),
                    "measured_speedup": round(measured, 3), "within_tolerance": abs(measured / predicted - 1) <= TOLERANCE}
            if bounds:  # the roofline's prediction: a stage bound by bytes gains less than its FLOPs say
                roofline = bounds["full"][stage] / bounds["pruned"][stage]
                line["roofline_speedup"] = round(roofline, 3)
                line["within_tolerance_roofline"] = abs(measured / roofline - 1) <= TOLERANCE
            lines.append(line)
    return lines


def fixed_cost_fits(rows: list[dict], lines: list[dict], meta: dict, config: dict) -> list[dict]:
    """Where a backend and batch has three or more ratios: per stage, the least-squares line time = fixed + slope ×
    FLOPs through the measured medians. ``fixed_ms`` is the part of the stage that does not shrink with k (per-call
    overhead, work outside the graphs, memory-bound reads); with it the FLOP model predicts the measured speedup
    (``predicted_with_fixed``) — the measurement that explains a pruned stage's gap to the FLOP-only prediction."""
    import numpy as np

    from export import flops

    fits = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if not row["system"].startswith("hf-"):
            groups.setdefault((row["system"], row["batch"]), []).append(row)
    for (system, batch), members in groups.items():
        if len({row["ratio"] for row in members}) < 3:
            continue
        members = sorted(members, key=lambda row: row["ratio"])
        costs = [flops.stage_costs(config, kept=row["k"], text_len=meta["text_tokens"], batch=batch,
                                   new_tokens=meta["new_tokens"]) for row in members]
        for stage in ("visual", "prefill", "decode"):
            gflops = np.array([cost[stage].flops / 1e9 for cost in costs])
            times = np.array([row["stages_ms"][stage]["median"] for row in members])
            if np.ptp(gflops) < MIN_FIT_SPREAD * gflops.max():
                continue  # pruning barely changes this stage's work: a line through noise says nothing
            slope, fixed = np.polyfit(gflops, times, 1)
            for row, flop in zip(members[1:], gflops[1:]):
                fits.append({"system": system, "batch": batch, "ratio": row["ratio"], "stage": stage,
                             "fixed_ms": round(float(fixed), 4), "ms_per_gflop": round(float(slope), 4),
                             "fixed_share_unpruned": round(float(fixed / times[0]), 4),
                             "predicted_with_fixed": round(float((fixed + slope * gflops[0]) / (fixed + slope * flop)), 3)})
    return fits


def model_costs(row: dict, meta: dict, config: dict) -> dict[str, dict[str, float]]:
    """The FLOP and bytes model's figures for a row, every stage and sub-stage (``prefill.cross_kv_build``, …):
    the split the timings cannot make inside one graph."""
    from export import flops

    costs = flops.stage_costs(config, kept=row["k"], text_len=meta["text_tokens"], batch=row["batch"],
                              new_tokens=meta["new_tokens"])
    return {name: {"gflops": round(cost.flops / 1e9, 6), "gbytes": round(cost.bytes / 1e9, 6)} for name, cost in costs.items()}


def roofline(rows: list[dict], meta: dict, config: dict) -> list[dict]:
    """With the machine's measured peaks (``meta["machine_peaks"]``): each CPU row's roofline bound per stage and
    the fraction of it reached (``row["roofline"]``); per runtime row, the most it could gain over HF sdpa at these
    peaks (HF's measured total over the row's summed bounds) next to what it gains."""
    from export import flops
    from export.roofline import ROOFLINE_STAGES, stage_bounds

    peaks = meta.get("machine_peaks")
    if not peaks:
        return []
    hf_totals = {row["batch"]: row["total_ms"]["median"] for row in rows if row["system"] == REFERENCE}
    ceilings = []
    for row in rows:
        if row["system"] not in CPU_SYSTEMS:
            continue
        costs = flops.stage_costs(config, kept=row["k"], text_len=meta["text_tokens"], batch=row["batch"],
                                  new_tokens=meta["new_tokens"])
        bounds = stage_bounds(costs, peaks)
        measured = {**{stage: row["stages_ms"][stage]["median"] for stage in ROOFLINE_STAGES},
                    "total": row["total_ms"]["median"]}
        row["roofline"] = {stage: {"bound_ms": round(bound, 6), "share": round(bound / measured[stage], 6)}
                           for stage, bound in bounds.items()}
        hf_total = hf_totals.get(row["batch"])
        if hf_total is not None and not row["system"].startswith("hf-"):
            ceilings.append({"system": row["system"], "ratio": row["ratio"], "batch": row["batch"],
                             "bound_ms": round(bounds["total"], 6), "measured_ms": round(measured["total"], 4),
                             "speedup_vs_hf": round(hf_total / measured["total"], 3),
                             "ceiling_vs_hf": round(hf_total / bounds["total"], 3)})
    return ceilings


def summarize(rows: list[dict], meta: dict, config: dict) -> dict:
    summary = [row_summary(row) for row in rows]
    for row in summary:
        row["model_costs"] = model_costs(row, meta, config)
    for row in summary:
        if row["generated_tokens"] != meta["new_tokens"]:
            from runtime.errors import BackendError

            raise BackendError(f"{row['system']} (batch {row['batch']}) generated {row['generated_tokens']} tokens, not "
                               f"{meta['new_tokens']}: rows would not do the same work")
    lines = flop_lines(summary, meta, config)
    return {"meta": meta, "rows": summary, "speedups": speedups(summary), "flop_model": lines,
            "fixed_cost_fits": fixed_cost_fits(summary, lines, meta, config), "roofline": roofline(summary, meta, config)}


def describe_line(line: dict) -> str:
    verdict = "within" if line["within_tolerance"] else "outside"
    text = (f"{line['system']} batch {line['batch']} ratio {line['ratio']:g} {line['stage']:>7}: pruning removed "
            f"{line['flops_removed']:.0%} of the FLOPs (predicted {line['predicted_speedup']:.2f}×), measured "
            f"{line['measured_speedup']:.2f}× ({verdict} {TOLERANCE:.0%})")
    if "roofline_speedup" in line:
        verdict = "within" if line["within_tolerance_roofline"] else "outside"
        text += f"; the roofline predicts {line['roofline_speedup']:.2f}× ({verdict})"
    return text


def table(report: dict) -> str:
    header = f"{'system':<9} {'ratio':>5} {'k':>4} {'batch':>5} " + " ".join(f"{s:>10}" for s in STAGES) + \
             f" {'ttft':>8} {'total':>8} {'ans/s':>8} {'outside':>7} {'vs sdpa':>7} {'peak MiB':>8} {'of peak':>7}"
    lines = [header, "-" * len(header)]
    speed = {(s["system"], s["ratio"], s["batch"]): s["speedup"].get(REFERENCE) for s in report["speedups"]}
    for row in report["rows"]:
        ratio = speed.get((row["system"], row["ratio"], row["batch"]))
        lines.append(
            f"{row['system']:<9} {row['ratio']:>5g} {row['k']:>4} {row['batch']:>5} "
            + " ".join(f"{row['stages_ms'][s]['median']:>10.3f}" for s in STAGES)
            + f" {row['ttft_ms']['median']:>8.3f} {row['total_ms']['median']:>8.3f} {row['answers_per_s']:>8.1f}"
            f" {row['outside_graph_share']:>7.1%} {ratio if ratio is not None else float('nan'):>6.2f}×"
            f" {row.get('peak_rss_mb', float('nan')):>8.0f}"
            f" {row['roofline']['total']['share'] if 'roofline' in row else float('nan'):>7.1%}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    batches = sorted({row["batch"] for row in rows})
    figure, axes = plt.subplots(2, len(batches), figsize=(5.5 * len(batches), 8), squeeze=False)
    colors = {"preprocess": "#999999", "visual": "#4c72b0", "prefill": "#dd8452", "decode": "#55a868", "other": "#c9c9c9"}
    for column, batch in enumerate(batches):
        ax = axes[0][column]
        cells = [row for row in rows if row["batch"] == batch]
        labels = [row["system"] if row["system"].startswith("hf-") else f"{row['system']}\nr{row['ratio']:g} k={row['k']}"
                  for row in cells]
        bottom = [0.0] * len(cells)
        for stage in (*STAGES, "other"):
            heights = [max(0.0, (row["other_ms"] if stage == "other" else row["stages_ms"][stage])["median"]) for row in cells]
            ax.bar(range(len(cells)), heights, bottom=bottom, color=colors[stage], label=stage,
                   hatch="//" if stage == "other" else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
        marked = False
        for index, row in enumerate(cells):  # the fastest the row's work can run at the machine's peaks
            if "roofline" in row:
                ax.hlines(row["roofline"]["total"]["bound_ms"], index - 0.4, index + 0.4, colors="black", linestyles=":",
                          label=None if marked else "roofline bound")
                marked = True
        ax.set_xticks(range(len(cells)), labels, fontsize=7)
        ax.set_ylabel("ms per request (median)")
        ax.set_title(f"stage times, batch {batch}")
        ax.legend(fontsize=7)
        ax = axes[1][column]
        for system in sorted({row["system"] for row in cells if not row["system"].startswith("hf-")}):
            points = [(s["ratio"], s["speedup"].get(REFERENCE)) for s in report["speedups"]
                      if s["system"] == system and s["batch"] == batch and s["speedup"].get(REFERENCE)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        ax.axhline(1.0, color="#999999", linestyle="--", linewidth=1)
        ax.set_xlabel("ratio (fraction of visual tokens removed)")
        ax.set_ylabel(f"speedup vs {REFERENCE} generate")
        ax.set_title(f"end to end, batch {batch}")
        ax.legend(fontsize=7)
    figure.suptitle(f"{Path(report['meta']['model']).name}: {report['meta']['new_tokens']} new tokens, "
                    f"{report['meta']['repeats']} repeats", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(report: dict, out: Path) -> None:
    """``bench.json`` and ``bench.png`` under ``out`` (each written to a temporary file, then renamed); prints the
    table and the predicted-vs-measured lines."""
    out.mkdir(parents=True, exist_ok=True)
    for name, write in (("bench.json", lambda p: p.write_text(json.dumps(report, indent=1) + "\n")),
                        ("bench.png", lambda p: plot(report, p))):
        handle, temporary = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=Path(name).suffix)
        os.close(handle)
        try:
            write(Path(temporary))
            os.replace(temporary, out / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    print(table(report))
    print()
    fits = {(f["system"], f["batch"], f["ratio"], f["stage"]): f for f in report["fixed_cost_fits"]}
    for line in report["flop_model"]:
        fit = fits.get((line["system"], line["batch"], line["ratio"], line["stage"]))
        extra = "" if fit is None else (f"; with a fixed {fit['fixed_ms']:.3g} ms ({fit['fixed_share_unpruned']:.0%} of the "
                                        f"unpruned stage) the model predicts {fit['predicted_with_fixed']:.2f}×")
        print(describe_line(line) + extra)
    peaks = report["meta"].get("machine_peaks")
    if report["roofline"]:
        print(f"\nroofline at this machine's peaks ({peaks['gflops']:g} GFLOP/s, {peaks['gbytes_per_s']:g} GB/s through "
              f"ONNX Runtime): the fastest each row's work can run, and what that allows against {REFERENCE}")
    for line in report["roofline"]:
        print(f"{line['system']} batch {line['batch']} ratio {line['ratio']:g}: bound {line['bound_ms']:.3g} ms, measured "
              f"{line['measured_ms']:.3g} ms ({line['bound_ms'] / line['measured_ms']:.0%} of peak); {line['speedup_vs_hf']:.2f}× "
              f"{REFERENCE}, at most {line['ceiling_vs_hf']:.2f}× at peak")
