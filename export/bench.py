"""``vtprune bench`` / ``scripts/bench.py``: what pruning buys, per stage, against Hugging Face ``generate``.

    python scripts/bench.py                                  # the default model: ratios 0/0.5/0.75, batch 1/8
    python scripts/bench.py --model models/_presets/blip2-2.7b-d2 --batches 1,8 --repeats 5

A grid of ratios × batch sizes × runtime backends, plus HF ``generate`` with ``sdpa`` and ``eager`` attention on the
same checkpoint, the same images and question, and the same number of generated tokens (EOS ignored everywhere, so
every row does the same work). Measured in one process, interleaved (each repetition runs every system once, in a
rotating order), after warm-up runs: per stage (preprocess, visual, prefill, decode), time to first token, total per
request, answers/s, time inside graph runs, KV-cache bytes; peak memory in a fresh process per row (``--memory``);
each CPU row's roofline bound at this machine's measured matmul peaks (``--roofline``, ``export/roofline.py``).
ONNX Runtime's threads do not spin by default here (``--ort-spinning``): spinning threads left behind by one
system slow down the next one — PyTorch most of all (README "Speed").

Writes ``bench.json`` and ``bench.png`` (stacked stage times against ratio per backend and batch; speedup against
HF sdpa) under ``--out``, and prints, per pruned stage, the FLOP model's predicted speedup next to the measured one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from export.bench_report import summarize, write_outputs

HF_BASELINES = {"hf-sdpa": "sdpa", "hf-eager": "eager"}
DEFAULT_QUESTION = "what shape is in the image?"


def parse_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
    return parse


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 640x480, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return width, height


def model_image_size(preprocess: dict) -> tuple[int, int]:
    """(W, H) the model takes without resizing: BLIP-2's ``size``; Mllama's tile side × a square grid of its tiles."""
    if "size" in preprocess:
        height, width = preprocess["size"]
        return int(width), int(height)
    side = int(preprocess["tile_size"]) * max(1, int(int(preprocess["max_image_tiles"]) ** 0.5))
    return side, side


def build_parser() -> argparse.ArgumentParser:
    from export.defaults import DEFAULT_MODEL_NOTE, EVAL_ENGINES_CACHE, EVAL_RESULTS

    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", type=Path, help=f"local HF checkpoint (default: {DEFAULT_MODEL_NOTE})")
    parser.add_argument("--ratios", type=parse_list(float), default=[0.0, 0.5, 0.75], help="default 0,0.5,0.75")
    parser.add_argument("--batches", type=parse_list(int), default=[1, 8], help="default 1,8")
    parser.add_argument("--backends", type=parse_list(str), default=["ort-cpu"], help="runtime backends (default ort-cpu)")
    parser.add_argument("--baselines", type=parse_list(str), default=list(HF_BASELINES),
                        help="HF generate baselines: hf-sdpa,hf-eager (default both; '' for none)")
    parser.add_argument("--method", help="pruning method (default: the family's own: catp / trim-sum)")
    parser.add_argument("--new-tokens", type=int, default=8, help="generated tokens per answer, EOS ignored (default 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per system (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per system first (default 3)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--image-size", type=parse_size, help="WxH of the input images (default: the model's own input "
                        "size — every tile for LLaMA-3.2-Vision — so that preprocessing is the pipeline's, not a "
                        "photo's resize; e.g. 640x480 to include that)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for ONNX Runtime sessions and PyTorch (default 0: each library's own)")
    parser.add_argument("--ort-spinning", action="store_true", help="let ONNX Runtime's threads spin (see above)")
    parser.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                        help="measure this machine's matmul peaks through ONNX Runtime (~5 s) and report each CPU "
                             "row's roofline bound and the fraction of it reached (default on)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="peak RSS per row, each in a fresh process (default on)")
    parser.add_argument("--engines-cache", type=Path, default=EVAL_ENGINES_CACHE,
                        help="engines built here per configuration and reused (shared with the evaluation)")
    parser.add_argument("--out", type=Path, help="output folder (default scripts/results/bench-<model>)")
    parser.set_defaults(results_root=EVAL_RESULTS)
    return parser


def check_args(args: argparse.Namespace) -> None:
    from runtime.errors import UsageError

    if not args.backends:
        raise UsageError("--backends: name at least one runtime backend (ort-cpu, ort-cuda, trt)")
    unknown = [name for name in args.baselines if name not in HF_BASELINES]
    if unknown:
        raise UsageError(f"unknown --baselines {', '.join(unknown)}; choose from {', '.join(HF_BASELINES)}")
    if any(not 0 <= ratio < 1 for ratio in args.ratios) or not args.ratios:
        raise UsageError("--ratios: each must lie in [0, 1)")
    if not args.batches or min(args.batches) < 1:
        raise UsageError("--batches: each must be at least 1")
    for flag in ("new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be at least 0")


def sample_images(count: int, size: tuple[int, int]):
    """``count`` deterministic RGB images of ``size`` (W, H) (random pixels: timing does not depend on content)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def build_engines(args: argparse.Namespace, model: Path) -> dict[float, Path]:
    """One engines folder per ratio, built once and cached (the evaluation's cache)."""
    from export.eval_pipelines import Config, Pipelines

    cache_args = argparse.Namespace(engines_cache=args.engines_cache, batch_size=max(args.batches), backend="ort-cpu",
                                    prompt_template=None)
    pipelines = Pipelines(cache_args, model)
    method = args.method or pipelines.adapter_cls.default_method
    configs = {ratio: Config(method=method, ratio=ratio) for ratio in args.ratios}
    pipelines.validate(list(configs.values()))
    pipelines.prepare(list(configs.values()))
    return {ratio: pipelines.folder(config) for ratio, config in configs.items()}


