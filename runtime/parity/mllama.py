"""Parity stages for LLaMA-3.2-Vision (Mllama) + Trimmed Llama (registered for the manifest family ``mllama``).

Stages: ``preprocess`` (runtime pixel values, aspect-ratio ids and mask vs the HF image processor), ``tokenize``
(runtime ids and cross-attention mask vs ``MllamaProcessor``), ``vision`` (cross_attention_states), ``prefill``
(scores, kept-index sets with near-tie analysis, logits, self and trimmed cross caches, decode masks — the graph fed
the reference's own inputs), ``decode`` (one step, fed the reference's inputs), ``generation`` (greedy tokens of the
whole ONNX pipeline vs the reference pipeline) and ``hf_anchor`` (ratio 0: the reference's tokens vs HF
``MllamaForConditionalGeneration.generate``; with trimming HF has no equivalent, the reference is the check). The
skeleton (recording, the float64 reference, the report) is ``runtime/parity/stages.py``; HF's side of each comparison
is ``export.reference.MllamaReference``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.parity.compare import (compare_kept_sets, compare_kept_sets_with_bounds, compare_scores_to_bounds,
                                    compare_tokens, same_kept_rows)
from runtime.parity.stages import (ParityContext, cast_feeds, concat_calls, hf_anchor_stage, register_stages,
                                   run_in_batches)
from runtime.pipelines.mllama import cross_attention_mask
from runtime.text import format_prompt
from runtime.tolerance import tensor_stats


@register_stages("mllama")
def stages(context: ParityContext) -> dict[str, Any]:
    """Mllama: preprocess, tokenize, vision, prefill, decode, generation, hf_anchor. Everything the PyTorch reference
    computes comes first; the reference is freed before the engines load (peak: the larger, not the sum)."""
    manifest, reference_model, tol, say = context.manifest, context.reference, context.tol, context.say
    images, questions, max_new_tokens = context.images, context.questions, context.max_new_tokens
    result: dict[str, Any] = {}

    # -- the reference: HF's preprocessing and processor, the reference pipeline, its bounds, float64, HF anchor -----
    say("preprocess + tokenize (HF)")
    hf_pixels = reference_model.hf_pixels(images)
    reference, reference_runners = context.reference_pipeline()
    chat = reference.prompt.chat_template is not None
    texts = [reference.prompt.text(q) for q in questions]
    if chat:  # HF renders the chat template itself
        hf_texts = reference_model.hf_chat_prompts(questions)
    else:
        hf_texts = [format_prompt(reference.prompt.template, q) for q in questions]
    encoded = reference_model.hf_inputs(images, hf_texts, chat)
    ref_answers, margins = context.reference_answers(reference, hf_pixels)
    vision_feeds, ref_vision = concat_calls(reference_runners["vision"].calls)
    prefill_calls = reference_runners["prefill"].calls
    decode_calls = reference_runners["decode"].calls[:1]
    # score bounds (rank-count methods) come from the fp32 reference, before it turns float64 for a while
    bounds_per_call = [reference_model.score_bounds(feeds, tie_rtol=2 * tol["attention_rtol"])
                       for feeds, _ in prefill_calls]
    ref64 = context.float64_outputs({
        "vision": ("vision", vision_feeds),
        **{f"prefill.{i}": ("prefill", feeds) for i, (feeds, _) in enumerate(prefill_calls)},
        **{"decode": ("decode", feeds) for feeds, _ in decode_calls},
    })
    say("anchor: HF generate")
    generation = reference_model.hf_generate(encoded, max_new_tokens, context.num_beams)
    del reference, reference_runners
    context.release_reference()

    # -- the engines: preprocessing and tokenizer vs HF's, end to end, then each graph fed the reference's inputs ----
    onnx, onnx_runners = context.onnx_pipeline()
    pixels = onnx.preprocess(images)
    same_shape = hf_pixels["pixel_values"].shape == pixels["pixel_values"].shape
    stats = tensor_stats(hf_pixels["pixel_values"], pixels["pixel_values"]) if same_shape else {"max_abs": float("inf")}
    ids_equal = bool(np.array_equal(hf_pixels["aspect_ratio_ids"], pixels["aspect_ratio_ids"]))
    mask_equal = bool(np.array_equal(hf_pixels["aspect_ratio_mask"], pixels["aspect_ratio_mask"]))
    result["preprocess"] = {"passed": stats["max_abs"] <= tol["pixel_atol"] and ids_equal and mask_equal,
                            "shape": list(pixels["pixel_values"].shape), "aspect_ratio_ids_equal": ids_equal,
                            "aspect_ratio_mask_equal": mask_equal, **stats}
    runtime_ids = onnx.encode_questions(questions)
    max_tiles = int(manifest.pruning.max_num_tiles)  # the only pruning setting parity's runtime side reads
    rows = []
    for row, (ids, enc) in enumerate(zip(runtime_ids, encoded)):
        hf_ids = enc["input_ids"][0].tolist()
        mask = cross_attention_mask([ids], len(ids), onnx.prompt.image_token_id,
                                    pixels["aspect_ratio_mask"][row : row + 1, 0].sum(-1), max_tiles)
        rows.append({"ids_equal": hf_ids == ids, "cross_attention_mask_equal": bool(np.array_equal(mask, enc["cross_attention_mask"])),
                     "hf_ids": hf_ids, "runtime_ids": ids})
    result["tokenize"] = {"passed": all(r["ids_equal"] and r["cross_attention_mask_equal"] for r in rows),
                          "prompts": texts, "hf_prompts": hf_texts, "rows": rows}
    onnx_answers = context.onnx_answers(onnx, hf_pixels)

    say("vision / prefill / decode graphs")
    onnx_vision = run_in_batches(onnx_runners["vision"], cast_feeds(vision_feeds, manifest.graphs["vision"]),
                                 manifest.max_batch)
    result["vision"] = context.judge(ref_vision, ref64["vision"], onnx_vision, ["cross_attention_states"])
    del vision_feeds, ref_vision, onnx_vision, ref64["vision"]  # (B, 6404, D) each at real sizes: freed stage by stage

    prefill_stage: dict[str, Any] = {}
    kept_rows_all = []
    for index, ((feeds, ref_out), bounds) in enumerate(zip(prefill_calls, bounds_per_call)):
        onnx_out = onnx_runners["prefill"].run(cast_feeds(feeds, manifest.graphs["prefill"]))
        ref64_out = ref64[f"prefill.{index}"]
        if bounds is None:  # continuous scores: calibrated, near-ties at the selection boundary
            scores = context.judge(ref_out, ref64_out, onnx_out, ["scores"])
            kept = compare_kept_sets(ref_out["scores"], ref_out["kept_indices"], onnx_out["kept_indices"], tol["score_rtol"])
        else:  # rank counts (trim-union): inside the reference's bounds, swaps only where the bounds allow them
            scores = compare_scores_to_bounds(*bounds, onnx_out["scores"], tol["score_rtol"])
            kept = compare_kept_sets_with_bounds(*bounds, ref_out["kept_indices"], onnx_out["kept_indices"], tol["score_rtol"])
        kept_rows_all.append(kept)
        # everything after the first cross-attention layer depends on the kept set: compared on the rows where the
        # fp32 reference, the float64 reference and ONNX kept the same tokens
        same = same_kept_rows(ref_out["kept_indices"], onnx_out["kept_indices"], ref64_out)
        names = [name for name in ref_out if name not in ("kept_indices", "scores")]
        prefill_stage.setdefault("calls", []).append({
            "scores": scores, "kept_indices": kept, "tensors": context.judge(ref_out, ref64_out, onnx_out, names, rows=same),
        })
    calls = prefill_stage["calls"]
    prefill_stage["near_ties"] = sum(c["kept_indices"]["near_ties"] for c in calls)
    prefill_stage["mismatches"] = sum(c["kept_indices"]["mismatches"] for c in calls)
    prefill_stage["passed"] = all(c["scores"]["passed"] and c["kept_indices"]["passed"] and c["tensors"]["passed"] for c in calls)
    result["prefill"] = prefill_stage

    if decode_calls:
        feeds, ref_out = decode_calls[0]
        onnx_out = onnx_runners["decode"].run(cast_feeds(feeds, manifest.graphs["decode"]))
        result["decode"] = context.judge(ref_out, ref64["decode"], onnx_out, list(ref_out))
    else:
        result["decode"] = {"passed": True, "skipped": "the reference never ran a decode step (EOS at once)"}

    ref_tokens = [a.token_ids for a in ref_answers]
    tied_rows = set()
    offset = 0
    for call in kept_rows_all:  # rows of each batch, numbered over the whole set
        tied_rows |= {offset + r["row"] for r in call["rows"] if not r["equal"] and r["near_tie"]}
        offset += len(call["rows"])
    result["generation"] = compare_tokens(ref_tokens, [a.token_ids for a in onnx_answers], margins, tol["logit_margin"], tied_rows)
    result["generation"]["answers"] = [
        {"question": q, "reference": r.answer, "onnx": o.answer, "kept_indices_reference": r.kept_indices,
         "kept_indices_onnx": o.kept_indices, "cross_kv_bytes": o.extra.get("cross_kv_bytes")}
        for q, r, o in zip(questions, ref_answers, onnx_answers)
    ]

    result["hf_anchor"] = hf_anchor_stage(generation, ref_tokens, manifest.text["eos_token_ids"])
    return result

