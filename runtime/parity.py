#!/usr/bin/env python
"""Parity: run the exported graphs and the PyTorch reference on the same inputs and compare every stage.

    python runtime/parity.py --engines engines/X            # writes engines/X/parity.json, exit 1 on failure

Stages: ``preprocess`` (runtime pixel values vs the HF image processor), ``tokenize`` (runtime ids vs the HF
tokenizer), ``visual`` (scores, kept-index sets with near-tie analysis, query embeddings), ``embed``,
``prefill`` and ``decode`` (logits and caches, each graph fed the reference's own inputs), ``generation`` (the
whole ONNX pipeline's greedy tokens vs the reference pipeline's) and ``hf_anchor`` (the reference's tokens vs
HF ``generate`` where HF can express the configuration: ratio 0, or compact positions).

The reference is the HF model with the same pruning module (``export/``), imported lazily here: the runtime
itself never imports torch. Float tensors are judged against the reference's own rounding noise: the reference runs
each graph a second time in float64 on the same inputs, and a tensor passes when its error against float64 is within
a few times what fp32 PyTorch itself makes (``runtime/tolerance.py``; a tensor-scale-relative fallback where a
float64 copy of the model does not fit in memory).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repo importable, and never shadow top-level modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from runtime.errors import ManifestError, UsageError, cli_errors  # noqa: E402
from runtime.files import write_atomically  # noqa: E402
from runtime.tolerance import Calibration, judge_tensors, tensor_stats  # noqa: E402

# What is not a float tensor's elementwise value (those are judged by ``runtime.tolerance``), per precision of the
# exported graphs (the reference always runs fp32): ``logit_margin`` — a greedy token may differ where the
# reference's top-2 logits are closer than this; ``score_rtol`` — continuous scores within this (relative to the
# largest) of the selection boundary are near-ties; ``attention_rtol`` — attention probabilities within this rank
# either way (CATP/trim-union rank bounds); ``pixel_atol`` — preprocessing vs HF's image processor.
TOLERANCES = {
    "fp32": {"logit_margin": 1e-4, "score_rtol": 1e-5, "pixel_atol": 1e-5, "attention_rtol": 1e-5},
    "fp16": {"logit_margin": 5e-2, "score_rtol": 5e-3, "pixel_atol": 1e-5, "attention_rtol": 1e-2},
}
CALIBRATIONS = ("auto", "float64", "relative")
DEFAULT_QUESTIONS = ("what color is the shape?", "how many shapes are there?", "is there a circle in the image?")


def default_images(count: int, seed: int = 0):
    """Deterministic synthetic test images of different sizes (the engines need no data set to be checked)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = 40 + 13 * index, 56 - 7 * index
        canvas = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        canvas[height // 4 : height // 2, width // 3 : 2 * width // 3] = rng.integers(0, 255, size=3, dtype=np.uint8)
        images.append(Image.fromarray(canvas))
    return images


# ------------------------------------------------------------------------------------------------- metrics


def compare_kept_sets(ref_scores: np.ndarray, ref_kept: np.ndarray, kept: np.ndarray, tol: float) -> dict[str, Any]:
    """Kept-index *sets* per row. A differing token counts as a near-tie only if its reference score lies within
    ``tol`` of the reference's k-th best score (the selection boundary); anything else is a mismatch."""
    rows = []
    near_ties = mismatches = 0
    k = ref_kept.shape[1]
    for row in range(ref_kept.shape[0]):
        expected, got = set(ref_kept[row].tolist()), set(kept[row].tolist())
        if expected == got:
            rows.append({"row": row, "equal": True})
            continue
        boundary = float(np.sort(ref_scores[row])[::-1][k - 1])
        scale = max(float(np.abs(ref_scores[row]).max()), 1e-12)
        differing = sorted(expected ^ got)
        gaps = {int(i): abs(float(ref_scores[row, i]) - boundary) for i in differing}
        tie = all(gap <= tol * scale for gap in gaps.values())
        near_ties += int(tie)
        mismatches += int(not tie)
        rows.append({"row": row, "equal": False, "near_tie": tie, "only_reference": sorted(expected - got),
                     "only_onnx": sorted(got - expected), "boundary_gaps": gaps})
    return {"passed": mismatches == 0, "rows": rows, "near_ties": near_ties, "mismatches": mismatches}


def compare_scores_to_bounds(lower: np.ndarray, upper: np.ndarray, scores: np.ndarray, slack_rtol: float) -> dict[str, Any]:
    """Rank-count scores (CATP): every ONNX score must lie in the reference's [lower, upper] — the scores reachable
    when attention probabilities within the tie tolerance rank either way — up to ``slack_rtol`` of the largest score
    (float summation and image-importance weights)."""
    if lower.shape != scores.shape:
        return {"passed": False, "shape_reference": list(lower.shape), "shape_onnx": list(scores.shape)}
    scores64 = scores.astype(np.float64)
    slack = slack_rtol * max(float(np.abs(upper).max(initial=0.0)), 1e-12)
    below = np.maximum(lower - slack - scores64, 0.0)
    above = np.maximum(scores64 - upper - slack, 0.0)
    outside = (below > 0) | (above > 0)
    return {
        "passed": not bool(outside.any()),
        "mode": "rank bounds",
        "outside_bounds": int(outside.sum()),
        "max_violation": float(np.maximum(below, above).max(initial=0.0)),
        "max_bound_width": float((upper - lower).max(initial=0.0)),
        "tokens_with_rank_ties": int((upper - lower > slack).sum()),
        "tokens": int(scores.size),
    }


def compare_kept_sets_with_bounds(
    lower: np.ndarray, upper: np.ndarray, ref_kept: np.ndarray, kept: np.ndarray, slack_rtol: float
) -> dict[str, Any]:
    """Kept-index sets of a rank-count method. A differing row is a near-tie when every token only ONNX kept could
    score at least as high as every token only the reference kept (``upper[a] >= lower[b]``): rank ties in the
    attention probabilities explain the swap. Anything else is a mismatch."""
    rows = []
    near_ties = mismatches = 0
    for row in range(ref_kept.shape[0]):
        expected, got = set(ref_kept[row].tolist()), set(kept[row].tolist())
        if expected == got:
            rows.append({"row": row, "equal": True})
            continue
        slack = slack_rtol * max(float(np.abs(upper[row]).max()), 1e-12)
        only_reference, only_onnx = sorted(expected - got), sorted(got - expected)
        tie = min(upper[row, a] for a in only_onnx) >= max(lower[row, b] for b in only_reference) - slack
        near_ties += int(tie)
        mismatches += int(not tie)
        rows.append({"row": row, "equal": False, "near_tie": bool(tie), "only_reference": only_reference,
                     "only_onnx": only_onnx,
                     "bounds": {int(i): [float(lower[row, i]), float(upper[row, i])] for i in only_reference + only_onnx}})
    return {"passed": mismatches == 0, "mode": "rank bounds", "rows": rows, "near_ties": near_ties, "mismatches": mismatches}


def compare_tokens(
    reference: list[list[int]], actual: list[list[int]], margins: list[list[float]], tol: float, tied_rows=frozenset()
) -> dict[str, Any]:
    """Greedy tokens per row. A divergence is a near-tie when the reference's top-2 logit margin at the first
    differing step is within ``tol`` (either pick is a correct greedy decode within the tolerance), or when the row's
    kept-index set already differed by a near-tie (the two pipelines then decode from different tokens)."""
    rows = []
    near_ties = mismatches = 0
    for row, (ref, act) in enumerate(zip(reference, actual)):
        if ref == act:
            rows.append({"row": row, "equal": True, "tokens": ref})
            continue
        step = next((i for i, (a, b) in enumerate(zip(ref, act)) if a != b), min(len(ref), len(act)))
        margin = margins[row][step] if step < len(margins[row]) else float("inf")
        tie = margin <= tol or row in tied_rows
        near_ties += int(tie)
        mismatches += int(not tie)
        rows.append({"row": row, "equal": False, "near_tie": tie, "first_difference": step, "reference_margin": margin,
                     "reference": ref, "onnx": act})
    return {"passed": mismatches == 0, "rows": rows, "near_ties": near_ties, "mismatches": mismatches}


# ------------------------------------------------------------------------------------------------- run


class _RecordingRunner:
    """Wraps a runner and keeps every call's feeds and outputs (to replay the reference's inputs)."""

    def __init__(self, runner):
        self.runner = runner
        self.input_names, self.output_names = runner.input_names, runner.output_names
        self.calls: list[tuple[dict, dict]] = []

    def run(self, feeds):
        outputs = self.runner.run(feeds)
        self.calls.append((feeds, outputs))
        return outputs


def run_parity(
    engines: str | Path,
    images=None,
    questions: list[str] | None = None,
    backend: str = "ort-cpu",
    max_new_tokens: int = 8,
    model: str | Path | None = None,
    out_json: str | Path | None = None,
    quiet: bool = False,
    calibration: str = "auto",
) -> dict[str, Any]:
    """Compare the engines in ``engines`` with the PyTorch reference; write ``parity.json``; return the report.

    ``calibration``: ``float64`` (judge float tensors against a float64 run of the reference, calibrated on the fp32
    reference's own noise), ``relative`` (a tensor-scale-relative tolerance), ``auto`` (float64 where a float64
    copy of the model fits in memory)."""
    from runtime.manifest import Manifest

    say = (lambda *_: None) if quiet else (lambda msg: print(f"parity: {msg}", file=sys.stderr, flush=True))
    if calibration not in CALIBRATIONS:
        raise UsageError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    manifest = Manifest.load(engines, verify=False)
    integrity = _integrity(manifest)
    tol = TOLERANCES[manifest.precision]
    questions = list(questions or DEFAULT_QUESTIONS)
    images = images if images is not None else default_images(len(questions))
    if len(images) != len(questions):
        raise UsageError(f"{len(images)} image(s) for {len(questions)} question(s)")
    family_stages = family_parity(manifest.family)
    out_path = Path(out_json) if out_json else Path(engines) / "parity.json"
    if out_path.is_dir():
        raise UsageError(f"--out {out_path} is a folder; give the report's file name")

    say("loading the PyTorch reference")
    adapter = load_reference(manifest, model)
    chosen = choose_calibration(adapter, manifest.precision, calibration)
    if chosen.mode != "float64":
        say(f"float tensors judged with a relative tolerance: {chosen.why}")

    context = ParityContext(manifest, adapter, backend, tol, chosen, images, questions, max_new_tokens, say)
    stages: dict[str, Any] = {"integrity": integrity, **family_stages(context)}
    report = {
        "engines": str(Path(engines)),
        "backend": backend,
        "precision": manifest.precision,
        "tolerances": tol,
        "calibration": chosen.describe(),
        "samples": len(questions),
        "pruning": manifest.pruning.to_dict(),
        "stages": stages,
        "passed": all(stage["passed"] for stage in stages.values()),
    }
    try:
        write_atomically(out_path, json.dumps(report, indent=2, default=_json_default) + "\n")
    except OSError as err:
        raise UsageError(f"cannot write the parity report {out_path}: {err.strerror or err}") from None
    if not quiet:
        for name, stage in stages.items():
            print(f"parity: {name:<11} {'ok' if stage['passed'] else 'FAILED'}{_stage_note(stage)}", file=sys.stderr)
        print(f"parity: {'PASSED' if report['passed'] else 'FAILED'} -> {out_path}", file=sys.stderr)
    return report


def load_reference(manifest, model: str | Path | None):
    """The fp32 PyTorch reference for ``manifest``'s checkpoint (``model`` overrides the recorded source); a moved,
    incomplete or different checkpoint is one line naming ``--model``."""
    from export import adapters  # lazy: torch lives in export/
    from runtime.errors import CheckpointError

    source = Path(model or manifest.model["source"])
    flag = "--model" if model else f"the checkpoint recorded in the manifest ({source})"
    hint = "" if model else "; pass --model with the checkpoint the engines were built from"
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{flag}: no checkpoint there (moved or deleted?){hint}")
    recorded = manifest.model.get("weights_sha256") or {}
    missing = sorted(name for name in recorded if not (source / name).is_file())
    if missing:
        raise CheckpointError(f"{flag}: weight file(s) {', '.join(missing)} missing{hint}")
    adapters.detect(source)  # a checkpoint of the family at all
    adapter = adapters.load(adapters.get(manifest.family), source, "fp32")
    info = adapter.model_info()
    for key in ("config_sha256", "weights_sha256"):
        if info[key] != manifest.model.get(key):
            raise ManifestError(f"{source}: not the checkpoint the engines were built from ({key} differs); pass --model")
    return adapter


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_calibration(adapter, precision: str, requested: str) -> Calibration:
    """float64 where asked for, or (``auto``) where a float64 copy of the model fits in available memory."""
    if requested == "relative":
        return Calibration("relative", precision, why="--calibration relative")
    need = 2 * adapter.parameter_bytes()  # the float64 model, converted in place from fp32
    available = available_memory()
    if requested == "float64" or available is None or need * 5 // 4 + (512 << 20) <= available:
        return Calibration("float64", precision)
    return Calibration("relative", precision, why=f"a float64 copy of the model needs about {need / 2**30:.1f} GiB "
                                                 f"and {available / 2**30:.1f} GiB is available")


@dataclass
class ParityContext:
    """What every family's stages get: the engines' manifest, the reference adapter, the inputs, tolerances."""

    manifest: Any
    adapter: Any
    backend: str
    tol: dict[str, float]
    calibration: Calibration
    images: list
    questions: list[str]
    max_new_tokens: int
    say: Callable[[str], None]

    def pipelines(self):
        """(reference pipeline, reference runners, ONNX pipeline, ONNX runners), runners recording every call."""
        from runtime.backends import load_runners
        from runtime.pipelines import make_pipeline

        reference_runners = {name: _RecordingRunner(r) for name, r in self.adapter.torch_runners(self.manifest.pruning).items()}
        onnx_runners = {name: _RecordingRunner(r) for name, r in load_runners(self.manifest, self.backend).items()}
        reference = make_pipeline(self.manifest, reference_runners)
        reference.float_dtype = np.dtype(np.float32)  # the reference stays fp32 end to end, whatever the graphs' precision
        onnx = make_pipeline(self.manifest, onnx_runners)
        return reference, reference_runners, onnx, onnx_runners

    def generate(self, reference, onnx, pixel_values):
        """Both pipelines end to end on the same preprocessed inputs: (reference answers, ONNX answers, the
        reference's top-2 logit margin per row and step)."""
        self.say("generation: PyTorch reference")
        margins: list[list[float]] = []
        ref_answers = _answer_with_margins(reference, pixel_values, self.questions, self.max_new_tokens, margins)
        self.say(f"generation: ONNX ({self.backend})")
        onnx_answers = onnx.answer([], self.questions, max_new_tokens=self.max_new_tokens, pixel_values=pixel_values)
        return ref_answers, onnx_answers, margins

    def float64_outputs(self, requests: dict[str, tuple[str, dict[str, np.ndarray]]]) -> dict[str, dict | None]:
        """The float64 reference's outputs for each ``key: (graph, fp32 reference feeds)`` — the model converted to
        float64 once for all of them, then back; every value None without a float64 calibration."""
        if self.calibration.mode != "float64" or not requests:
            return {key: None for key in requests}
        import torch

        self.say("float64 reference (rounding-noise calibration)")
        with self.adapter.in_float64():
            runners = self.adapter.torch_runners(self.manifest.pruning, dtype=torch.float64)
            return {key: runners[graph].run(feeds) for key, (graph, feeds) in requests.items()}

    def judge(self, ref32, ref64, actual, names, rows=None) -> dict[str, Any]:
        """Float tensors against the calibrated bound (``runtime.tolerance``), optionally on ``rows`` only."""
        if rows is not None:
            ref32, actual = _take_rows(ref32, names, rows), _take_rows(actual, names, rows)
            ref64 = None if ref64 is None else _take_rows(ref64, names, rows)
        verdict = judge_tensors(ref32, ref64, actual, names, self.calibration)
        if rows is not None:
            verdict["rows_compared"] = len(rows)
        return verdict


def same_kept_rows(ref_kept: np.ndarray, onnx_kept: np.ndarray, ref64_outputs: dict | None) -> list[int]:
    """Rows whose kept set is the same in the fp32 reference, the ONNX graph and (when present) the float64
    reference: only there are tensors after the selection comparable elementwise (other rows are near-ties, judged
    by the kept-set logic)."""
    rows = [row for row in range(ref_kept.shape[0]) if np.array_equal(ref_kept[row], onnx_kept[row])]
    if ref64_outputs is not None:
        rows = [row for row in rows if np.array_equal(ref_kept[row], ref64_outputs["kept_indices"][row])]
    return rows


def _take_rows(tensors: dict[str, np.ndarray], names: list[str], rows: list[int]) -> dict[str, np.ndarray]:
    return {name: tensors[name][rows] for name in names}


# family name → module that defines ``stages(context) -> dict``: one per model family, imported when needed
FAMILY_PARITY = {"blip2-opt": "runtime.parity:blip2_stages", "mllama": "runtime.parity_mllama:stages"}


def family_parity(family: str) -> Callable[[ParityContext], dict[str, Any]]:
    import importlib

    if family not in FAMILY_PARITY:
        raise UsageError(f"parity has no stages for model family {family!r} (known: {', '.join(FAMILY_PARITY)})")
    module, function = FAMILY_PARITY[family].split(":")
    return getattr(importlib.import_module(module), function)


def blip2_stages(context: ParityContext) -> dict[str, Any]:
    """BLIP-2: preprocess, tokenize, visual, embed, prefill, decode, generation, hf_anchor."""
    manifest, adapter, tol, say = context.manifest, context.adapter, context.tol, context.say
    images, questions, max_new_tokens = context.images, context.questions, context.max_new_tokens
    reference, reference_runners, onnx, onnx_runners = context.pipelines()
    stages: dict[str, Any] = {}
    # -- preprocess and tokenize: runtime vs HF ------------------------------------------------------------
    say("preprocess + tokenize")
    hf_pixels = adapter.processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
    pixels = onnx.preprocess(images)
    stats = tensor_stats(hf_pixels, pixels) if hf_pixels.shape == pixels.shape else {"max_abs": float("inf")}
    stages["preprocess"] = {"passed": stats["max_abs"] <= tol["pixel_atol"], "shape": list(pixels.shape), **stats}
    prompts = [onnx.prompt_template.replace("{}", q, 1) for q in questions]
    hf_ids = [list(adapter.processor.tokenizer(p).input_ids) for p in prompts]
    ids = onnx.encode_questions(questions)
    stages["tokenize"] = {"passed": hf_ids == ids, "prompts": prompts, "hf_ids": hf_ids, "runtime_ids": ids}

    # -- end to end, both pipelines on HF's pixel values -----------------------------------------------------
    ref_answers, onnx_answers, margins = context.generate(reference, onnx, hf_pixels)

    # -- per graph, each fed the reference's inputs ------------------------------------------------------
    say("visual / embed / prefill / decode graphs")
    ref_visual_feeds, ref_visual = _concat_calls(reference_runners["visual"].calls)
    onnx_visual = onnx_runners["visual"].runner.run(ref_visual_feeds)
    # rank-count scores (CATP) jump by whole ranks where attention probabilities nearly tie: the reference gives
    # the range each score can take under the tolerance, and the ONNX scores must lie inside it
    bounds = adapter.score_bounds(manifest.pruning, ref_visual_feeds, tie_rtol=2 * tol["attention_rtol"])
    graph_calls = {graph: reference_runners[graph].calls[0] for graph in ("embed", "prefill", "decode")
                   if reference_runners[graph].calls}
    ref64 = context.float64_outputs({"visual": ("visual", ref_visual_feeds),
                                     **{graph: (graph, feeds) for graph, (feeds, _) in graph_calls.items()}})
    if bounds is None:
        visual = {
            "scores": context.judge(ref_visual, ref64["visual"], onnx_visual, ["scores"]),
            "kept_indices": compare_kept_sets(ref_visual["scores"], ref_visual["kept_indices"], onnx_visual["kept_indices"], tol["score_rtol"]),
        }
    else:
        lower, upper = bounds
        visual = {
            "scores": compare_scores_to_bounds(lower, upper, onnx_visual["scores"], tol["score_rtol"]),
            "kept_indices": compare_kept_sets_with_bounds(lower, upper, ref_visual["kept_indices"], onnx_visual["kept_indices"], tol["score_rtol"]),
        }
        visual["scores"]["reference"] = tensor_stats(ref_visual["scores"], onnx_visual["scores"])
        visual["scores"]["reference_within_bounds"] = bool(
            np.all((ref_visual["scores"] >= lower - 1e-3) & (ref_visual["scores"] <= upper + 1e-3)))
    same_rows = same_kept_rows(ref_visual["kept_indices"], onnx_visual["kept_indices"], ref64["visual"])
    visual["query_embeds"] = context.judge(ref_visual, ref64["visual"], onnx_visual, ["query_embeds"], rows=same_rows)
    visual["passed"] = all(v["passed"] for v in visual.values())
    stages["visual"] = visual
    for graph in ("embed", "prefill", "decode"):
        if graph not in graph_calls:
            stages[graph] = {"passed": True, "skipped": "the reference never ran this graph (EOS at once)"}
            continue
        feeds, ref_out = graph_calls[graph]
        onnx_out = onnx_runners[graph].runner.run(_cast_feeds(feeds, manifest.graphs[graph]))
        stages[graph] = context.judge(ref_out, ref64[graph], onnx_out, list(ref_out))

    ref_tokens = [a.token_ids for a in ref_answers]
    tied_rows = {r["row"] for r in visual["kept_indices"]["rows"] if not r["equal"] and r["near_tie"]}
    stages["generation"] = compare_tokens(ref_tokens, [a.token_ids for a in onnx_answers], margins, tol["logit_margin"], tied_rows)
    stages["generation"]["answers"] = [
        {"question": q, "reference": r.answer, "onnx": o.answer} for q, r, o in zip(questions, ref_answers, onnx_answers)
    ]

    # -- anchor the reference to HF itself ------------------------------------------------------------------
    say("anchor: HF generate")
    stages["hf_anchor"] = hf_anchor(adapter, manifest, images, questions, ref_tokens, ref_visual, max_new_tokens, onnx)
    return stages


def hf_anchor(adapter, manifest, images, questions, ref_tokens, ref_visual, max_new_tokens, pipeline) -> dict[str, Any]:
    """The reference's greedy tokens vs Hugging Face's own ``generate`` where HF can express the configuration."""
    import torch

    ratio, positions = manifest.pruning.ratio, manifest.pruning.positions
    model, processor = adapter.model, adapter.processor
    prompts = [pipeline.prompt_template.replace("{}", q, 1) for q in questions]
    hf_tokens = []
    kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0)
    with torch.no_grad():
        if ratio == 0:
            mode = "Blip2ForConditionalGeneration.generate (no pruning)"
            for image, prompt in zip(images, prompts):
                inputs = processor(images=image, text=prompt, return_tensors="pt")
                output = model.generate(**inputs, **kwargs)
                hf_tokens.append(output[0, inputs["input_ids"].shape[1]:].tolist())
        elif positions == "compact":
            mode = "language_model.generate(inputs_embeds=[pruned query embeds, text embeds])"
            lm = model.language_model
            for row, prompt in enumerate(prompts):
                text_ids = torch.tensor([processor.tokenizer(prompt).input_ids])
                query_embeds = torch.from_numpy(ref_visual["query_embeds"][row : row + 1])
                embeds = torch.cat([query_embeds, lm.get_input_embeddings()(text_ids)], dim=1)
                mask = torch.ones(embeds.shape[:2], dtype=torch.long)
                output = lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
                hf_tokens.append(output[0].tolist())
        else:
            return {"passed": True, "applicable": False,
                    "why": "HF has no form of original positions with pruned queries; covered by the reference"}
    eos = set(manifest.text["eos_token_ids"])
    hf_tokens = [_strip_after_eos(t, eos) for t in hf_tokens]
    return {"passed": hf_tokens == ref_tokens, "applicable": True, "mode": mode, "hf": hf_tokens, "reference": ref_tokens}