def make_systems(args: argparse.Namespace, model: Path, folders: dict[float, Path]) -> list[tuple[dict, object]]:
    """(description, system) for every runtime backend × ratio and every HF baseline."""
    from export.bench_systems import HF_SYSTEMS, PipelineSystem
    from runtime.backends.ort import OrtSettings
    from runtime.errors import UsageError
    from runtime.manifest import Manifest

    systems = []
    settings = OrtSettings(threads=args.threads, spinning=args.ort_spinning)
    for backend in args.backends:
        for ratio, folder in folders.items():
            system = PipelineSystem(folder, backend, settings if backend.startswith("ort") else None)
            pruning = system.manifest.pruning
            systems.append(({"system": backend, "ratio": ratio, "k": pruning.k, "num_visual_tokens": pruning.num_visual_tokens,
                             "engines": str(folder)}, system))
    manifest = Manifest.load(folders[min(folders)], verify=False)
    if manifest.family not in HF_SYSTEMS:
        raise UsageError(f"no HF baseline for model family {manifest.family!r}")
    for name in args.baselines:
        system = HF_SYSTEMS[manifest.family](model, HF_BASELINES[name], manifest, threads=args.threads or None)
        systems.append(({"system": name, "ratio": 0.0, "k": manifest.pruning.num_visual_tokens,
                         "num_visual_tokens": manifest.pruning.num_visual_tokens, "engines": str(folders[min(folders)])},
                        system))
    return systems


def measure(args: argparse.Namespace, systems, images, say, probe=None) -> list[dict]:
    """Interleaved timing: every repetition runs every (system, batch) once, in a rotating order (and samples the
    machine's peaks once, where a ``probe`` is given)."""
    cells = [(describe, system, batch) for batch in args.batches for describe, system in systems]
    runs: dict[int, list] = {index: [] for index in range(len(cells))}
    total = args.warmup + args.repeats
    for repetition in range(total):
        shift = repetition % len(cells)
        for index in [*range(shift, len(cells)), *range(shift)]:
            describe, system, batch = cells[index]
            run = system.run(images[:batch], [args.question] * batch, args.new_tokens)
            if repetition >= args.warmup:
                runs[index].append(run)
        if probe is not None and repetition >= args.warmup:
            probe.sample()
        say(f"repetition {repetition + 1}/{total}" + (" (warm-up)" if repetition < args.warmup else ""))
    return [{**describe, "batch": batch, "runs": runs[index]} for index, (describe, system, batch) in enumerate(cells)]


def peak_rss_mb(args: argparse.Namespace, model: Path, row: dict, image_size: tuple[int, int]) -> float:
    """Peak resident memory of a fresh process that loads the row's system and answers once (imports included)."""
    request = {"row": {key: row[key] for key in ("system", "batch", "engines") if key in row}, "model": str(model),
               "question": args.question, "new_tokens": args.new_tokens, "threads": args.threads, "image_size": image_size,
               "baseline": HF_BASELINES.get(row["system"])}
    result = subprocess.run([sys.executable, "-m", "export.bench_memory", json.dumps(request)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if result.returncode != 0:
        from runtime.errors import BackendError

        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"memory probe of {row['system']} (batch {row['batch']}) failed: {last}")
    return float(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from export.defaults import resolve_model
    from runtime.errors import cli_errors

    args = build_parser().parse_args(argv)
    with cli_errors("bench.py"):
        check_args(args)
        model = resolve_model(args.model)
        out = args.out or args.results_root / f"bench-{model.name}"
        say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        started = time.perf_counter()
        say(f"engines for ratios {', '.join(f'{r:g}' for r in args.ratios)}")
        folders = build_engines(args, model)
        say("loading systems")
        systems = make_systems(args, model, folders)
        first = next(system for _, system in systems if hasattr(system, "manifest"))
        image_size = args.image_size or model_image_size(first.manifest.preprocess)
        images = sample_images(max(args.batches), image_size)
        text_length = next(system for _, system in systems if hasattr(system, "text_length")).text_length(args.question)
        probe = None
        if args.roofline:
            from export.roofline import PeakProbe

            probe = PeakProbe(args.threads, args.ort_spinning)  # sampled between repetitions
        rows = measure(args, systems, images, say, probe)
        peaks = probe.result() if probe is not None else None
        del probe  # its 256 MiB weight
        if args.memory:
            for number, row in enumerate(rows, 1):
                say(f"peak memory [{number}/{len(rows)}] {row['system']} ratio {row['ratio']:g} batch {row['batch']}")
                row["peak_rss_mb"] = peak_rss_mb(args, model, row, image_size)
        meta = {"model": str(model), "question": args.question, "text_tokens": text_length, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads, "ort_spinning": args.ort_spinning,
                "image_size": list(image_size), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                            "processor": platform.processor()}}
        if peaks is not None:
            meta["machine_peaks"] = peaks
        report = summarize(rows, meta, json.loads((model / "config.json").read_text()))
        report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(report, out)
        say(f"wrote {out / 'bench.json'} and {out / 'bench.png'} in {report['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
