#!/usr/bin/env python
"""Before/after timings of the runtime's own (non-graph) work changed for speed: the measurement behind README
"Speed". The "before" versions are the previous code, kept here verbatim (commit 7589431); the "after" ones are
what the runtime imports now. Best of 5 rounds of ``--number`` calls each, in microseconds per call.

    python scripts/overhead_micro.py --out scripts/results/speed/overhead-micro.json
"""
from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.pipelines.decoding import greedy_decode
from runtime.preprocess import preprocess, to_rgb
from runtime.text import TextCodec

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"kind": "blip", "size": [64, 64], "do_resize": True, "resample": 3, "do_convert_rgb": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}


def preprocess_before(images, settings):
    """Per-image float64 rescale → normalise (before the lookup table)."""
    height, width = settings["size"]
    batch = []
    for image in images:
        image = to_rgb(image).resize((width, height), resample=Image.Resampling(settings["resample"]))
        pixels = np.asarray(image).astype(np.float64) * settings["rescale_factor"]
        pixels = (pixels - np.asarray(settings["image_mean"])) / np.asarray(settings["image_std"])
        batch.append(pixels.transpose(2, 0, 1).astype(np.float32))
    return np.stack(batch)


def greedy_vectorized(step, logits, next_position, eos_token_ids, pad_token_id, max_new_tokens, row_limits):
    """The batch loop as numpy operations over rows — tried, measured slower, not adopted."""
    batch = logits.shape[0]
    limits = np.minimum(row_limits, max_new_tokens)
    is_eos = np.zeros(logits.shape[-1], dtype=bool)
    is_eos[eos_token_ids] = True
    generated = np.zeros((batch, max_new_tokens), dtype=np.int64)
    count = np.zeros(batch, dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    rows = np.arange(batch)
    position = next_position.astype(np.int64).copy()
    for index in range(max_new_tokens):
        chosen = logits.argmax(axis=-1)
        ended = ~finished & is_eos[chosen]
        tokens = np.where(finished, pad_token_id, chosen).astype(np.int64)
        emit = ~finished & ~ended
        generated[rows[emit], count[emit]] = tokens[emit]
        count += emit
        finished |= ended | (count >= limits)
        if finished.all() or index == max_new_tokens - 1:
            break
        logits = step(tokens, position)
        position = position + 1
    return [generated[row, : count[row]].tolist() for row in range(batch)]


def best_us(function, number: int) -> float:
    return round(min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    codec = TextCodec(REPO / "models" / "blip2-easyvqa" / "tokenizer.json", {"prefix_ids": [1], "eos_token_ids": [1],
                                                                             "pad_token_id": 0})
    rows = []
    for batch in (1, 8):
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(batch)]
        if not np.array_equal(preprocess_before(images, SETTINGS), preprocess(images, SETTINGS)["pixel_values"]):
            raise SystemExit("the lookup table no longer gives the per-pixel math's bits")
        texts = ["Question: what shape is in the image? Answer:"] * batch
        logits = rng.random((batch, 35)).astype(np.float32)
        logits[:, 1] = -1.0  # never EOS: every row runs all steps
        greedy_args = (lambda tokens, positions: logits, logits, np.zeros(batch, np.int64), [1], 0, 8, np.full(batch, 20))
        for change, before, after in (
            ("preprocess: per-pixel float64 → lookup table", lambda: preprocess_before(images, SETTINGS),
             lambda: preprocess(images, SETTINGS)),
            ("prompts: encoded twice, one call each → once, one batch call", lambda: [codec.encode(t) for t in texts * 2],
             lambda: codec.encode_many(texts)),
            ("greedy loop (8 steps, no graph): Python rows → numpy rows (not adopted)",
             lambda: greedy_decode(*greedy_args), lambda: greedy_vectorized(*greedy_args)),
        ):
            row = {"change": change, "batch": batch, "before_us": best_us(before, args.number),
                   "after_us": best_us(after, args.number)}
            row["speedup"] = round(row["before_us"] / row["after_us"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"number": args.number, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