def _strip_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    out = []
    for token in tokens:
        if token in eos:
            break
        out.append(token)
    return out


def _answer_with_margins(pipeline, pixel_values, questions, max_new_tokens, margins_out):
    """Run the reference pipeline batch by batch, recording each row's top-2 logit margin at every greedy step."""
    from runtime.pipelines import slice_pixels

    steps: list[np.ndarray] = []
    originals = {name: pipeline.runners[name] for name in ("prefill", "decode")}

    class Margins:
        def __init__(self, runner):
            self.runner, self.input_names, self.output_names = runner, runner.input_names, runner.output_names

        def run(self, feeds):
            outputs = self.runner.run(feeds)
            top2 = np.sort(outputs["logits"], axis=-1)[:, -2:]
            steps.append(top2[:, 1] - top2[:, 0])  # (B,)
            return outputs

    pipeline.runners.update({name: Margins(runner) for name, runner in originals.items()})
    answers = []
    try:
        batch = pipeline.manifest.max_batch
        for start in range(0, len(questions), batch):
            steps.clear()
            chunk = questions[start : start + batch]
            answers += pipeline.answer([], chunk, max_new_tokens=max_new_tokens,
                                       pixel_values=slice_pixels(pixel_values, start, start + batch))
            margins_out += [[float(step[row]) for step in steps] for row in range(len(chunk))]
    finally:
        pipeline.runners.update(originals)
    return answers


