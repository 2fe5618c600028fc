#!/usr/bin/env python
"""Probe: would the greedy decode loop run faster as one ONNX ``Loop`` graph than as the runtime's Python loop over
bound decode steps? The measurement behind README "Speed" (what is left outside graph runs).

    python scripts/loop_graph_probe.py --out scripts/results/speed/loop-graph-probe.json

From a BLIP-2 engines folder's ``decode.onnx`` it builds, in a temporary folder, a graph whose ``Loop`` body is that
decode step (after ONNX Runtime's basic optimizations, which a subgraph does not get as fully; weights inside the
body, so ONNX Runtime prepacks them) plus the glue the Python loop does: argmax, EOS bookkeeping, padding for
finished rows, position + 1, and the KV cache carried from step to step. ONNX Runtime cannot update a loop-carried
tensor in place, so the body carries the cache by ``Concat`` (tried first: a preallocated cache written with
``ScatterElements``, slower still) — one copy of the whole cache per step, where the runtime's bound step writes one
slot. Checked: the loop graph's tokens equal the runtime's greedy tokens. Timed, interleaved in one process at batch 1
and 8: the runtime's decode stage (cache refill + Python loop over the bound step) against one loop-graph call from
the same prefill outputs (EOS ignored, as in the bench). Nothing here is used by the runtime.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def loop_graph(decode_path: Path, folder: Path) -> Path:
    """``greedy.onnx`` in ``folder``: first_token, first_position (B, 1), prompt_mask (B, T), present.* (B, KV, T, Dh),
    max_steps (1,), eos_token_ids (E,), pad_token_id (1,) → tokens (S, B, 1), the raw argmax of each step."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    shutil.copyfile(decode_path.parent / "weights.bin", folder / "weights.bin")  # read by the graphs written here
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folder / "decode-basic.onnx")
    ort.InferenceSession(str(decode_path), options, providers=["CPUExecutionProvider"])
    decode = onnx.load(str(folder / "decode-basic.onnx"))
    step = decode.graph
    past = [value.name for value in step.input if value.name.startswith("past.")]

    def info(name, kind, shape=None):
        return h.make_tensor_value_info(name, kind, shape)

    glue_in = [h.make_node("Where", ["finished", "pad_token_id", "token"], ["input_ids"])]  # finished rows get padding
    glue_out = [
        h.make_node("ArgMax", ["logits"], ["next_token"], axis=1, keepdims=1),  # (B, 1)
        h.make_node("Equal", ["next_token", "eos_token_ids"], ["eos_each"]),  # (B, E)
        h.make_node("Cast", ["eos_each"], ["eos_each_i"], to=T.INT32),
        h.make_node("ReduceMax", ["eos_each_i"], ["eos_any_i"], axes=[1], keepdims=1),  # (B, 1)
        h.make_node("Cast", ["eos_any_i"], ["eos_any"], to=T.BOOL),
        h.make_node("Or", ["finished", "eos_any"], ["finished_out"]),
        h.make_node("Cast", ["finished_out"], ["finished_i"], to=T.INT32),
        h.make_node("ReduceMin", ["finished_i"], ["all_finished_i"], keepdims=0),
        h.make_node("Cast", ["all_finished_i"], ["all_finished"], to=T.BOOL),
        h.make_node("Not", ["all_finished"], ["cond_out"]),
        h.make_node("Add", ["position_ids", "one"], ["position_out"]),
        h.make_node("Shape", ["next_token"], ["rows"]),
        h.make_node("ConstantOfShape", ["rows"], ["ones"], value=h.make_tensor("one_i", T.INT64, [1], [1])),
        h.make_node("Concat", ["attention_mask", "ones"], ["attention_mask_out"], axis=1),  # (B, t + 1)
        h.make_node("Identity", ["next_token"], ["token_out"]),
        h.make_node("Identity", ["next_token"], ["scanned"]),
    ]
    glue_out += [h.make_node("Concat", [name, "new." + name[5:]], [name + ".out"], axis=2) for name in past]  # a copy
    body = h.make_graph(
        glue_in + list(step.node) + glue_out, "greedy_step",
        [info("iteration", T.INT64, []), info("cond_in", T.BOOL, []), info("token", T.INT64), info("finished", T.BOOL),
         info("position_ids", T.INT64), info("attention_mask", T.INT64), *[info(name, T.FLOAT) for name in past]],
        [info("cond_out", T.BOOL, []), info("token_out", T.INT64), info("finished_out", T.BOOL),
         info("position_out", T.INT64), info("attention_mask_out", T.INT64), *[info(name + ".out", T.FLOAT) for name in past],
         info("scanned", T.INT64)],
        initializer=list(step.initializer))
    nodes = [
        h.make_node("Equal", ["first_token", "eos_token_ids"], ["first_eos_each"]),
        h.make_node("Cast", ["first_eos_each"], ["first_eos_each_i"], to=T.INT32),
        h.make_node("ReduceMax", ["first_eos_each_i"], ["first_eos_i"], axes=[1], keepdims=1),
        h.make_node("Cast", ["first_eos_i"], ["finished0"], to=T.BOOL),
        h.make_node("Cast", ["finished0"], ["finished0_i"], to=T.INT32),
        h.make_node("ReduceMin", ["finished0_i"], ["all0_i"], keepdims=0),
        h.make_node("Cast", ["all0_i"], ["all0"], to=T.BOOL),
        h.make_node("Not", ["all0"], ["cond0"]),
        h.make_node("Squeeze", ["max_steps"], ["trip"]),
        h.make_node("Loop", ["trip", "cond0", "first_token", "finished0", "first_position", "prompt_mask",
                             *["present." + name[5:] for name in past]],
                    ["last_token", "last_finished", "last_position", "last_mask", *[name + ".last" for name in past],
                     "tokens"], body=body),
    ]
    kv_shape = ["batch", "heads", "prompt_len", "head_dim"]
    graph = h.make_graph(
        nodes, "greedy",
        [info("first_token", T.INT64, ["batch", 1]), info("first_position", T.INT64, ["batch", 1]),
         info("prompt_mask", T.INT64, ["batch", "prompt_len"]),
         *[info("present." + name[5:], T.FLOAT, kv_shape) for name in past],
         info("max_steps", T.INT64, [1]), info("eos_token_ids", T.INT64, ["eos"]), info("pad_token_id", T.INT64, [1])],
        [info("tokens", T.INT64, ["steps", "batch", 1])],
        initializer=[h.make_tensor("one", T.INT64, [], [1])])
    path = folder / "greedy.onnx"
    onnx.save(h.make_model(graph, opset_imports=decode.opset_import, ir_version=decode.ir_version), str(path))
    return path


