#!/usr/bin/env python
"""Memory and disk of one checkpoint's build, answer and parity check, each in its own process, measured.

    python scripts/memory_report.py --model models/_presets/blip2-2.7b-full-fp16 --precision fp16 \
        --out scripts/results/memory/blip2-2.7b-full-fp16

Runs ``export/build.py``, ``runtime/infer.py`` (one shipped sample) and ``python -m runtime.parity`` one after the
other as child processes, and records for each its peak resident set size (the child's own ``ru_maxrss`` from
``wait4``: what it held at its peak, imports included), its wall time and exit status; then the engines folder's
bytes on disk (graph files, ``weights.bin``, the unique weight bytes ``weights.json`` indexes) against the
checkpoint's. Writes ``memory.json`` and ``memory.png`` (peak per step against the machine's memory) into ``--out``.
Extra flags after ``--`` go to build.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "easyvqa-test-0.png"
QUESTION = "what color is the shape?"


def run_measured(name: str, command: list[str], log: Path) -> dict:
    """``command`` as a child process (output to ``log``): its peak RSS (``wait4``), wall time and exit status."""
    print(f"[{name}] {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w") as output:
        child = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    exit_code = child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen told so
    seconds = time.perf_counter() - started
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    print(f"[{name}] exit {exit_code}, {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return {"command": command, "exit_code": exit_code, "seconds": round(seconds, 1), "peak_rss_bytes": peak,
            "log": log.name}


def disk(engines: Path, model: Path) -> dict:
    index = json.loads((engines / "weights.json").read_text())
    graph_files = {p.name: p.stat().st_size for p in engines.glob("*.onnx")}
    weights_file = (engines / "weights.bin").stat().st_size
    unique = sum(entry["length"] for entry in index["tensors"].values())
    checkpoint = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    return {"graph_files_bytes": graph_files, "weights_bin_bytes": weights_file, "unique_weight_bytes": unique,
            "graphs_total_bytes": sum(graph_files.values()) + weights_file,
            "graphs_total_over_unique": round((sum(graph_files.values()) + weights_file) / unique, 5),
            "checkpoint_safetensors_bytes": checkpoint}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step in ("build", "infer", "parity") if step in report["steps"]]
    peaks = [report["steps"][step]["peak_rss_bytes"] / 2**30 for step in steps]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(steps, peaks, color=["#4c72b0", "#55a868", "#c44e52"][: len(steps)])
    axis.axhline(report["machine_memory_bytes"] / 2**30, color="black", linestyle="--", label="machine memory")
    for x, peak in enumerate(peaks):
        axis.text(x, peak, f"{peak:.1f}", ha="center", va="bottom")
    axis.set_ylabel("peak RSS (GiB)")
    axis.set_title(f"{Path(report['model']).name} ({report['precision']}, ratio {report['ratio']})", fontsize=9)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="memory_report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True, help="folder for memory.json, memory.png and the logs")
    parser.add_argument("--engines", type=Path, default=None,
                        help="engines folder to build (default: engines/_memory/<model folder name>-<precision>)")
    parser.add_argument("--steps", default="build,infer,parity")
    parser.add_argument("--image", action="append", type=Path, default=None,
                        help="image for infer and parity (repeatable; default: a shipped easy-VQA sample for infer, "
                             "parity's own synthetic images)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    engines = args.engines or REPO / "engines" / "_memory" / f"{args.model.name}-{args.precision}"
    python = sys.executable
    commands = {
        "build": [python, "export/build.py", "--model", str(args.model), "--precision", args.precision,
                  "--ratio", str(args.ratio), "--out", str(engines), "--force", *extra],
        "infer": [python, "runtime/infer.py", "--engines", str(engines), "--image", str((args.image or [SAMPLE])[0]),
                  "--question", QUESTION, "--json"],
        "parity": [python, "-m", "runtime.parity", "--engines", str(engines), "--out", str(args.out / "parity.json"),
                   *[flag for image in args.image or [] for flag in ("--image", str(image), "--question", QUESTION)]],
    }
    report = {"model": str(args.model), "precision": args.precision, "ratio": args.ratio, "build_flags": extra,
              "images": [str(image) for image in args.image or []],
              "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
              "cpu_count": os.cpu_count(), "steps": {}}
    for step in args.steps.split(","):
        report["steps"][step] = run_measured(step, commands[step], args.out / f"{step}.log")
        if report["steps"][step]["exit_code"] != 0:
            break
    if (engines / "weights.json").is_file():
        report["disk"] = disk(engines, args.model)
    (args.out / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "memory.png")
    print(args.out / "memory.json")
    return 0 if all(step["exit_code"] == 0 for step in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