def _integrity(manifest) -> dict[str, Any]:
    """Every file the manifest lists exists with its sha256 (a failure here is reported, not fatal: the numeric
    stages still run and show what the change does)."""
    from runtime.manifest import sha256_file

    problems = {}
    for name, digest in manifest.files.items():
        path = manifest.path(name)
        if not path.is_file():
            problems[name] = "missing"
        elif sha256_file(path) != digest:
            problems[name] = "sha256 differs from the manifest"
    if problems:
        missing = [n for n, why in problems.items() if why == "missing"]
        if missing:
            raise ManifestError(f"{manifest.root}: file(s) listed in the manifest are missing: {', '.join(missing)}")
    return {"passed": not problems, "files": len(manifest.files), "problems": problems}


def _concat_calls(calls):
    feeds = {name: np.concatenate([c[0][name] for c in calls]) for name in calls[0][0]}
    outputs = {name: np.concatenate([c[1][name] for c in calls]) for name in calls[0][1]}
    return feeds, outputs


def _cast_feeds(feeds, spec):
    return {t.name: feeds[t.name].astype(np.dtype(t.dtype)) for t in spec.inputs}


def _stage_note(stage: dict) -> str:
    notes = []
    for key in ("near_ties", "mismatches"):
        if stage.get(key):
            notes.append(f"{key}={stage[key]}")
    worst = worst_exceedance(stage)
    if worst is not None:
        notes.append(f"error/bound={worst:.3g}")
    if stage.get("applicable") is False:
        notes.append("n/a")
    return f"  ({', '.join(notes)})" if notes else ""


