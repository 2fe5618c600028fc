"""The accuracy-against-ratio evaluation (``vtprune eval``, ``python scripts/eval_vqa.py``): a grid of pruning
configurations — ratios × methods (× CATP layer-weight presets × position policies) — each answered over a VQA
data set and scored.

It builds graphs (one engines folder per configuration, through ``export.builder``) and runs them with the
runtime, so it belongs to ``export/``, which may import ``runtime/``. The work is split by concern:

- here: the flags, the grid (:func:`make_grid`, ratio 0 evaluated once as "unpruned") and the run loop;
- ``export/eval_pipelines.py``: a pipeline per configuration (cached engines or the PyTorch reference), the
  image cache and the answer-and-score loop;
- ``export/eval_report.py``: results.json, predictions.jsonl, results.md and the plot;
- ``export/vqa_data.py``: the data sets; ``runtime/vqa.py``: the official VQA metrics.

Every flag is checked, and every configuration resolved against the model (ORT: built or found in the cache;
torch: resolved against the loaded model), before the first question is answered: a bad configuration costs
seconds, not hours. Nothing heavy is imported at module level, so ``--help`` and flag errors are instant.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.budget_io import EvalBudget, add_eval_flags
from export.defaults import DEFAULT_LAYER_WEIGHTS, DEFAULT_MODEL_NOTE, EVAL_ENGINES_CACHE, EVAL_RESULTS, resolve_model
from export.eval_pipelines import Config, ImageCache, Pipelines, answer_and_score, cross_kv_bytes
from export.eval_report import accuracy_by_type, write_outputs
from export.vqa_data import VqaV2Files, load_dataset
from runtime.errors import UsageError, cli_errors

USAGE = """Accuracy against pruning ratio: a grid of ratios × methods (× CATP layer-weight presets × position policies).

    python scripts/eval_vqa.py                                   # default model, easy-VQA test split, ORT on CPU
    python scripts/eval_vqa.py --ratios 0,0.5,0.75 --methods catp,l2 --limit 500 --backend torch
    python scripts/eval_vqa.py --layer-weights "uniform;first;0.5,1" --positions original,compact --methods catp
    python scripts/eval_vqa.py --model mllama --trim-first-layer off,on --ratios 0,0.5,0.75,0.9,0.95   # Trimmed Llama
    python scripts/eval_vqa.py --model DIR --dataset vqav2 --questions Q.json --annotations A.json --images DIR
    (or vtprune eval ..., the same command)

Ratio 0 keeps every token whatever the method, so it is evaluated once, as "unpruned". ``--backend ort-cpu`` builds
one engines folder per configuration under ``--engines-cache`` and reuses it while the model's weights are
unchanged; ``--backend torch`` runs the PyTorch reference (the same pipeline code over torch modules, the model
loaded once). easy-VQA is scored by exact match after the official VQA answer normalisation; VQAv2-format sets by
the official VQA accuracy. Writes results.json, predictions.jsonl, results.md and accuracy_vs_ratio.png to --out.
"""
DEFAULT_RATIOS = "0,0.5,0.75,0.875,0.9375"
BACKENDS = ("ort-cpu", "ort-cuda", "torch")
TRIM_FIRST_LAYER = {"off": False, "on": True}


# ------------------------------------------------------------------------------------------------ flags and grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eval_vqa.py", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help=f"local HF checkpoint folder (default: {DEFAULT_MODEL_NOTE})")
    parser.add_argument("--dataset", default="easy-vqa", help="easy-vqa (default) | vqav2")
    parser.add_argument("--split", default="test", help="easy-VQA split: test (default) | train")
    parser.add_argument("--questions", type=Path, help="vqav2: questions JSON")
    parser.add_argument("--annotations", type=Path, help="vqav2: annotations JSON")
    parser.add_argument("--images", type=Path, help="vqav2: image folder (COCO_<subtype>_<id:012d>.jpg, *<id:012d>.jpg|png, <id>.jpg|png)")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"comma list of fractions REMOVED, in [0, 1) (default {DEFAULT_RATIOS})")
    parser.add_argument("--methods", default=None,
                        help="comma list (default: every method of the model's family — BLIP-2: catp,l2,self-attn,random,"
                             "first-k; Mllama: trim-sum,trim-union,l2,random,uniform)")
    parser.add_argument("--layer-weights", default=DEFAULT_LAYER_WEIGHTS,
                        help="CATP layer weights: presets uniform, first, last, first+last, comma- or ';'-separated; custom "
                             f"lists w0,w1,... are ';'-separated, e.g. 'uniform;0.5,1' (default {DEFAULT_LAYER_WEIGHTS}; other methods ignore it)")
    parser.add_argument("--positions", default="original", help="comma list: original, compact (default original)")
    parser.add_argument("--trim-first-layer", default="off",
                        help="Mllama only: comma list of off, on — also trim the first cross-attention layer's own "
                             "keys/values (default off; 'off,on' evaluates both)")
    parser.add_argument("--image-importance", action=argparse.BooleanOptionalAction, default=False,
                        help="CATP only: weight votes by image-token importance (default off)")
    parser.add_argument("--backend", default="ort-cpu", help="ort-cpu (default; engines built and cached) | torch (PyTorch reference) | ort-cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--num-beams", type=int, default=1,
                        help="beam search with N beams, as HF generate(num_beams=N) (default 1: greedy); the graphs and "
                             "the engines cache are the same, each question takes N rows of --batch-size")
    parser.add_argument("--prompt-template", default=None, help="prompt with {} for the question (default: the model family's)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of this many questions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset and of the 'random' method (default 0)")
    parser.add_argument("--engines-cache", type=Path, default=EVAL_ENGINES_CACHE, help="engines built for ort backends (default engines/_eval/)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default scripts/results/<dataset>-<backend>/)")
    add_eval_flags(parser)  # --max-drop, --ratios-from: the accuracy budget (export/budget_io.py)
    return parser.parse_args(argv)


def comma_list(text: str, flag: str) -> list[str]:
    items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise UsageError(f"{flag} is empty")
    return items


def layer_weight_specs(text: str) -> list[str]:
    """``uniform,first`` → two presets; ``uniform;0.5,1`` → a preset and a custom list; ``0.5,1`` → one list."""
    from export.pruning import LAYER_WEIGHT_PRESETS

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


def make_grid(args: argparse.Namespace, adapter_cls=None) -> list[Config]:
    """Unpruned first (when 0 is among the ratios), then ratio × method × (CATP: layer weights) × positions ×
    (Mllama: trim the first layer or not). ``adapter_cls``: the model family's adapter (its methods); None checks
    the flags alone, against every family's methods (before the model is looked at)."""
    from export.pruning import ALL_METHODS, check_method, keep_count
    from runtime.manifest import POSITION_POLICIES

    ratios = []
    for item in comma_list(args.ratios, "--ratios"):
        try:
            ratio = float(item)
        except ValueError:
            raise UsageError(f"--ratios must be a comma list of numbers in [0, 1), got {item!r}") from None
        keep_count(32, ratio)  # range check: [0, 1)
        ratios.append(ratio)
    family_methods = adapter_cls.methods if adapter_cls is not None else ALL_METHODS
    methods = comma_list(args.methods, "--methods") if args.methods is not None else list(family_methods)
    for method in methods:
        check_method(method, family_methods)
    trims = []
    for item in comma_list(args.trim_first_layer, "--trim-first-layer"):
        if item not in TRIM_FIRST_LAYER:
            raise UsageError(f"--trim-first-layer takes a comma list of off, on; got {item!r}")
        trims.append(TRIM_FIRST_LAYER[item])
    if any(trims) and adapter_cls is not None and adapter_cls.name != "mllama":
        raise UsageError("--trim-first-layer on is a Trimmed-Llama (Mllama) option; this model is "
                         f"{adapter_cls.architectures[0]}")
    policies = comma_list(args.positions, "--positions")
    for policy in policies:
        if policy not in POSITION_POLICIES:
            raise UsageError(f"--positions takes {', '.join(POSITION_POLICIES)}, got {policy!r}")
    weights = layer_weight_specs(args.layer_weights)
    if args.image_importance and "catp" not in methods:
        raise UsageError("--image-importance applies to catp only; add catp to --methods")

    unpruned = adapter_cls.unpruned_method if adapter_cls is not None else "first-k"
    configs = [Config(unpruned, 0.0)] if 0.0 in ratios else []
    for ratio in sorted({r for r in ratios if r > 0}):
        for method in methods:
            catp = method == "catp"
            for weight in weights if catp else [DEFAULT_LAYER_WEIGHTS]:
                for policy in policies:
                    for trim in trims:
                        configs.append(Config(method, ratio, weight, policy, args.image_importance and catp, args.seed, trim))
    return configs


