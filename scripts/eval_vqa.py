#!/usr/bin/env python
"""Accuracy against pruning ratio: a grid of ratios × methods (× layer-weight presets × position policies).

    python scripts/eval_vqa.py                                   # default model, easy-VQA test split, ORT
    python scripts/eval_vqa.py --ratios 0,0.5,0.75 --methods catp,l2 --limit 500 --backend torch
    python scripts/eval_vqa.py --model DIR --dataset vqav2 --questions Q.json --annotations A.json --images DIR

Runs through the engines (``--backend ort-cpu``: one engines folder built and cached per configuration) or through
the PyTorch reference (``--backend torch``). Writes ``results.json``, ``predictions.jsonl``, ``results.md`` and
``accuracy_vs_ratio.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(REPO))

from runtime.errors import UsageError, cli_errors  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "blip2-easyvqa"
METHODS = ("catp", "l2", "self-attn", "random", "first-k")


@dataclass(frozen=True)
class Config:
    method: str
    ratio: float
    layer_weights: str = "uniform"
    positions: str = "original"

    @property
    def name(self) -> str:
        if self.ratio == 0:
            return "unpruned"
        weights = "" if self.method != "catp" or self.layer_weights == "uniform" else f"-w{self.layer_weights.replace(',', '_')}"
        positions = "" if self.positions == "original" else f"-{self.positions}"
        return f"{self.method}{weights}{positions}-r{self.ratio:g}"

    @property
    def series(self) -> str:
        """The line this configuration belongs to in the plot and the table."""
        weights = "" if self.method != "catp" or self.layer_weights == "uniform" else f" ({self.layer_weights})"
        positions = "" if self.positions == "original" else f" [{self.positions}]"
        return f"{self.method}{weights}{positions}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="eval_vqa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dataset", default="easy-vqa", help="easy-vqa | vqav2")
    parser.add_argument("--split", default="test", help="easy-VQA split (default test)")
    parser.add_argument("--questions", type=Path, help="vqav2: questions JSON")
    parser.add_argument("--annotations", type=Path, help="vqav2: annotations JSON")
    parser.add_argument("--images", type=Path, help="vqav2: image folder")
    parser.add_argument("--ratios", default="0,0.5,0.75,0.875,0.9375")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layer-weights", default="uniform", help="CATP presets, ';'-separated (custom lists use commas)")
    parser.add_argument("--image-importance", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--positions", default="original", help="comma list: original, compact")
    parser.add_argument("--positions-for", default=None, help="methods that get every policy of --positions (default all)")
    parser.add_argument("--backend", default="ort-cpu", help="ort-cpu | torch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--prompt-template", default=None)
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines-cache", type=Path, default=REPO / "engines" / "_eval")
    parser.add_argument("--out", type=Path, default=None, help="default scripts/results/<dataset>-<backend>/")
    return parser.parse_args(argv)


def grid(args) -> list[Config]:
    from export.pruning import check_method, keep_count

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ratios must be a comma list of numbers, got {args.ratios!r}") from None
    for ratio in ratios:
        keep_count(32, ratio)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        check_method(method)
    presets = [w.strip() for w in args.layer_weights.split(";") if w.strip()]
    policies = [p.strip() for p in args.positions.split(",") if p.strip()]
    for policy in policies:
        if policy not in ("original", "compact"):
            raise UsageError(f"--positions takes original and/or compact, got {policy!r}")
    all_policies_for = set(methods if args.positions_for is None else args.positions_for.split(","))
    configs = [Config("catp", 0.0)] if 0.0 in ratios else []
    for ratio in (r for r in ratios if r > 0):
        for method in methods:
            for weights in (presets if method == "catp" else ["uniform"]):
                for policy in (policies if method in all_policies_for else policies[:1]):
                    configs.append(Config(method, ratio, weights, policy))
    return configs


class PipelineFactory:
    """One pipeline per configuration: cached ONNX engines (ort-cpu) or the PyTorch reference (torch)."""

    def __init__(self, args):
        self.args = args
        self.adapter = None
        if args.backend not in ("ort-cpu", "torch"):
            raise UsageError(f"--backend must be ort-cpu or torch, got {args.backend!r}")
        from export.adapters.blip2 import weights_sha256

        self.weights = weights_sha256(args.model)

    def options(self, config: Config, out: Path | None = None):
        from export.builder import BuildOptions
        from export.pruning import PruningConfig

        return BuildOptions(
            model=self.args.model, out=out, positions=config.positions, max_batch=self.args.batch_size,
            prompt_template=self.args.prompt_template,
            pruning=PruningConfig(method=config.method, ratio=config.ratio, layer_weights=config.layer_weights,
                                  image_importance=self.args.image_importance),
        )

    def __call__(self, config: Config):
        from runtime.manifest import Manifest

        cache = self.args.engines_cache / self.args.model.name
        if self.args.backend == "torch":
            from export import adapters
            from export.builder import reference_pipeline

            if self.adapter is None:
                self.adapter = adapters.detect(self.args.model)(self.args.model, "fp32")
            return reference_pipeline(self.options(config), cache / f"torch-{config.name}", self.adapter)

        from export.builder import build
        from runtime.backends import load_runners
        from runtime.pipeline import make_pipeline

        folder = cache / f"{config.name}{'-ii' if self.args.image_importance else ''}"
        manifest = None
        if (folder / "manifest.json").is_file():
            manifest = Manifest.load(folder)
            if manifest.model.get("weights_sha256") != self.weights or manifest.text["prompt_template"] != (
                self.args.prompt_template or manifest.text["prompt_template"]
            ):
                manifest = None
        if manifest is None:
            manifest = Manifest.load(build(self.options(config, folder), cache, quiet=True))
        manifest.max_batch = self.args.batch_size
        return make_pipeline(manifest, load_runners(manifest, "ort-cpu"))


def evaluate(pipeline, dataset, batch_size: int, max_new_tokens: int, label: str):
    """Answer every question (batched, with progress); return (accuracy, per-question records)."""
    from tqdm import tqdm

    from runtime.preprocess import load_image

    images: dict[str, object] = {}
    records, total = [], 0.0
    samples = dataset.samples
    with tqdm(total=len(samples), desc=label, unit="q", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            for sample in batch:
                if sample.image not in images:
                    images[sample.image] = load_image(sample.image)
            answers = pipeline.answer([images[s.image] for s in batch], [s.question for s in batch], max_new_tokens)
            for sample, answer in zip(batch, answers):
                score = dataset.score(answer.answer, sample)
                total += score
                records.append({"question_id": sample.question_id, "question": sample.question,
                                "prediction": answer.answer, "answers": sample.answers, "score": score,
                                "kept_indices": answer.kept_indices})
            bar.update(len(batch))
    return total / len(samples), records


def write_outputs(out: Path, meta: dict, results: list[dict], predictions: dict[str, list]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as handle:
        for name, records in predictions.items():
            for record in records:
                handle.write(json.dumps({"config": name, **record}) + "\n")
    (out / "results.md").write_text(markdown_table(meta, results))
    plot(out / "accuracy_vs_ratio.png", meta, results)


def markdown_table(meta: dict, results: list[dict]) -> str:
    unpruned = next((r for r in results if r["ratio"] == 0), None)
    series = list(dict.fromkeys(r["series"] for r in results if r["ratio"] > 0))
    ratios = sorted({r["ratio"] for r in results if r["ratio"] > 0})
    cell = {(r["series"], r["ratio"]): r for r in results}
    lines = [f"Accuracy (%) on {meta['dataset']} {meta['split']} ({meta['questions']} questions), backend {meta['backend']}, "
             f"model {Path(meta['model']).name}." + (f" Unpruned: **{100 * unpruned['accuracy']:.2f}**." if unpruned else ""), ""]
    lines.append("| ratio | kept | " + " | ".join(series) + " |")
    lines.append("|---|---|" + "---|" * len(series))
    if unpruned:
        lines.append(f"| 0 | {unpruned['k']}/{unpruned['num_tokens']} | " + " | ".join(f"{100 * unpruned['accuracy']:.2f}" for _ in series) + " |")
    for ratio in ratios:
        any_result = next(cell[(s, ratio)] for s in series if (s, ratio) in cell)
        row = [f"{100 * cell[(s, ratio)]['accuracy']:.2f}" if (s, ratio) in cell else "" for s in series]
        lines.append(f"| {ratio:g} | {any_result['k']}/{any_result['num_tokens']} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, meta: dict, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for series in dict.fromkeys(r["series"] for r in results if r["ratio"] > 0):
        points = sorted((r["kept_fraction"], 100 * r["accuracy"]) for r in results if r["series"] == series)
        axes.plot(*zip(*points), marker="o", label=series)
    unpruned = next((r for r in results if r["ratio"] == 0), None)
    if unpruned:
        axes.axhline(100 * unpruned["accuracy"], color="black", linestyle="--", linewidth=1, label="unpruned")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("kept fraction of visual tokens (k / N)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{Path(meta['model']).name} on {meta['dataset']} {meta['split']} ({meta['questions']} q, {meta['backend']})")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli_errors("eval_vqa.py"):
        from export.pruning import keep_count
        from runtime import vqa

        if not (args.model / "config.json").is_file():
            raise UsageError(f"--model {args.model} is not a checkpoint folder")
        if args.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if args.dataset == "easy-vqa":
            dataset = vqa.load_easy_vqa(args.split)
        elif args.dataset == "vqav2":
            dataset = vqa.load_vqav2(args.questions, args.annotations, args.images)
        else:
            raise UsageError(f"--dataset must be easy-vqa or vqav2, got {args.dataset!r}")
        dataset = vqa.subset(dataset, args.limit, args.seed)
        configs = grid(args)
        factory = PipelineFactory(args)
        out = args.out or REPO / "scripts" / "results" / f"{dataset.name}-{args.backend}"
        num_tokens = json.loads((args.model / "config.json").read_text()).get("num_query_tokens", 32)
        meta = {"dataset": dataset.name, "split": dataset.split, "metric": dataset.metric, "questions": len(dataset.samples),
                "limit": args.limit, "seed": args.seed, "model": str(args.model), "weights_sha256": factory.weights,
                "backend": args.backend, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                "image_importance": args.image_importance, "command": "python scripts/eval_vqa.py " + " ".join(argv or sys.argv[1:])}
        results, predictions = [], {}
        for number, config in enumerate(configs, 1):
            started = time.perf_counter()
            pipeline = factory(config)
            accuracy, records = evaluate(pipeline, dataset, args.batch_size, args.max_new_tokens, config.name)
            elapsed = time.perf_counter() - started
            k = keep_count(num_tokens, config.ratio)
            results.append({"config": config.name, "series": config.series, "method": config.method, "ratio": config.ratio,
                            "k": k, "num_tokens": num_tokens, "kept_fraction": k / num_tokens,
                            "layer_weights": config.layer_weights, "positions": config.positions,
                            "accuracy": accuracy, "questions": len(records), "seconds": round(elapsed, 2)})
            predictions[config.name] = records
            print(f"[{number}/{len(configs)}] {config.name:<28} accuracy {100 * accuracy:6.2f}%  ({elapsed:.1f}s)", file=sys.stderr, flush=True)
            write_outputs(out, meta, results, predictions)  # after every configuration: partial results survive
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
