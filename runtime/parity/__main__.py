#!/usr/bin/env python
"""The parity CLI: ``python -m runtime.parity ...`` or ``python runtime/parity ...`` (this folder run as a script).
Flags are parsed here; the work is ``run_parity`` (``runtime/parity/stages.py``) or, with ``--reference-outputs``,
``replay_parity`` (``runtime/parity/replay.py``). Exit 0 when parity passed, 1 when a stage failed, 2 for a usage
or input error (``runtime/errors.py``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable, and never shadow top-level modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import runtime.parity  # noqa: E402
from runtime.errors import UsageError, cli_errors  # noqa: E402
from runtime.parity.stages import CALIBRATIONS  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = 8
NOT_IN_REPLAY = {"image": "--image", "question": "--question", "model": "--model", "max_new_tokens": "--max-new-tokens",
                 "save_reference": "--save-reference", "reference_dtype": "--reference-dtype", "num_beams": "--num-beams"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.parity", description=runtime.parity.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="reference checkpoint (default: the manifest's model source)")
    parser.add_argument("--image", action="append", default=[], help="image (repeatable, with --question); default: synthetic images")
    parser.add_argument("--question", action="append", default=[])
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--num-beams", type=int, default=None,
                        help="decode by beam search with N beams (default 1: greedy): the generation stage compares the "
                             "ONNX and reference pipelines' beam-search tokens, the HF anchor HF generate(num_beams=N)'s")
    parser.add_argument("--out", type=Path, default=None, help="report path (default ENGINES/parity.json)")
    parser.add_argument("--calibration", default="auto", choices=CALIBRATIONS,
                        help="float tensors: float64 = against a float64 run of the reference, bounded by the fp32 "
                             "reference's own rounding noise; relative = a tensor-scale-relative tolerance; auto "
                             "(default) = float64 where a float64 copy of the model fits in memory (with "
                             "--reference-outputs: where float64 outputs were saved)")
    parser.add_argument("--reference-dtype", default=None, choices=("auto", "fp32", "fp16"),
                        help="precision of the PyTorch reference: fp32, fp16 (as the exporter builds fp16 engines), auto "
                             "(default: fp32 where an fp32 copy of the checkpoint fits in memory, else the engines' own)")
    parser.add_argument("--save-reference", type=Path, default=None, metavar="REF.json",
                        help="also save the reference's graph calls in Polygraphy's formats: the outputs (fp32, and "
                             "float64 with that calibration) as RunResults JSON to REF.json, the inputs (--save-inputs "
                             "format) to REF.inputs.json")
    parser.add_argument("--reference-outputs", type=Path, default=None, metavar="REF.json",
                        help="no torch: replay the inputs saved with --save-reference through --backend and judge every "
                             "graph's outputs against the saved ones")
    parser.add_argument("--reference-inputs", type=Path, default=None, metavar="INPUTS.json",
                        help="the saved inputs (default: REF.inputs.json beside --reference-outputs)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli_errors("parity"):
        if args.reference_outputs is not None:
            given = [flag for name, flag in NOT_IN_REPLAY.items() if getattr(args, name) not in (None, [])]
            if given:
                raise UsageError(f"--reference-outputs replays the saved inputs: {', '.join(given)} do(es) not apply")
            report = runtime.parity.replay_parity(args.engines, args.reference_outputs, args.reference_inputs, args.backend,
                                                  args.out, args.quiet, args.calibration)
            return 0 if report["passed"] else 1
        from runtime.preprocess import load_image

        if args.reference_inputs is not None:
            raise UsageError("--reference-inputs goes with --reference-outputs")
        if len(args.image) != len(args.question):
            raise UsageError("give one --question per --image")
        images = [load_image(p) for p in args.image] or None
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
        report = runtime.parity.run_parity(args.engines, images, args.question or None, args.backend, max_new_tokens,
                                           args.model, args.out, args.quiet, args.calibration, args.save_reference,
                                           args.reference_dtype or "auto",
                                           1 if args.num_beams is None else args.num_beams)
        return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