# ------------------------------------------------------------------------------------------------ run


def check_flags(args: argparse.Namespace) -> None:
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 1 <= args.num_beams <= args.batch_size:
        raise UsageError(f"--num-beams must be between 1 and --batch-size ({args.batch_size}), got {args.num_beams}")
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
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "prompt_template": None,
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
        accuracy, records = answer_and_score(pipeline, dataset, images, args.batch_size, args.max_new_tokens, config.name,
                                             args.num_beams)
        elapsed = time.perf_counter() - started
        pruning = pipeline.manifest.pruning
        k, num = int(pruning.k), int(pruning.num_visual_tokens)
        catp = config.method == "catp" and not config.unpruned
        built = build_seconds.get(config.name)
        kv = cross_kv_bytes(pipeline.manifest)
        results.append({
            "config": config.name, "series": config.series, "method": "unpruned" if config.unpruned else config.method,
            "ratio": config.ratio, "k": k, "num_visual_tokens": num, "kept_fraction": k / num,
            "layer_weights": config.layer_weights if catp else None,
            "layer_weights_resolved": pruning.layer_weights if catp else None,
            "positions": None if config.unpruned else config.positions, "image_importance": config.image_importance,
            "seed": config.seed if config.method == "random" else None,
            "trim_first_layer": config.trim_first_layer if kv is not None else None,
            "cross_kv_bytes": kv["kept"] if kv else None, "cross_kv_bytes_full": kv["full"] if kv else None,
            "cross_kv_kept_fraction": kv["kept_fraction"] if kv else None,
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
        check_flags(args)
        EvalBudget.plan(args, make_grid(args), parse_args([]))  # bad flags fail before anything is looked at
        model = resolve_model(args.model)
        source = "easy-vqa" if args.dataset == "easy-vqa" else VqaV2Files(args.questions, args.annotations, args.images)
        dataset = load_dataset(source, args.split, args.limit, args.seed)
        pipelines = Pipelines(args, model)
        # the family's grid; --max-drop / --ratios-from may replace it (unpruned + each series at its chosen ratio)
        budget = EvalBudget.plan(args, make_grid(args, pipelines.adapter_cls), parse_args([]))
        configs = budget.configs
        budget.check_weights(pipelines.weights, model)
        pipelines.validate(configs)
        out = args.out or EVAL_RESULTS / f"{dataset.name}-{args.backend}"
        try:
            run(args, argv, model, dataset, configs, pipelines, out)
        finally:
            pipelines.close()
        budget.finish(out)  # the budgeted ratio per series, after the grid
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
