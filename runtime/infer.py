#!/usr/bin/env python
"""Answer questions about images with a pruned engines folder — no torch.

    python runtime/infer.py --engines engines/X --image cat.png --question "what is it?"
    python runtime/infer.py --engines engines/X --image a.png --question "q1" --image b.png --question "q2" --json
    python runtime/infer.py --engines engines/X --jsonl samples.jsonl --json

Every input is checked before anything runs: a missing or unreadable image, an image over --max-image-pixels, a
malformed JSONL line, or a question whose prompt alone fills the model's positions is one error line (exit 2).
A prompt that fits is answered; generation stops at --max-new-tokens, at EOS, or at the model's position limit
(finish_reason "context_limit" in --json). Images are decoded one batch at a time.
Exit codes: 0 done, 1 a backend or output failure, 2 a usage or input error, 141 stdout closed early.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.errors import UsageError, cli_errors, emit

MAX_JSONL_BYTES = 256 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS

    parser = argparse.ArgumentParser(prog="infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True, help="folder written by export/build.py")
    parser.add_argument("--image", action="append", default=[], help="image path (repeatable, paired with --question)")
    parser.add_argument("--question", action="append", default=[], help="question text (repeatable)")
    parser.add_argument("--jsonl", type=Path, help='file of {"image": PATH, "question": TEXT} lines (paths relative to the file)')
    parser.add_argument("--backend", default="auto", help="auto | ort-cpu | ort-cuda | trt (default auto)")
    parser.add_argument("--prompt-template", default=None, help="override the manifest's prompt template ({} = question)")
    parser.add_argument("--max-new-tokens", type=int, default=10,
                        help="most tokens per answer (default 10); generation also stops at the model's position limit")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: the manifest's max batch)")
    parser.add_argument("--num-beams", type=int, default=1,
                        help="beam search with N hypotheses per question, as HF generate(num_beams=N) (length_penalty 1, "
                             "early_stopping False); default 1: greedy. N rows per question through the decode graph, so "
                             "at most max batch // N questions per batch")
    parser.add_argument("--io-binding", choices=["auto", "on", "off"], default="auto",
                        help="decode steps over buffers bound once (ONNX Runtime IO binding); auto: on for the CPU "
                             "provider, where it was measured faster (README, KV cache)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads per graph session (default 0: one per physical core)")
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=False,
                        help="let ONNX Runtime's idle threads busy-wait between runs (default off: the pipeline's "
                             "sessions share the cores; README \"Speed\")")
    parser.add_argument("--share-weights", action="store_true",
                        help="one copy of the language model's weights in memory for the prefill and decode graphs "
                             "(ONNX Runtime shared initializers, no repacking): about half the memory, slower prefill "
                             "(README \"One copy of every weight\")")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"refuse images with more pixels, before decoding them (default {DEFAULT_MAX_IMAGE_PIXELS}, "
                             "Pillow's decompression-bomb limit)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per sample: answer, kept_indices, token_ids, finish_reason, timings_ms")
    return parser.parse_args(argv)


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    """(image path, question) per non-empty line of ``path``; image paths relative to the file's folder."""
    from runtime.files import parse_json
    from runtime.text import check_text

    try:
        if path.stat().st_size > MAX_JSONL_BYTES:
            raise UsageError(f"--jsonl {path} is larger than {MAX_JSONL_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"--jsonl file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"--jsonl {path} is a folder, not a file") from None
    except OSError as err:
        raise UsageError(f"--jsonl {path} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"--jsonl {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = parse_json(line, where, UsageError)
        if not isinstance(record, dict):
            raise UsageError(f'{where}: expected an object {{"image": ..., "question": ...}}, got {_json_type(record)}')
        for key in ("image", "question"):
            if key not in record:
                raise UsageError(f'{where}: missing "{key}"')
            if not isinstance(record[key], str):
                raise UsageError(f'{where}: "{key}" must be text, got {_json_type(record[key])}')
        image, question = record["image"], record["question"]
        check_text(image, f'{where}: "image"')
        check_text(question, f'{where}: "question"')
        if not image.strip() or "\x00" in image:
            raise UsageError(f'{where}: "image" is not a file path: {image!r}')
        image_path = Path(image)
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        samples.append((str(image_path), question))
    return samples


def read_samples(args: argparse.Namespace) -> list[tuple[str, str]]:
    from runtime.text import check_text

    if len(args.image) != len(args.question):
        raise UsageError(f"give one --question per --image ({len(args.image)} image(s), {len(args.question)} question(s))")
    for index, (image, question) in enumerate(zip(args.image, args.question), 1):
        check_text(image, f"--image {index}")
        check_text(question, f"--question {index}")
        if "\x00" in image:
            raise UsageError(f"--image {index} is not a file path: {image!r}")
    samples = list(zip(args.image, args.question))
    if args.jsonl:
        samples += read_jsonl(args.jsonl)
    if not samples:
        raise UsageError("nothing to answer: give --image and --question, or --jsonl")
    return samples


def check_flags(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, got {args.num_beams}")
    if args.max_image_pixels < 1:
        raise UsageError(f"--max-image-pixels must be at least 1, got {args.max_image_pixels}")
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (ONNX Runtime's default) or more, got {args.threads}")
    if args.prompt_template is not None:
        from runtime.text import format_prompt

        format_prompt(args.prompt_template, "")  # the template's own checks, before any file is read


def ort_settings(args: argparse.Namespace, backend: str):
    """The ONNX Runtime session settings of ``--threads`` / ``--spin``; None for other backends."""
    if not backend.startswith("ort"):
        return None
    from runtime.backends.ort import OrtSettings

    return OrtSettings(threads=args.threads, spinning=args.spin, share_weights=args.share_weights)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("infer.py"):
        from runtime.backends import load_runners, resolve_backend
        from runtime.manifest import Manifest
        from runtime.pipelines import make_pipeline
        from runtime.pipelines.base import check_num_beams
        from runtime.preprocess import peek_image

        check_flags(args)
        backend = resolve_backend(args.backend)
        samples = read_samples(args)
        manifest = Manifest.load(args.engines)
        check_num_beams(args.num_beams, manifest.max_batch)
        if args.batch_size is not None:  # questions per batch: N rows each through the decode graph
            manifest.max_batch = min(manifest.max_batch, args.batch_size * args.num_beams)
        for path, _ in samples:  # every image readable and within the pixel limit, before anything runs
            peek_image(path, args.max_image_pixels)
        pipeline = make_pipeline(manifest, load_runners(manifest, backend, ort_settings(args, backend)), args.prompt_template)
        pipeline.max_image_pixels = args.max_image_pixels
        pipeline.io_binding = {"auto": None, "on": True, "off": False}[args.io_binding]
        answers = pipeline.answer([path for path, _ in samples], [q for _, q in samples], max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams)
        for (image, question), answer in zip(samples, answers):
            if args.json:
                record = {
                    "image": image,
                    "question": question,
                    "answer": answer.answer,
                    "kept_indices": answer.kept_indices,
                    "token_ids": answer.token_ids,
                    "finish_reason": answer.finish_reason,
                    "timings_ms": answer.timings_ms,
                    **answer.extra,
                }
                emit(json.dumps(record))
            else:
                emit(answer.answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
