#!/usr/bin/env python
"""Answer questions about images with a pruned engines folder — no torch.

    python runtime/infer.py --engines engines/X --image cat.png --question "what is it?"
    python runtime/infer.py --engines engines/X --image a.png --question "q1" --image b.png --question "q2" --json
    python runtime/infer.py --engines engines/X --jsonl samples.jsonl --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable, and never shadow top-level modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.errors import UsageError, cli_errors  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True, help="folder written by export/build.py")
    parser.add_argument("--image", action="append", default=[], help="image path (repeatable, paired with --question)")
    parser.add_argument("--question", action="append", default=[], help="question text (repeatable)")
    parser.add_argument("--jsonl", type=Path, help='file of {"image": PATH, "question": TEXT} lines (paths relative to the file)')
    parser.add_argument("--backend", default="auto", help="auto | ort-cpu | ort-cuda | trt (default auto)")
    parser.add_argument("--prompt-template", default=None, help="override the manifest's prompt template ({} = question)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: the manifest's max batch)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample: answer, kept_indices, timings_ms")
    return parser.parse_args(argv)


def read_samples(args: argparse.Namespace) -> list[tuple[str, str]]:
    if len(args.image) != len(args.question):
        raise UsageError(f"give one --question per --image ({len(args.image)} image(s), {len(args.question)} question(s))")
    samples = list(zip(args.image, args.question))
    if args.jsonl:
        if not args.jsonl.is_file():
            raise UsageError(f"--jsonl file not found: {args.jsonl}")
        for number, line in enumerate(args.jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, question = record["image"], record["question"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f'{args.jsonl}:{number}: expected {{"image": ..., "question": ...}}') from None
            image_path = Path(image)
            if not image_path.is_absolute():
                image_path = args.jsonl.parent / image_path
            samples.append((str(image_path), question))
    if not samples:
        raise UsageError("nothing to answer: give --image and --question, or --jsonl")
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("infer.py"):
        from runtime.backends import load_runners
        from runtime.manifest import Manifest
        from runtime.pipeline import make_pipeline
        from runtime.preprocess import load_image

        samples = read_samples(args)
        manifest = Manifest.load(args.engines)
        if args.batch_size is not None:
            if args.batch_size < 1:
                raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
            manifest.max_batch = min(manifest.max_batch, args.batch_size)
        pipeline = make_pipeline(manifest, load_runners(manifest, args.backend), args.prompt_template)
        images = [load_image(path) for path, _ in samples]
        answers = pipeline.answer(images, [q for _, q in samples], max_new_tokens=args.max_new_tokens)
        for (image, question), answer in zip(samples, answers):
            if args.json:
                record = {
                    "image": image,
                    "question": question,
                    "answer": answer.answer,
                    "kept_indices": answer.kept_indices,
                    "token_ids": answer.token_ids,
                    "timings_ms": answer.timings_ms,
                    **answer.extra,
                }
                print(json.dumps(record))
            else:
                print(answer.answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
