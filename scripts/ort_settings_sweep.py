#!/usr/bin/env python
"""ONNX Runtime session settings against the pipeline's speed, and where the time outside graph runs goes: the
measurement behind README "Speed" (thread spinning, intra-op threads, graph optimization level).

    python scripts/ort_settings_sweep.py --engines engines/blip2-easyvqa-catp-r0.5 --out scripts/results/speed/ort-settings.json

Every setting gets its own pipeline (one ONNX Runtime session per graph, as ``infer.py`` makes them); all of them
answer the same images and question in one process, interleaved (each repetition runs every setting once, in a
rotating order), EOS ignored. Per setting and batch: the median per request, the time inside graph runs, and the
time outside them per stage. Engines folders of other versions may be added (``--engines A B``): each is a row, so a
graph change is timed before/after in one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

SETTINGS = {  # name → OrtSettings fields
    "no spinning (default)": {"spinning": False},
    "spinning (ORT's own default)": {"spinning": True},
    "1 thread": {"threads": 1},
    "optimization extended": {"optimization": "extended"},
    "optimization basic": {"optimization": "basic"},
    "shared weights": {"share_weights": True},
    "shared + prepacked weights": {"share_weights": True, "prepack_weights": True},
}


def stage_outside(system, run_once):
    """Run once, returning the Run and per stage the milliseconds outside graph calls (the stage's clock lap minus
    the graph time the ledger counted during it)."""
    import runtime.pipelines.base as base

    laps: dict[str, float] = {}
    ledger = system.ledger
    original = base.Clock.lap

    def lap(clock, name):
        before = getattr(clock, "_graph", 0.0)
        original(clock, name)
        laps[name] = clock.laps[name] - (ledger.seconds - before) * 1e3
        clock._graph = ledger.seconds

    base.Clock.lap = lap
    try:
        return run_once(), laps
    finally:
        base.Clock.lap = original


def isolated(args: argparse.Namespace) -> int:
    """Every (round, setting) in a fresh process of this script; rows gain their round."""
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(1, args.isolated + 1):
            for name in args.settings:
                out = Path(scratch) / f"{round_number}-{len(rows)}.json"
                command = [sys.executable, __file__, "--engines", *map(str, args.engines), "--settings", name,
                           "--batches", *map(str, args.batches), "--new-tokens", str(args.new_tokens),
                           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--out", str(out)]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                for row in json.loads(out.read_text())["rows"]:
                    rows.append({"round": round_number, **row})
                    print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "new_tokens": args.new_tokens, "isolated_rounds": args.isolated,
                                    "rows": rows}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, nargs="+", required=True)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--isolated", type=int, default=0, metavar="ROUNDS",
                        help="each setting alone in its own process, ROUNDS rounds alternating (see above)")
    args = parser.parse_args(argv)
    if args.isolated:
        return isolated(args)

    from export.bench import model_image_size, sample_images
    from export.bench_systems import PipelineSystem
    from runtime.backends.ort import OrtSettings

    systems = []
    for engines in args.engines:
        for name in args.settings if len(args.engines) == 1 else args.settings[:1]:
            systems.append(({"engines": str(engines), "setting": name},
                            PipelineSystem(engines, "ort-cpu", OrtSettings(**SETTINGS[name]))))
    images = sample_images(max(args.batches), model_image_size(systems[0][1].manifest.preprocess))

    question = "what shape is in the image?"
    cells = [(describe, system, batch) for batch in args.batches for describe, system in systems]
    results = {index: [] for index in range(len(cells))}
    for repetition in range(args.warmup + args.repeats):
        shift = repetition % len(cells)
        for index in [*range(shift, len(cells)), *range(shift)]:
            describe, system, batch = cells[index]
            # the Clock's laps are only patched here: each system's ledger is its own
            run, outside = stage_outside(system, lambda: system.run(images[:batch], [question] * batch, args.new_tokens))
            if repetition >= args.warmup:
                results[index].append((run, outside))
    from runtime.memory import peak_rss_bytes

    process_peak = round(peak_rss_bytes() / 2**20)  # the whole process: one setting's own figure under --isolated
    rows = []
    for index, (describe, system, batch) in enumerate(cells):
        runs = results[index]
        total = statistics.median(run.total_ms for run, _ in runs)
        graph = statistics.median(run.graph_ms for run, _ in runs)
        outside = statistics.median(run.total_ms - run.graph_ms for run, _ in runs)
        stages = {stage: round(statistics.median(run.stages_ms[stage] for run, _ in runs), 3) for stage in runs[0][0].stages_ms}
        row = {**describe, "batch": batch, "process_peak_rss_mb": process_peak, "stages_ms": stages,
               "total_ms": round(total, 3), "graph_ms": round(graph, 3),
               "outside_graph_ms": round(outside, 3), "outside_share": round(outside / total, 4),
               "outside_by_stage_ms": {stage: round(statistics.median(o[stage] for _, o in runs), 3) for stage in runs[0][1]}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "new_tokens": args.new_tokens, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
