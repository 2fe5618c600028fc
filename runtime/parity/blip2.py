"""Parity stages for BLIP-2 (OPT) + CATP and its baselines (registered for the manifest family ``blip2-opt``).

Stages: ``preprocess`` (runtime pixel values vs the HF image processor), ``tokenize`` (runtime ids vs the HF
tokenizer), ``visual`` (scores, kept-index sets with near-tie analysis, query embeddings), ``embed``, ``prefill`` and
``decode`` (logits and caches, each graph fed the reference's own inputs), ``generation`` (the whole ONNX pipeline's
greedy tokens vs the reference pipeline's) and ``hf_anchor`` (the reference's tokens vs HF ``generate`` where HF can
express the configuration: ratio 0, or compact positions). The skeleton (recording, the float64 reference, the
report) is ``runtime/parity/stages.py``; HF's side of each comparison is ``export.reference.Blip2Reference``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.parity.compare import (compare_kept_sets, compare_kept_sets_with_bounds, compare_scores_to_bounds,
                                    compare_tokens, same_kept_rows)
from runtime.parity.stages import (ParityContext, cast_feeds, concat_calls, hf_anchor_stage, register_stages,
                                   run_in_batches)
from runtime.tolerance import tensor_stats

PER_CALL_GRAPHS = ("embed", "prefill", "decode")  # judged on the reference's first call of each


@register_stages("blip2-opt")
def stages(context: ParityContext) -> dict[str, Any]:
    """BLIP-2: preprocess, tokenize, visual, embed, prefill, decode, generation, hf_anchor. Everything the PyTorch
    reference computes comes first; the reference is freed before the engines load (peak: the larger, not the sum)."""
    manifest, reference_model, tol, say = context.manifest, context.reference, context.tol, context.say
    images, questions, max_new_tokens = context.images, context.questions, context.max_new_tokens
    result: dict[str, Any] = {}

    # -- the reference: HF's preprocessing and tokenizer, the reference pipeline, its bounds, float64, HF anchor ------
    say("preprocess + tokenize (HF)")
    hf_pixels = reference_model.hf_pixels(images)  # (B, 3, H, W)
    reference, reference_runners = context.reference_pipeline()
    prompts = [reference.prompt_template.replace("{}", q, 1) for q in questions]
    hf_ids = reference_model.hf_token_ids(prompts)
    ref_answers, margins = context.reference_answers(reference, hf_pixels)
    ref_visual_feeds, ref_visual = concat_calls(reference_runners["visual"].calls)
    # rank-count scores (CATP) jump by whole ranks where attention probabilities nearly tie: the reference gives
    # the range each score can take under the tolerance, and the ONNX scores must lie inside it
    bounds = reference_model.score_bounds(ref_visual_feeds, tie_rtol=2 * tol["attention_rtol"])
    graph_calls = {graph: reference_runners[graph].calls[0] for graph in PER_CALL_GRAPHS if reference_runners[graph].calls}
    ref64 = context.float64_outputs({"visual": ("visual", ref_visual_feeds),
                                     **{graph: (graph, feeds) for graph, (feeds, _) in graph_calls.items()}})
    say("anchor: HF generate")
    generation = reference_model.hf_generate(images, prompts, ref_visual["query_embeds"], max_new_tokens,
                                             context.num_beams)
    del reference, reference_runners
    context.release_reference()

    # -- the engines: preprocessing and tokenizer vs HF's, end to end, then each graph fed the reference's inputs ----
    onnx, onnx_runners = context.onnx_pipeline()
    pixels = onnx.preprocess(images)
    stats = tensor_stats(hf_pixels, pixels) if hf_pixels.shape == pixels.shape else {"max_abs": float("inf")}
    result["preprocess"] = {"passed": stats["max_abs"] <= tol["pixel_atol"], "shape": list(pixels.shape), **stats}
    ids = onnx.encode_questions(questions)
    result["tokenize"] = {"passed": hf_ids == ids, "prompts": prompts, "hf_ids": hf_ids, "runtime_ids": ids}
    onnx_answers = context.onnx_answers(onnx, hf_pixels)

    say("visual / embed / prefill / decode graphs")
    onnx_visual = run_in_batches(onnx_runners["visual"], cast_feeds(ref_visual_feeds, manifest.graphs["visual"]),
                                 manifest.max_batch)
    if bounds is None:
        visual = {
            "scores": context.judge(ref_visual, ref64["visual"], onnx_visual, ["scores"]),
            "kept_indices": compare_kept_sets(ref_visual["scores"], ref_visual["kept_indices"], onnx_visual["kept_indices"],
                                              tol["score_rtol"]),
        }
    else:
        lower, upper = bounds  # (B, N) each
        visual = {
            "scores": compare_scores_to_bounds(lower, upper, onnx_visual["scores"], tol["score_rtol"]),
            "kept_indices": compare_kept_sets_with_bounds(lower, upper, ref_visual["kept_indices"], onnx_visual["kept_indices"],
                                                          tol["score_rtol"]),
        }
        visual["scores"]["reference"] = tensor_stats(ref_visual["scores"], onnx_visual["scores"])
        visual["scores"]["reference_within_bounds"] = bool(
            np.all((ref_visual["scores"] >= lower - 1e-3) & (ref_visual["scores"] <= upper + 1e-3)))
    same_rows = same_kept_rows(ref_visual["kept_indices"], onnx_visual["kept_indices"], ref64["visual"])
    visual["query_embeds"] = context.judge(ref_visual, ref64["visual"], onnx_visual, ["query_embeds"], rows=same_rows)
    visual["passed"] = all(v["passed"] for v in visual.values())
    result["visual"] = visual
    for graph in PER_CALL_GRAPHS:
        if graph not in graph_calls:
            result[graph] = {"passed": True, "skipped": "the reference never ran this graph (EOS at once)"}
            continue
        feeds, ref_out = graph_calls[graph]
        onnx_out = onnx_runners[graph].run(cast_feeds(feeds, manifest.graphs[graph]))
        result[graph] = context.judge(ref_out, ref64[graph], onnx_out, list(ref_out))

    ref_tokens = [a.token_ids for a in ref_answers]
    tied_rows = {r["row"] for r in visual["kept_indices"]["rows"] if not r["equal"] and r["near_tie"]}
    result["generation"] = compare_tokens(ref_tokens, [a.token_ids for a in onnx_answers], margins, tol["logit_margin"], tied_rows)
    result["generation"]["answers"] = [
        {"question": q, "reference": r.answer, "onnx": o.answer} for q, r, o in zip(questions, ref_answers, onnx_answers)
    ]
    result["hf_anchor"] = hf_anchor_stage(generation, ref_tokens, manifest.text["eos_token_ids"])
    return result
