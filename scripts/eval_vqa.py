#!/usr/bin/env python
"""Accuracy against pruning ratio: a grid of ratios × methods (× CATP layer-weight presets × position policies).

    python scripts/eval_vqa.py                                   # default model, easy-VQA test split, ORT on CPU
    python scripts/eval_vqa.py --ratios 0,0.5,0.75 --methods catp,l2 --limit 500 --backend torch
    python scripts/eval_vqa.py --layer-weights "uniform;first;0.5,1" --positions original,compact --methods catp
    python scripts/eval_vqa.py --model DIR --dataset vqav2 --questions Q.json --annotations A.json --images DIR

Ratio 0 keeps every token whatever the method, so it is evaluated once, as "unpruned". ``--backend ort-cpu`` builds
one engines folder per configuration under ``--engines-cache`` and reuses it while the model's weights are
unchanged; ``--backend torch`` runs the PyTorch reference (the same pipeline code over torch modules, the model
loaded once). easy-VQA is scored by exact match after the official VQA answer normalisation; VQAv2-format sets by
the official VQA accuracy. Writes results.json, predictions.jsonl, results.md and accuracy_vs_ratio.png to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repo importable, and never shadow top-level modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(REPO))

from runtime.errors import UsageError, cli_errors  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "blip2-easyvqa"
DEFAULT_RATIOS = "0,0.5,0.75,0.875,0.9375"
DEFAULT_METHODS = "catp,l2,self-attn,random,first-k"
BACKENDS = ("ort-cpu", "ort-cuda", "torch")
LAYER_WEIGHT_PRESETS = ("uniform", "first", "last", "first+last")  # as export.pruning (not imported for --help)
UNPRUNED_METHOD = "first-k"  # ratio 0 keeps every token in order whatever the method: the cheapest graph does it
IMAGE_CACHE_BYTES = 1 << 30  # decoded images kept across configurations (all of easy-VQA fits in a few MB)


@dataclass(frozen=True)
class Config:
    """One point of the grid."""

    method: str
    ratio: float
    layer_weights: str = "uniform"
    positions: str = "original"
    image_importance: bool = False
    seed: int = 0

    @property
    def unpruned(self) -> bool:
        return self.ratio == 0

    @property
    def series(self) -> str:
        """The line of the plot / column of the table this configuration belongs to."""
        if self.unpruned:
            return "unpruned"
        label = self.method
        if self.method == "catp" and self.layer_weights != "uniform":
            label += f" ({self.layer_weights})"
        if self.image_importance:
            label += " +ii"
        if self.method == "random" and self.seed != 0:
            label += f" (seed {self.seed})"
        if self.positions != "original":
            label += f" [{self.positions}]"
        return label

    @property
    def name(self) -> str:
        """Folder-safe, unique per configuration: ``catp-wfirst-compact-r0.5``, ``unpruned``."""
        if self.unpruned:
            return "unpruned"
        name = self.method
        if self.method == "catp" and self.layer_weights != "uniform":
            name += "-w" + self.layer_weights.replace(",", "_").replace(" ", "")
        if self.image_importance:
            name += "-ii"
        if self.method == "random":
            name += f"-s{self.seed}"
        if self.positions != "original":
            name += f"-{self.positions}"
        return f"{name}-r{self.ratio:g}"

    def pruning(self):
        from export.pruning import PruningConfig

        return PruningConfig(method=self.method, ratio=self.ratio, layer_weights=self.layer_weights,
                             image_importance=self.image_importance, seed=self.seed)


# ------------------------------------------------------------------------------------------------ flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eval_vqa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="local HF checkpoint folder (default: models/blip2-easyvqa)")
    parser.add_argument("--dataset", default="easy-vqa", help="easy-vqa (default) | vqav2")
    parser.add_argument("--split", default="test", help="easy-VQA split: test (default) | train")
    parser.add_argument("--questions", type=Path, help="vqav2: questions JSON")
    parser.add_argument("--annotations", type=Path, help="vqav2: annotations JSON")
    parser.add_argument("--images", type=Path, help="vqav2: image folder (COCO_<subtype>_<id:012d>.jpg, *<id:012d>.jpg|png, <id>.jpg|png)")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"comma list of fractions REMOVED, in [0, 1) (default {DEFAULT_RATIOS})")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default {DEFAULT_METHODS})")
    parser.add_argument("--layer-weights", default="uniform",
                        help="CATP layer weights: presets uniform, first, last, first+last, comma- or ';'-separated; custom "
                             "lists w0,w1,... are ';'-separated, e.g. 'uniform;0.5,1' (default uniform; other methods ignore it)")
    parser.add_argument("--positions", default="original", help="comma list: original, compact (default original)")
    parser.add_argument("--image-importance", action=argparse.BooleanOptionalAction, default=False,
                        help="CATP only: weight votes by image-token importance (default off)")
    parser.add_argument("--backend", default="ort-cpu", help="ort-cpu (default; engines built and cached) | torch (PyTorch reference) | ort-cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--prompt-template", default=None, help="prompt with {} for the question (default: the model family's)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of this many questions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset and of the 'random' method (default 0)")
    parser.add_argument("--engines-cache", type=Path, default=REPO / "engines" / "_eval", help="engines built for ort backends (default engines/_eval/)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default scripts/results/<dataset>-<backend>/)")
    return parser.parse_args(argv)


def comma_list(text: str, flag: str) -> list[str]:
    items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise UsageError(f"{flag} is empty")
    return items


def layer_weight_specs(text: str) -> list[str]:
    """``uniform,first`` → two presets; ``uniform;0.5,1`` → a preset and a custom list; ``0.5,1`` → one list."""
    if ";" in text:
        specs = [spec.strip() for spec in text.split(";")]
    elif all(part.strip() in LAYER_WEIGHT_PRESETS for part in text.split(",")):
        specs = [part.strip() for part in text.split(",")]
    else:
        specs = [text.strip()]
    specs = list(dict.fromkeys(spec for spec in specs if spec))
    if not specs:
        raise UsageError("--layer-weights is empty")
    return specs


def make_grid(args: argparse.Namespace) -> list[Config]:
    """Unpruned first (when 0 is among the ratios), then ratio × method × (CATP: layer weights) × positions."""
    from export.pruning import check_method, keep_count
    from runtime.manifest import POSITION_POLICIES

    ratios = []
    for item in comma_list(args.ratios, "--ratios"):
        try:
            ratio = float(item)
        except ValueError:
            raise UsageError(f"--ratios must be a comma list of numbers in [0, 1), got {item!r}") from None
        keep_count(32, ratio)  # range check: [0, 1)
        ratios.append(ratio)
    methods = comma_list(args.methods, "--methods")
    for method in methods:
        check_method(method)
    policies = comma_list(args.positions, "--positions")
    for policy in policies:
        if policy not in POSITION_POLICIES:
            raise UsageError(f"--positions takes {', '.join(POSITION_POLICIES)}, got {policy!r}")
    weights = layer_weight_specs(args.layer_weights)
    if args.image_importance and "catp" not in methods:
        raise UsageError("--image-importance applies to catp only; add catp to --methods")

    configs = [Config(UNPRUNED_METHOD, 0.0)] if 0.0 in ratios else []
    for ratio in sorted({r for r in ratios if r > 0}):
        for method in methods:
            catp = method == "catp"
            for weight in weights if catp else ["uniform"]:
                for policy in policies:
                    configs.append(Config(method, ratio, weight, policy, args.image_importance and catp, args.seed))
    return configs


# ------------------------------------------------------------------------------------------------ pipelines


class Pipelines:
    """A pipeline per configuration: a cached engines folder run by ONNX Runtime, or the PyTorch reference."""

    def __init__(self, args: argparse.Namespace, model: Path):
        from export import adapters
        from export.adapters.base import weights_sha256

        self.args, self.model = args, model
        self.adapter_cls = adapters.detect(model)  # architecture check before anything is built
        self.weights = weights_sha256(model)
        digest = hashlib.sha256(json.dumps(self.weights, sort_keys=True).encode()).hexdigest()[:10]
        self.cache = args.engines_cache / f"{model.name}-{digest}"
        self.adapter = None
        self.scratch: tempfile.TemporaryDirectory | None = None

    def options(self, config: Config, out: Path | None = None, prompt_template: str | None = None):
        from export.builder import BuildOptions

        return BuildOptions(model=self.model, out=out, pruning=config.pruning(), positions=config.positions,
                            max_batch=self.args.batch_size, prompt_template=prompt_template)

    def validate(self, configs: list[Config]) -> None:
        from export.builder import validate

        for config in configs:
            validate(self.options(config, prompt_template=self.args.prompt_template))

    # ---------------------------------------------------------------- ort
    def folder(self, config: Config) -> Path:
        return self.cache / config.name

    def cached(self, config: Config) -> bool:
        """The folder's manifest matches this model's weights and the configuration (and its files their sha256)."""
        from runtime.errors import ManifestError
        from runtime.manifest import Manifest

        folder = self.folder(config)
        if not (folder / "manifest.json").is_file():
            return False
        try:
            manifest = Manifest.load(folder)
        except ManifestError:
            return False
        wanted = {"method": config.method, "ratio": config.ratio, "layer_weights_preset": config.layer_weights,
                  "image_importance": config.image_importance, "seed": config.seed, "positions": config.positions}
        return (manifest.model.get("weights_sha256") == self.weights and manifest.precision == "fp32"
                and all(getattr(manifest.pruning, key) == value for key, value in wanted.items()))

    def ensure_built(self, config: Config) -> tuple[Path, float | None]:
        """The engines folder of ``config``, built unless cached; returns (folder, build seconds or None)."""
        from export.builder import build

        folder = self.folder(config)
        if self.cached(config):
            return folder, None
        if folder.exists() and not (folder / "manifest.json").is_file():
            shutil.rmtree(folder)  # a leftover in our own cache that is no engines folder
        started = time.perf_counter()
        build(self.options(config, out=folder), self.cache, quiet=True)
        return folder, time.perf_counter() - started

    # ---------------------------------------------------------------- either
    def prepare(self, configs: list[Config]) -> dict[str, float | None]:
        """Before any evaluation, so that a bad configuration fails early: ORT builds (or finds) every engines
        folder; torch loads the model once and resolves every configuration against it. Returns build seconds."""
        build_seconds: dict[str, float | None] = {}
        if self.args.backend == "torch":
            self.adapter = self.adapter_cls(self.model, "fp32")
            self.scratch = tempfile.TemporaryDirectory(prefix="eval_vqa-")
            for config in configs:
                self.adapter.resolve(config.pruning(), config.positions)
            return build_seconds
        for number, config in enumerate(configs, 1):
            folder, seconds = self.ensure_built(config)
            build_seconds[config.name] = seconds
            state = f"built in {seconds:.1f}s" if seconds is not None else "cached"
            print(f"engines [{number}/{len(configs)}] {config.name}: {state} ({folder})", file=sys.stderr, flush=True)
        return build_seconds

    def __call__(self, config: Config):
        if self.args.backend == "torch":
            from export.builder import reference_pipeline

            folder = Path(self.scratch.name) / config.name  # receives the tokenizer only
            return reference_pipeline(self.options(config, prompt_template=self.args.prompt_template), folder, adapter=self.adapter)

        from runtime.backends import load_runners
        from runtime.manifest import Manifest
        from runtime.pipelines import make_pipeline

        manifest = Manifest.load(self.folder(config), verify=False)  # sha256 of every file checked by prepare()
        manifest.max_batch = self.args.batch_size  # batch is dynamic in the graphs; the cache is shared across sizes
        return make_pipeline(manifest, load_runners(manifest, self.args.backend), self.args.prompt_template)

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()


class ImageCache:
    """Decoded images by path, least recently used dropped beyond a byte budget."""

    def __init__(self, budget: int = IMAGE_CACHE_BYTES):
        self.budget, self.used = budget, 0
        self.images: OrderedDict[str, object] = OrderedDict()

    def __getitem__(self, path: str):
        from runtime.preprocess import load_image

        if path in self.images:
            self.images.move_to_end(path)
            return self.images[path]
        image = load_image(path)
        size = image.width * image.height * len(image.getbands())
        self.images[path] = image
        self.used += size
        while self.used > self.budget and len(self.images) > 1:
            _, old = self.images.popitem(last=False)
            self.used -= old.width * old.height * len(old.getbands())
        return image


def evaluate(pipeline, dataset, images: ImageCache, batch_size: int, max_new_tokens: int, label: str):
    """Answer every question in batches (progress bar on stderr); return (accuracy, per-question records)."""
    from tqdm import tqdm

    records, total = [], 0.0
    samples = dataset.samples
    with tqdm(total=len(samples), desc=label, unit="q", file=sys.stderr, leave=False, disable=None) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            answers = pipeline.answer([images[s.image] for s in batch], [s.question for s in batch], max_new_tokens)
            for sample, answer in zip(batch, answers):
                score = dataset.score(answer.answer, sample)
                total += score
                records.append({"question_id": sample.question_id, "question": sample.question, "image": sample.image,
                                "answer_type": sample.answer_type,
                                "prediction": answer.answer, "answers": list(sample.answers), "score": score,
                                "kept_indices": answer.kept_indices})
            bar.update(len(batch))
    return total / len(samples), records


# ------------------------------------------------------------------------------------------------ outputs


def accuracy_by_type(records: list[dict]) -> dict[str, dict]:
    """Accuracy per answer type (easy-VQA: yes/no, color, shape; VQAv2: yes/no, number, other)."""
    scores: dict[str, list[float]] = {}
    for record in records:
        scores.setdefault(record["answer_type"], []).append(record["score"])
    return {kind: {"accuracy": sum(values) / len(values), "questions": len(values)}
            for kind, values in sorted(scores.items())}


def write_outputs(out: Path, meta: dict, results: list[dict], predictions: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as handle:
        for name, records in predictions.items():
            for record in records:
                handle.write(json.dumps({"config": name, **record}) + "\n")
    (out / "results.md").write_text(markdown_table(meta, results))
    plot(out / "accuracy_vs_ratio.png", meta, results)


def _kept(result: dict) -> str:
    return f"{result['k']}/{result['num_visual_tokens']} ({result['kept_fraction']:.4g})"


def markdown_table(meta: dict, results: list[dict]) -> str:
    """Rows: ratio / kept fraction; columns: method variants; cells: accuracy in %."""
    unpruned = next((r for r in results if r["config"] == "unpruned"), None)
    pruned = [r for r in results if r["config"] != "unpruned"]
    series = list(dict.fromkeys(r["series"] for r in pruned))
    cells = {(r["series"], r["ratio"]): r for r in pruned}
    metric = "exact match after VQA normalisation" if meta["metric"] == "exact_match" else "official VQA accuracy"
    lines = [
        f"# Accuracy vs pruning ratio: {Path(meta['model']).name} on {meta['dataset']} {meta['split']}",
        "",
        f"{meta['questions']} questions" + (f" (random subset, seed {meta['seed']})" if meta["subset"] else "")
        + f", {metric}, backend `{meta['backend']}`, max {meta['max_new_tokens']} new tokens. Accuracy in %.",
        "",
    ]
    if unpruned:
        lines += [f"Unpruned: **{100 * unpruned['accuracy']:.2f}** (all {unpruned['num_visual_tokens']} visual tokens).", ""]
    lines.append("| ratio | kept k/N | " + " | ".join(series or ["unpruned"]) + " |")
    lines.append("|---|---|" + "---:|" * max(1, len(series)))
    if unpruned:
        lines.append(f"| 0 (unpruned) | {_kept(unpruned)} | " + " | ".join([f"{100 * unpruned['accuracy']:.2f}"] * max(1, len(series))) + " |")
    for ratio in sorted({r["ratio"] for r in pruned}):
        row = [cells.get((s, ratio)) for s in series]
        any_result = next(r for r in row if r is not None)
        values = [f"{100 * r['accuracy']:.2f}" if r is not None else "" for r in row]
        lines.append(f"| {ratio:g} | {_kept(any_result)} | " + " | ".join(values) + " |")
    kinds = sorted({kind for r in results for kind in r.get("accuracy_by_type", {})})
    if kinds:
        lines += ["", "By answer type (questions: " + ", ".join(
            f"{kind} {results[0]['accuracy_by_type'].get(kind, {}).get('questions', 0)}" for kind in kinds) + "):", "",
            "| configuration | k/N | all | " + " | ".join(kinds) + " |", "|---|---|---:|" + "---:|" * len(kinds)]
        for r in results:
            by_type = r.get("accuracy_by_type", {})
            values = [f"{100 * by_type[kind]['accuracy']:.2f}" if kind in by_type else "" for kind in kinds]
            lines.append(f"| {r['config']} | {r['k']}/{r['num_visual_tokens']} | {100 * r['accuracy']:.2f} | "
                         + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, meta: dict, results: list[dict]) -> None:
    """Accuracy against kept fraction (log2 axis): a line per method variant, unpruned as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    pruned = [r for r in results if r["config"] != "unpruned"]
    markers = "osD^vPX*<>"
    for number, series in enumerate(dict.fromkeys(r["series"] for r in pruned)):
        points = sorted((r["kept_fraction"], 100 * r["accuracy"]) for r in pruned if r["series"] == series)
        # distinct markers, shrinking, so that lines lying on top of each other stay visible
        axes.plot([x for x, _ in points], [y for _, y in points], marker=markers[number % len(markers)],
                  markersize=max(3.0, 9.0 - 1.2 * number), linewidth=1.5, alpha=0.85, label=series)
    unpruned = next((r for r in results if r["config"] == "unpruned"), None)
    if unpruned:
        axes.axhline(100 * unpruned["accuracy"], color="black", linestyle="--", linewidth=1,
                     label=f"unpruned ({100 * unpruned['accuracy']:.1f})")
        axes.plot([1.0], [100 * unpruned["accuracy"]], marker="o", color="black", markersize=5)
    ticks = sorted({(r["kept_fraction"], f"{r['k']}/{r['num_visual_tokens']}") for r in results})
    if ticks:
        axes.set_xscale("log", base=2)
        axes.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
        axes.minorticks_off()
    axes.set_xlabel("kept visual tokens k/N (log scale)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{Path(meta['model']).name} on {meta['dataset']} {meta['split']} "
                   f"({meta['questions']} questions, {meta['backend']})", fontsize=10)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ main


