#!/usr/bin/env python
"""Build pruned static-shape ONNX graphs (+ manifest) from a local Hugging Face checkpoint.

    python export/build.py --ratio 0.5
    python export/build.py --model path/to/blip2 --ratio 0.75 --method catp --layer-weights first --out engines/x
    python export/build.py --ratio-from scripts/results/easy-vqa-ort-cpu/results.json --max-drop 1.0   # accuracy budget
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.budget_io import MAX_DROP_HELP
from export.defaults import DEFAULT_LAYER_WEIGHTS, DEFAULT_MODEL_NOTE, ENGINES, resolve_model
from runtime.errors import UsageError, cli_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help=f"local HF checkpoint folder (default: {DEFAULT_MODEL_NOTE})")
    parser.add_argument("--ratio", type=float, default=None, help="fraction of visual tokens REMOVED, in [0, 1) (default 0.5)")
    parser.add_argument("--ratio-from", type=Path, default=None, metavar="RESULTS",
                        help="instead of --ratio: the ratio an evaluation chose for an accuracy budget. RESULTS is an "
                             "eval_vqa.py results.json (or its folder) of this model's weights; the series is --series, "
                             "else --method (with the default layer weights and original positions), else the model family's "
                             "default method; the build takes that series' method, layer weights, positions, image "
                             "importance and seed, so it reproduces the evaluated configuration")
    parser.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                        help="with --ratio-from: " + MAX_DROP_HELP + " (default: the budget RESULTS was evaluated with)")
    parser.add_argument("--series", default=None, help="with --ratio-from: the series (column of results.md), e.g. 'catp [compact]'")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="with --ratio-from: use RESULTS even when it was evaluated on other weights than --model")
    parser.add_argument("--method", default=None, help="BLIP-2: catp | l2 | self-attn | random | first-k (default catp); "
                        "LLaMA-3.2-Vision: trim-sum | trim-union | l2 | random | uniform (default trim-sum)")
    parser.add_argument("--layer-weights", default=DEFAULT_LAYER_WEIGHTS,
                        help=f"CATP: uniform | first | last | first+last | w0,w1,... (one per cross-attention layer; default "
                             f"{DEFAULT_LAYER_WEIGHTS}, what the paper's per-layer study found best — README)")
    parser.add_argument("--image-importance", action=argparse.BooleanOptionalAction, default=False,
                        help="weight CATP votes by the attention each image token receives in the last vision layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' method (fixed in the graph)")
    parser.add_argument("--trim-first-layer", action="store_true",
                        help="LLaMA-3.2-Vision: also trim the first cross-attention layer's own keys/values (default: it keeps all)")
    parser.add_argument("--positions", default="original", help="original | compact (default original)")
    parser.add_argument("--precision", default="fp32", help="fp32 | fp16 (score math stays fp32)")
    parser.add_argument("--backend", default="onnx",
                        help="onnx (ONNX graphs) | trt (the graphs + a TensorRT plan each: runtime/build_engines.py)")
    parser.add_argument("--compute-capability", action="append", default=None, metavar="SMxx",
                        help="--backend trt with TensorRT for RTX: target (repeatable; default: its portable set)")
    parser.add_argument("--workspace-mib", type=int, default=None, help="--backend trt: builder workspace limit")
    parser.add_argument("--prompt-template", default=None, help="prompt with {} for the question (default: the model family's, e.g. 'Question: {} Answer:')")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch the runtime sends at once (default 8)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default engines/<model>-<method>-r<ratio>/)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even when it is not an engines folder written by vtprune (its contents are deleted)")
    parser.add_argument("--check", action="store_true", help="run the parity check against PyTorch right after the export")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--external-data-threshold", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_or_explain(options, quiet: bool) -> Path:
    """``build()``; an unexpected failure becomes one line naming a log file with the full traceback (the builder
    has already removed everything it staged)."""
    from export.builder import build
    from runtime.errors import ExportError, VtpruneError, explain_unexpected

    try:
        return build(options, ENGINES, quiet=quiet)
    except VtpruneError:
        raise
    except Exception as err:  # noqa: BLE001 - reported as one line, the details in the log
        raise ExportError(explain_unexpected(err, "export failed")) from None


def resolve_ratio(args: argparse.Namespace, quiet: bool) -> None:
    """``--ratio`` (default 0.5), or ``--ratio-from``: the configuration an evaluation chose for the budget."""
    if args.ratio_from is None:
        if args.max_drop is not None or args.series is not None or args.allow_other_weights:
            raise UsageError("--max-drop, --series and --allow-other-weights go with --ratio-from")
        args.ratio = 0.5 if args.ratio is None else args.ratio
        return
    if args.ratio is not None:
        raise UsageError("--ratio and --ratio-from are mutually exclusive: give one")
    from export.budget_io import choose_for_build

    choose_for_build(args, parse_args([]), say=(lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("build.py"):
        from export.builder import BuildOptions, validate
        from export.pruning import PruningConfig
        from export.tracing import TWO_GB

        resolve_ratio(args, quiet=args.quiet)
        options = BuildOptions(
            model=args.model,
            out=args.out,
            pruning=PruningConfig(
                method=args.method,
                ratio=args.ratio,
                layer_weights=args.layer_weights,
                image_importance=args.image_importance,
                seed=args.seed,
                trim_first_layer=args.trim_first_layer,
            ),
            positions=args.positions,
            precision=args.precision,
            backend=args.backend,
            prompt_template=args.prompt_template,
            max_batch=args.max_batch,
            opset=args.opset,
            external_data_threshold=args.external_data_threshold if args.external_data_threshold is not None else TWO_GB,
            force=args.force,
            compute_capabilities=args.compute_capability,
            workspace_mib=args.workspace_mib,
        )
        validate(options)  # bad flags fail before anything is loaded or written
        options.model = resolve_model(options.model)
        out = build_or_explain(options, args.quiet)
        print(out)
        if args.check:
            from runtime.parity import run_parity

            report = run_parity(out, quiet=args.quiet)
            return 0 if report["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
