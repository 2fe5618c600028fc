"""Parity stages for LLaMA-3.2-Vision (Mllama) + Trimmed Llama (``parity.py`` dispatches here by model family).

Stages: ``preprocess`` (runtime pixel values, aspect-ratio ids and mask vs the HF image processor), ``tokenize``
(runtime ids and cross-attention mask vs ``MllamaProcessor``), ``vision`` (cross_attention_states), ``prefill``
(scores, kept-index sets with near-tie analysis, logits, self and trimmed cross caches, decode masks — the graph fed
the reference's own inputs), ``decode`` (one step, fed the reference's inputs), ``generation`` (greedy tokens of the
whole ONNX pipeline vs the reference pipeline) and ``hf_anchor`` (ratio 0: the reference's tokens vs HF
``MllamaForConditionalGeneration.generate``; with trimming HF has no equivalent, the reference is the check).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.pipelines.mllama import cross_attention_mask
from runtime.text import format_prompt
from runtime.parity import (ParityContext, _cast_feeds, _concat_calls, _strip_after_eos,
                            compare_kept_sets, compare_kept_sets_with_bounds, compare_scores_to_bounds,
                            compare_tokens, same_kept_rows, tensor_stats)


def hf_inputs(adapter, images, prompt_texts: list[str], chat: bool) -> list[dict]:
    """MllamaProcessor's own inputs for each (image, prompt), one sample at a time (no padding)."""
    processor = adapter.processor
    kwargs = {"add_special_tokens": False} if chat else {}
    return [processor(images=[[image]], text=[text], return_tensors="np", **kwargs) for image, text in zip(images, prompt_texts)]


def stages(context: ParityContext) -> dict[str, Any]:
    manifest, adapter, tol, say = context.manifest, context.adapter, context.tol, context.say
    images, questions, max_new_tokens = context.images, context.questions, context.max_new_tokens
    reference, reference_runners, onnx, onnx_runners = context.pipelines()
    result: dict[str, Any] = {}

    # -- preprocess and tokenize: runtime vs HF --------------------------------------------------------------
    say("preprocess + tokenize")
    hf = adapter.processor.image_processor([[image] for image in images], return_tensors="np")
    hf_pixels = {"pixel_values": hf["pixel_values"].astype(np.float32),
                 "aspect_ratio_ids": hf["aspect_ratio_ids"].astype(np.int64),
                 "aspect_ratio_mask": hf["aspect_ratio_mask"].astype(np.int64)}
    pixels = onnx.preprocess(images)
    same_shape = hf_pixels["pixel_values"].shape == pixels["pixel_values"].shape
    stats = tensor_stats(hf_pixels["pixel_values"], pixels["pixel_values"]) if same_shape else {"max_abs": float("inf")}
    ids_equal = bool(np.array_equal(hf_pixels["aspect_ratio_ids"], pixels["aspect_ratio_ids"]))
    mask_equal = bool(np.array_equal(hf_pixels["aspect_ratio_mask"], pixels["aspect_ratio_mask"]))
    result["preprocess"] = {"passed": stats["max_abs"] <= tol["pixel_atol"] and ids_equal and mask_equal,
                            "shape": list(pixels["pixel_values"].shape), "aspect_ratio_ids_equal": ids_equal,
                            "aspect_ratio_mask_equal": mask_equal, **stats}

    chat = onnx.prompt.chat_template is not None
    texts = [onnx.prompt.text(q) for q in questions]
    if chat:  # HF renders the chat template itself
        messages = lambda q: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        hf_texts = [adapter.processor.apply_chat_template(messages(q), add_generation_prompt=True) for q in questions]
    else:
        hf_texts = [format_prompt(onnx.prompt.template, q) for q in questions]
    encoded = hf_inputs(adapter, images, hf_texts, chat)
    runtime_ids = onnx.encode_questions(questions)
    rows = []
    for row, (ids, enc) in enumerate(zip(runtime_ids, encoded)):
        hf_ids = enc["input_ids"][0].tolist()
        mask = cross_attention_mask([ids], len(ids), onnx.prompt.image_token_id,
                                    pixels["aspect_ratio_mask"][row : row + 1, 0].sum(-1), int(manifest.pruning.max_num_tiles))
        rows.append({"ids_equal": hf_ids == ids, "cross_attention_mask_equal": bool(np.array_equal(mask, enc["cross_attention_mask"])),
                     "hf_ids": hf_ids, "runtime_ids": ids})
    result["tokenize"] = {"passed": all(r["ids_equal"] and r["cross_attention_mask_equal"] for r in rows),
                          "prompts": texts, "hf_prompts": hf_texts, "rows": rows}

    # -- end to end on HF's pixel values --------------------------------------------------------------------
    ref_answers, onnx_answers, margins = context.generate(reference, onnx, hf_pixels)

    # -- per graph, each fed the reference's inputs ------------------------------------------------------
    say("vision / prefill / decode graphs")
    vision_feeds, ref_vision = _concat_calls(reference_runners["vision"].calls)
    prefill_calls = reference_runners["prefill"].calls
    decode_calls = reference_runners["decode"].calls[:1]
    # score bounds (rank-count methods) come from the fp32 reference, before it turns float64 for a while
    bounds_per_call = [adapter.score_bounds(manifest.pruning, feeds, tie_rtol=2 * tol["attention_rtol"])
                       for feeds, _ in prefill_calls]
    ref64 = context.float64_outputs({
        "vision": ("vision", vision_feeds),
        **{f"prefill.{i}": ("prefill", feeds) for i, (feeds, _) in enumerate(prefill_calls)},
        **{"decode": ("decode", feeds) for feeds, _ in decode_calls},
    })
    onnx_vision = onnx_runners["vision"].runner.run(_cast_feeds(vision_feeds, manifest.graphs["vision"]))
    result["vision"] = context.judge(ref_vision, ref64["vision"], onnx_vision, ["cross_attention_states"])

    prefill_stage: dict[str, Any] = {}
    kept_rows_all = []
    for index, ((feeds, ref_out), bounds) in enumerate(zip(prefill_calls, bounds_per_call)):
        onnx_out = onnx_runners["prefill"].runner.run(_cast_feeds(feeds, manifest.graphs["prefill"]))
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
        onnx_out = onnx_runners["decode"].runner.run(_cast_feeds(feeds, manifest.graphs["decode"]))
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

    say("anchor: HF generate")
    result["hf_anchor"] = hf_anchor(adapter, manifest, encoded, ref_tokens, max_new_tokens)
    return result


def hf_anchor(adapter, manifest, encoded: list[dict], ref_tokens: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    """Ratio 0 (every token kept, the first layer untrimmed): the reference's tokens equal HF's own generate."""
    import torch

    if manifest.pruning.ratio != 0:
        return {"passed": True, "applicable": False,
                "why": "HF has no trimmed cross-attention; the reference (HF's layers with the trimming in export/) is the check"}
    tokens = []
    kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0)
    with torch.no_grad():
        for enc in encoded:
            inputs = {name: torch.from_numpy(np.asarray(value)) for name, value in enc.items()}
            output = adapter.model.generate(**inputs, **kwargs)
            tokens.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    eos = set(manifest.text["eos_token_ids"])
    tokens = [_strip_after_eos(t, eos) for t in tokens]
    return {"passed": tokens == ref_tokens, "applicable": True, "mode": "MllamaForConditionalGeneration.generate",
            "hf": tokens, "reference": ref_tokens}
