"""Decode-step and per-answer timings of built engines on ONNX Runtime (CPU): the measurement behind the README's
KV-cache table.

    python scripts/kv_cache_timing.py --engines engines/blip2-easyvqa-catp-r0.5 --label after --out timing.json

Generation ignores EOS (as TensorRT-LLM's benchmarks do) so that every answer runs ``--new-tokens`` steps. The
decode step time is the decode stage's time over its steps (``timings_ms['decode'] / (tokens − 1)``), the same
arithmetic for any version of the runtime; per answer is ``timings_ms['total']``. Each figure is the median over
``--repeats`` runs after one warm-up. ``--io-binding both`` times the plain host path and ORT IO binding.
It runs on the runtime it imports, so the previous version (concatenating cache) is timed by running this file with
that version on ``PYTHONPATH`` and engines it built.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def make_pipeline(manifest, backend: str):
    from runtime.backends import load_runners

    try:
        from runtime.pipelines import make_pipeline as make
    except ImportError:  # the runtime before runtime/pipelines/
        from runtime.pipeline import make_pipeline as make
    return make(manifest, load_runners(manifest, backend))


def time_engines(engines: Path, batch: int, new_tokens: int, repeats: int, io_binding: bool | None) -> dict:
    from runtime.manifest import Manifest

    manifest = Manifest.load(engines)
    pipeline = make_pipeline(manifest, "ort-cpu")
    if io_binding is not None:
        pipeline.io_binding = io_binding
    pipeline.text.eos_token_ids = []  # ignore EOS: every answer decodes new_tokens tokens
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(batch)]
    questions = ["what shape is in the image?"] * batch
    steps, totals = [], []
    for run in range(repeats + 1):
        answers = pipeline.answer(images, questions, max_new_tokens=new_tokens)
        if run == 0:
            continue  # warm-up
        timings = answers[0].timings_ms
        decode_steps = len(answers[0].token_ids) - 1  # the first token comes from the prefill
        if decode_steps < 1:
            raise SystemExit(f"{engines}: no decode step ran ({answers[0].finish_reason}); lower --new-tokens")
        steps.append(timings["decode"] / decode_steps)
        totals.append(timings["total"] / batch)
    return {"engines": str(engines), "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
            "io_binding": io_binding, "decode_step_ms": round(statistics.median(steps), 3),
            "per_answer_ms": round(statistics.median(totals), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, nargs="+", required=True)
    parser.add_argument("--label", required=True, help="what runtime this is, e.g. before / after")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16, help="the default model has 20 positions left after its prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--io-binding", choices=["off", "on", "both", "none"], default="both",
                        help="none: a runtime without the option (the previous version)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file; results are appended under --label")
    args = parser.parse_args(argv)
    modes = {"off": [False], "on": [True], "both": [False, True], "none": [None]}[args.io_binding]
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = []
    for engines in args.engines:
        for mode in modes:
            row = time_engines(engines, args.batch, args.new_tokens, args.repeats, mode)
            print(json.dumps({"label": args.label, **row}), flush=True)
            rows.append(row)
    import os
    import platform

    import onnxruntime

    results[args.label] = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                       "onnxruntime": onnxruntime.__version__}, "rows": rows}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
