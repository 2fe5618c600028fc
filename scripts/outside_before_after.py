#!/usr/bin/env python
"""Time outside graph runs, per stage, for this checkout against an earlier commit: the measurement behind README
"Speed" for changes to the runtime's own (non-graph) work.

    python scripts/outside_before_after.py --before ecd8118 --out scripts/results/speed/outside-before-after.json
    python scripts/outside_before_after.py --before c2bfb7f --after aecfe18 --out …   # one change alone

The earlier commit's files are extracted to a temporary folder (``git archive``) and put first on ``PYTHONPATH`` of a
child process; every round runs one child per version, alternating, each timing the same engines folder (the graph
contract is the same) at batch 1 and 8: the median request, the time inside graph runs, and outside them per stage
(``preprocess`` … ``decode``; ``rest``: the request's checks, prompt encoding and answer assembly). Figures are the
medians over rounds of each child's medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["what is the red shape?", "what color is the shape?", "is there a circle in the image?", "what shape is this?"]


def sample_batch(batch: int, size: tuple[int, int]) -> tuple[list, list[str]]:
    """``batch`` easy-VQA sample images at ``size`` (width, height) and questions, cycling through the four samples."""
    from PIL import Image

    images = [Image.open(REPO / "samples" / f"easyvqa-test-{i % 4}.png").convert("RGB").resize(size) for i in range(batch)]
    return images, (QUESTIONS * batch)[:batch]


def child(engines: str, batches: list[int], requests: int, new_tokens: int) -> dict:
    """Runs in the version under test (its ``runtime``/``export`` first on the path)."""
    from export.bench_systems import PipelineSystem
    from ort_settings_sweep import stage_outside  # this script's folder: the lap patch, the same for both versions

    system = PipelineSystem(Path(engines), "ort-cpu")
    laps: dict[str, list[float]] = {}

    def timed(images, questions):
        result, stage_laps = stage_outside(system, lambda: system.run(images, questions, new_tokens))
        for name, outside in stage_laps.items():
            laps.setdefault(name, []).append(outside)
        return result

    height, width = system.manifest.preprocess["size"]
    result = {}
    for batch in batches:
        images, questions = sample_batch(batch, (width, height))
        for _ in range(20):
            timed(images, questions)
        laps.clear()
        runs = [timed(images, questions) for _ in range(requests)]
        total = statistics.median(run.total_ms for run in runs)
        outside = statistics.median(run.total_ms - run.graph_ms for run in runs)
        stages = {name: statistics.median(values) for name, values in laps.items()}
        result[str(batch)] = {"total_ms": total, "graph_ms": statistics.median(run.graph_ms for run in runs),
                              "outside_ms": outside, "outside_share": outside / total,
                              "outside_by_stage_ms": {**stages, "rest": outside - sum(stages.values())}}
    return result


def extract(revision: str, folder: Path) -> None:
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=REPO, capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(folder, filter="data")


def run_child(path: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--engines", str(args.engines),
               "--requests", str(args.requests), "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=path, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(results: list[dict]) -> dict:
    """Per batch, the median of every figure over rounds."""
    out = {}
    for batch in results[0]:
        figures = [result[batch] for result in results]
        out[batch] = {key: round(statistics.median(f[key] for f in figures), 4)
                      for key in ("total_ms", "graph_ms", "outside_ms", "outside_share")}
        out[batch]["outside_by_stage_ms"] = {
            stage: round(statistics.median(f["outside_by_stage_ms"][stage] for f in figures), 4)
            for stage in figures[0]["outside_by_stage_ms"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the earlier commit (any git revision)")
    parser.add_argument("--after", help="the later commit (default: this checkout as it is)")
    parser.add_argument("--engines", type=Path, default=REPO / "engines" / "blip2-easyvqa-catp-r0.5")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per batch size and child")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.engines), [1, 8], args.requests, args.new_tokens)))
        return 0
    if not args.before or not args.out:
        parser.error("--before and --out are required")
    if not (args.engines / "manifest.json").is_file():
        parser.error(f"no engines folder at {args.engines}: python export/build.py --ratio 0.5")
    args.engines = args.engines.resolve()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="outside-before-") as folder:
        before_path, after_path = Path(folder) / "before", REPO
        extract(args.before, before_path)
        if args.after:
            after_path = Path(folder) / "after"
            extract(args.after, after_path)
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for round_number in range(args.rounds):
            for name, path in (("before", before_path), ("after", after_path)):
                results[name].append(run_child(path, args))
            print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr, flush=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {"before_commit": args.before, "after_commit": args.after or f"{head} (checkout)", "engines": args.engines.name, "rounds": args.rounds,
              "requests": args.requests, "new_tokens": args.new_tokens, "seconds": round(time.perf_counter() - started, 1),
              **{name: median_of(rounds) for name, rounds in results.items()}, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for batch in report["before"]:
        before, after = report["before"][batch], report["after"][batch]
        print(f"batch {batch}: outside graph runs {before['outside_ms']:.3f} → {after['outside_ms']:.3f} ms "
              f"({before['outside_share']:.1%} → {after['outside_share']:.1%} of {before['total_ms']:.2f} → "
              f"{after['total_ms']:.2f} ms)")
        for stage in after["outside_by_stage_ms"]:
            print(f"    {stage:>10}: {before['outside_by_stage_ms'].get(stage, float('nan')):.3f} → "
                  f"{after['outside_by_stage_ms'][stage]:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