def probe(engines: Path, batches: list[int], new_tokens: int, requests: int) -> dict:
    import onnxruntime as ort
    from outside_before_after import sample_batch  # this script's folder

    from runtime.backends import load_runners
    from runtime.manifest import Manifest
    from runtime.pipelines import make_pipeline

    manifest = Manifest.load(engines)
    pipeline = make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime's sessions
    height, width = manifest.preprocess["size"]
    result = {}
    with tempfile.TemporaryDirectory(prefix="loop-graph-") as folder:
        session = ort.InferenceSession(str(loop_graph(engines / "decode.onnx", Path(folder))), options,
                                       providers=["CPUExecutionProvider"])
        for batch in batches:
            images, questions = sample_batch(batch, (width, height))
            text_ids = pipeline.encode_questions(questions)
            visual = pipeline.visual(pipeline.preprocess(images))
            prefill_batch = pipeline.build_prefill(visual["query_embeds"], visual["kept_indices"], text_ids)
            feeds = pipeline.prefill_feeds(prefill_batch)
            outputs = pipeline.runners["prefill"].run(feeds)

            def runtime_decode():
                cache = pipeline.steps.cache(outputs, feeds["attention_mask"], new_tokens)
                return pipeline.decode(outputs, cache, prefill_batch.next_position, new_tokens)

            def graph_decode():
                first = outputs["logits"].argmax(axis=-1)[:, None]  # (B, 1)
                loop_feeds = {"first_token": first, "first_position": prefill_batch.next_position[:, None],
                              "prompt_mask": feeds["attention_mask"], "max_steps": np.array([new_tokens - 1]),
                              "eos_token_ids": np.array([-1]), "pad_token_id": np.array([manifest.text["pad_token_id"]]),
                              **{name: value for name, value in outputs.items() if name.startswith("present.")}}
                return np.concatenate([first[None], session.run(None, loop_feeds)[0]])[:, :, 0].T  # (B, new_tokens)

            pipeline.text.eos_token_ids = []  # EOS ignored, as in the bench
            if runtime_decode() != graph_decode().tolist():
                raise SystemExit(f"batch {batch}: the loop graph's tokens differ from the runtime's")
            times: dict[str, list[float]] = {"runtime_decode_ms": [], "loop_graph_ms": []}
            for index in range(requests + 50):
                for name, call in (("runtime_decode_ms", runtime_decode), ("loop_graph_ms", graph_decode)):
                    start = time.perf_counter()
                    call()
                    if index >= 50:
                        times[name].append((time.perf_counter() - start) * 1e3)
            medians = {name: round(statistics.median(values), 4) for name, values in times.items()}
            result[str(batch)] = {**medians, "loop_graph_vs_runtime": round(medians["loop_graph_ms"] / medians["runtime_decode_ms"], 3),
                                  "tokens_equal": True}
            print(f"batch {batch}: runtime decode {medians['runtime_decode_ms']:.3f} ms, loop graph "
                  f"{medians['loop_graph_ms']:.3f} ms", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, default=REPO / "engines" / "blip2-easyvqa-catp-r0.5")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not (args.engines / "manifest.json").is_file():
        parser.error(f"no engines folder at {args.engines}: python export/build.py --ratio 0.5")
    started = time.perf_counter()
    result = probe(args.engines.resolve(), args.batches, args.new_tokens, args.requests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"engines": args.engines.name, "new_tokens": args.new_tokens, "requests": args.requests,
                                    "seconds": round(time.perf_counter() - started, 1), "batches": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
