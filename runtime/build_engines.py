#!/usr/bin/env python
"""TensorRT plans for an engines folder — no torch: every graph parsed and built by TensorRT, one ``<graph>.plan``
each, recorded in the manifest (TensorRT flavour and version, target compute capabilities, profiles).

    python runtime/build_engines.py --engines engines/X [--compute-capability SM89 ...] [--workspace-mib 4096]

TensorRT 10/11 (``tensorrt``) is used when installed, else TensorRT for RTX (``tensorrt_rtx``, which builds without
a GPU). Optimization profiles come from the manifest's ``dynamic_dims`` (declared at export time); ``k`` is static.
All or nothing: a graph TensorRT cannot parse or build is one line naming the node and op, and no plan is left.
Exit codes: 0 done, 1 TensorRT refused a graph, 2 a usage error (no TensorRT, a bad flag or folder).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import cli_errors, emit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build_engines.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True, help="folder written by export/build.py")
    parser.add_argument("--compute-capability", action="append", default=None, metavar="SMxx",
                        help="TensorRT for RTX target (repeatable; default: its own portable set)")
    parser.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit (default: TensorRT's)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--print-commands", action="store_true",
                        help="print the equivalent trtexec and polygraphy command lines per graph (profile shapes from "
                             "the manifest) and build nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("build_engines.py"):
        from runtime.backends.trt_build import build_engines, hand_commands

        if args.print_commands:
            from runtime.manifest import Manifest

            for line in hand_commands(Manifest.load(args.engines)):
                emit(line)
            return 0
        say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
        build_engines(args.engines, args.compute_capability, args.workspace_mib, say)
        emit(str(args.engines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