def resolve_model(model: Path | None) -> Path:
    if model is not None:
        return model
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise UsageError(f"the default model {DEFAULT_MODEL} is missing: pass --model DIR (a local BLIP-2 OPT checkpoint)")
    return DEFAULT_MODEL


def check_flags(args: argparse.Namespace) -> None:
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.dataset not in ("easy-vqa", "vqav2"):
        raise UsageError(f"--dataset must be easy-vqa or vqav2, got {args.dataset!r}")
    if args.dataset == "easy-vqa" and any(v is not None for v in (args.questions, args.annotations, args.images)):
        raise UsageError("--questions, --annotations and --images go with --dataset vqav2")


def run(args, argv, model: Path, dataset, configs: list[Config], pipelines: Pipelines, out: Path) -> None:
    """Prepare every configuration, then evaluate them one by one, rewriting the outputs after each."""
    build_seconds = pipelines.prepare(configs)  # every engine / configuration first: errors come before hours of work
    meta = {
        "dataset": dataset.name, "split": dataset.split, "metric": dataset.metric, "questions": len(dataset),
        "limit": args.limit, "seed": args.seed, "subset": args.limit is not None,
        "model": str(model.resolve()), "weights_sha256": pipelines.weights, "backend": args.backend,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "prompt_template": None,
        "image_importance": args.image_importance,
        "command": " ".join(["python", "scripts/eval_vqa.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    results: list[dict] = []
    predictions: dict[str, list[dict]] = {}
    images = ImageCache()  # shared by every configuration
    for number, config in enumerate(configs, 1):
        pipeline = pipelines(config)
        meta["prompt_template"] = pipeline.prompt_template
        started = time.perf_counter()
        accuracy, records = evaluate(pipeline, dataset, images, args.batch_size, args.max_new_tokens, config.name)
        elapsed = time.perf_counter() - started
        pruning = pipeline.manifest.pruning
        k, num = pruning.k, pruning.num_visual_tokens
        catp = config.method == "catp" and not config.unpruned
        built = build_seconds.get(config.name)
        results.append({
            "config": config.name, "series": config.series, "method": "unpruned" if config.unpruned else config.method,
            "ratio": config.ratio, "k": k, "num_visual_tokens": num, "kept_fraction": k / num,
            "layer_weights": config.layer_weights if catp else None,
            "layer_weights_resolved": pruning.layer_weights if catp else None,
            "positions": None if config.unpruned else config.positions, "image_importance": config.image_importance,
            "seed": config.seed if config.method == "random" else None,
            "accuracy": accuracy, "questions": len(records), "accuracy_by_type": accuracy_by_type(records),
            "seconds": round(elapsed, 3),
            "build_seconds": None if built is None else round(built, 3),
            "engines": str(pipelines.folder(config)) if args.backend != "torch" else None,
        })
        predictions[config.name] = records
        print(f"[{number}/{len(configs)}] {config.name:<30} accuracy {100 * accuracy:6.2f}%  k={k}/{num}  "
              f"({elapsed:.1f}s, {len(records) / max(elapsed, 1e-9):.1f} q/s)", file=sys.stderr, flush=True)
        write_outputs(out, meta, results, predictions)  # after every configuration: partial results survive


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("eval_vqa.py"):
        from runtime import vqa

        check_flags(args)
        configs = make_grid(args)  # bad flags fail before anything is loaded
        model = resolve_model(args.model)
        source = "easy-vqa" if args.dataset == "easy-vqa" else vqa.VqaV2Files(args.questions, args.annotations, args.images)
        dataset = vqa.load_dataset(source, args.split, args.limit, args.seed)
        pipelines = Pipelines(args, model)
        pipelines.validate(configs)
        out = args.out or REPO / "scripts" / "results" / f"{dataset.name}-{args.backend}"
        try:
            run(args, argv, model, dataset, configs, pipelines, out)
        finally:
            pipelines.close()
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