def worst_exceedance(stage: Any) -> float | None:
    """The largest ``error / bound`` of any float tensor judged in ``stage`` (nested results included); None when
    the stage judged no float tensor. Below 1 passes; a failure's value says how far above the noise it is."""
    found = []
    if isinstance(stage, dict):
        if "worst_exceedance" in stage and "tensors" in stage:
            found.append(stage["worst_exceedance"])
        found += [w for value in stage.values() if (w := worst_exceedance(value)) is not None]
    elif isinstance(stage, list):
        found += [w for value in stage if (w := worst_exceedance(value)) is not None]
    return max(found) if found else None


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="parity.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="reference checkpoint (default: the manifest's model source)")
    parser.add_argument("--image", action="append", default=[], help="image (repeatable, with --question); default: synthetic images")
    parser.add_argument("--question", action="append", default=[])
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="report path (default ENGINES/parity.json)")
    parser.add_argument("--calibration", default="auto", choices=CALIBRATIONS,
                        help="float tensors: float64 = against a float64 run of the reference, bounded by the fp32 "
                             "reference's own rounding noise; relative = a tensor-scale-relative tolerance; auto "
                             "(default) = float64 where a float64 copy of the model fits in memory")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli_errors("parity.py"):
        from runtime.preprocess import load_image

        if len(args.image) != len(args.question):
            raise UsageError("give one --question per --image")
        images = [load_image(p) for p in args.image] or None
        report = run_parity(args.engines, images, args.question or None, args.backend, args.max_new_tokens,
                            args.model, args.out, args.quiet, args.calibration)
        return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
