#!/usr/bin/env python
"""Write a Triton Inference Server model repository for an engines folder, generated from its manifest.

    python runtime/triton_repo.py --engines engines/X --out triton-repo [--flavor python|gpu]

One model per graph (names, shapes, dtypes, max batch from the manifest) and a top-level ``vtprune`` model (Python
backend, BLS) taking ``image`` (the encoded file's bytes) + ``question`` [+ ``max_new_tokens``, ``num_beams``] and
returning ``answer``, ``finish_reason``, ``kept_indices``, ``token_ids``: this project's own pipeline, each graph
call a BLS request. Flavours: ``python`` (every model on the Python backend, graphs on ONNX Runtime: what
``runtime/serve.py`` runs with the pip-installed server) and ``gpu`` (graphs on Triton's ``tensorrt`` backend
where TensorRT plans of TensorRT proper exist, else ``onnxruntime`` with its TensorRT accelerator).
Exit codes: 0 written, 2 a usage error (bad flag, folder or manifest). Nothing is left in --out on failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import cli_errors, emit


def add_repository_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared with runtime/serve.py."""
    parser.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True,
                        help="batch concurrent requests to the vtprune model (default on)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="how long the dynamic batcher waits to fill a batch (default 2000 µs)")
    parser.add_argument("--instances", type=int, default=1, help="instances of the vtprune model (default 1)")
    parser.add_argument("--graph-instances", type=int, default=1, help="instances of each graph model (default 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads per graph model instance (python flavour; default 0: "
                             "one per physical core)")
    parser.add_argument("--max-new-tokens", type=int, default=10,
                        help="most tokens per answer when a request does not say (default 10)")
    parser.add_argument("--max-image-pixels", type=int, default=None,
                        help="refuse larger images (default: Pillow's decompression-bomb limit)")


def repository_settings(args: argparse.Namespace, flavor: str):
    from runtime.triton.repository import RepoSettings

    return RepoSettings(flavor=flavor, dynamic_batching=args.dynamic_batching,
                        max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                        graph_instances=args.graph_instances, threads=args.threads,
                        max_new_tokens=args.max_new_tokens, max_image_pixels=args.max_image_pixels)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="triton_repo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True, help="folder written by export/build.py")
    parser.add_argument("--out", type=Path, required=True, help="the repository folder to write (must not exist)")
    parser.add_argument("--flavor", default="python", help="python | gpu (default python)")
    add_repository_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("triton_repo.py"):
        from runtime.manifest import Manifest
        from runtime.triton.repository import write_repository

        settings = repository_settings(args, args.flavor)
        settings.check()
        models = write_repository(Manifest.load(args.engines), args.out, settings)
        for name, folder in models.items():
            print(f"triton_repo.py: {name}: {folder}", file=sys.stderr)
        emit(str(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
