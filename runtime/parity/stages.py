"""The parity skeleton every model family shares: the inputs, the recording runners, the context the family's stages
get, the registry of those stages, and :func:`run_parity`, which ties them together.

    run_parity
      → the manifest, its integrity, the tolerances of its precision
      → the PyTorch reference: ``export.reference.load_reference`` — the one import of ``export/`` in ``runtime/``,
        made here, lazily; the object it returns is handed down (nothing else in ``runtime/`` touches torch)
      → the calibration (float64 where a float64 copy of the model fits, ``runtime/tolerance.py``)
      → :class:`ParityContext` → the family's stages (``@register_stages("blip2-opt")`` in ``runtime/parity/blip2.py``,
        ``"mllama"`` in ``runtime/parity/mllama.py``; each module adds only its own stages)
      → the report (``runtime/parity/report.py``), and with ``save_reference`` the reference's graph calls in
        Polygraphy's formats (``runtime/parity/run_results.py``).

Both pipelines run over recording runners (:class:`RecordingRunner`), which keep every call's feeds and outputs:
the stages replay the reference's own inputs through each exported graph. Runners are used only through ``run(feeds)``,
``input_names`` and ``output_names``, so nothing here depends on a family's graph IO names.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.errors import ManifestError, UsageError
from runtime.memory import available_memory, peak_rss_bytes
from runtime.parity.compare import compare_hf_tokens, judge
from runtime.parity.report import check_report_path, show_summary, write_report
from runtime.tolerance import Calibration

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


# ------------------------------------------------------------------------------------------------- recording


@dataclass
class GraphCall:
    """One recorded call of a graph: its feeds (the graph's inputs only), outputs and wall time in seconds."""

    graph: str
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    seconds: float


class RecordingRunner:
    """Wraps a runner and keeps every call's feeds and outputs (``calls``, to replay the reference's inputs), also
    appending them to ``log`` (shared by all graphs of a pipeline: the calls in the order they ran)."""

    def __init__(self, graph: str, runner, log: list[GraphCall] | None = None):
        self.graph, self.runner, self.log = graph, runner, log
        self.input_names, self.output_names = runner.input_names, runner.output_names
        self.calls: list[tuple[dict, dict]] = []

    def run(self, feeds):
        started = time.perf_counter()
        outputs = self.runner.run(feeds)
        seconds = time.perf_counter() - started
        # copies: the KV cache's buffers are the live ones, written in place after this call
        feeds = {name: feeds[name].copy() for name in self.input_names if name in feeds}
        self.calls.append((feeds, outputs))
        if self.log is not None:
            self.log.append(GraphCall(self.graph, feeds, outputs, seconds))
        return outputs


def concat_calls(calls):
    """Feeds and outputs of several calls of one graph, concatenated along the batch axis."""
    feeds = {name: np.concatenate([c[0][name] for c in calls]) for name in calls[0][0]}
    outputs = {name: np.concatenate([c[1][name] for c in calls]) for name in calls[0][1]}
    return feeds, outputs


def run_in_batches(runner, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``runner`` on feeds concatenated over several calls, at most ``batch`` rows at a time (the manifest's
    ``max_batch``: what the engines were built to hold at once), the outputs concatenated back."""
    rows = len(next(iter(feeds.values())))
    if rows <= batch:
        return runner.run(feeds)
    parts = [runner.run({name: value[start : start + batch] for name, value in feeds.items()})
             for start in range(0, rows, batch)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def cast_feeds(feeds, spec):
    """``feeds`` in the dtypes the graph ``spec`` (the manifest's) declares: the reference feeds fp32 to fp16 graphs."""
    return {t.name: feeds[t.name].astype(np.dtype(t.dtype)) for t in spec.inputs}


# ------------------------------------------------------------------------------------------------- calibration


def choose_calibration(reference, precision: str, requested: str) -> Calibration:
    """float64 where asked for, or (``auto``) where a float64 copy of the model fits in available memory."""
    if requested == "relative":
        return Calibration("relative", precision, why="--calibration relative")
    if reference.precision != "fp32":
        if requested == "float64":
            raise UsageError(f"--calibration float64 needs the fp32 reference (it is {reference.precision} here: "
                             "--reference-dtype fp32)")
        return Calibration("relative", precision, why=f"the reference runs in {reference.precision} (a float64 copy is "
                                                      "made from the fp32 reference only)")
    need = 2 * reference.parameter_bytes()  # the float64 model, converted in place from fp32
    available = available_memory()
    if requested == "float64" or available is None or need * 5 // 4 + (512 << 20) <= available:
        return Calibration("float64", precision)
    return Calibration("relative", precision, why=f"a float64 copy of the model needs about {need / 2**30:.1f} GiB "
                                                 f"and {available / 2**30:.1f} GiB is available")


# ------------------------------------------------------------------------------------------------- context


@dataclass
class ParityContext:
    """What every family's stages get: the engines' manifest, the PyTorch reference (``export.reference``'s object,
    used only through its methods), the inputs, tolerances and calibration. ``reference_calls`` collects every
    call of the reference's graphs, in order."""

    manifest: Any
    reference: Any
    backend: str
    tol: dict[str, float]
    calibration: Calibration
    images: list
    questions: list[str]
    max_new_tokens: int
    say: Callable[[str], None]
    save_reference: Path | None = None
    num_beams: int = 1  # > 1: both pipelines and HF generate decode by beam search
    reference_calls: list[GraphCall] = field(default_factory=list)
    saved_reference: dict[str, str] | None = None

    def reference_pipeline(self):
        """(reference pipeline, its runners), every call recorded. The reference's whole part of parity runs before
        :meth:`release_reference`; the ONNX side is loaded only after it (:meth:`onnx_pipeline`), so the two never
        hold the model at once."""
        from runtime.pipelines import make_pipeline

        runners = {name: RecordingRunner(name, runner, self.reference_calls)
                   for name, runner in self.reference.runners().items()}
        pipeline = make_pipeline(self.manifest, runners)
        pipeline.float_dtype = np.dtype(np.float32)  # the reference's own buffers stay fp32, whatever the graphs' precision
        return pipeline, runners

    def reference_answers(self, reference, pixel_values):
        """The reference pipeline end to end on preprocessed inputs: (answers, the top-2 logit margin per row and
        step; beam search: the closest candidate-score gap of each question's whole search)."""
        self.say("generation: PyTorch reference")
        margins: list[list[float]] = []
        if self.num_beams > 1:
            answers = beam_answers_with_margins(reference, pixel_values, self.questions, self.max_new_tokens,
                                                self.num_beams, margins)
        else:
            answers = answer_with_margins(reference, pixel_values, self.questions, self.max_new_tokens, margins)
        return answers, margins

    def release_reference(self) -> None:
        """The reference's part is done: save its graph calls when asked (they need the model: float64 outputs, score
        bounds), then free the model before the ONNX side loads."""
        if self.save_reference is not None:
            self.saved_reference = save_recorded_reference(self, self.save_reference)
        self.reference_calls.clear()  # saved or not needed: the stages keep the calls they judge, and free them as they go
        self.reference.release()

    def onnx_pipeline(self):
        """(ONNX pipeline, its runners) on ``backend``. Nothing recorded: every graph is judged on the reference's
        inputs, and the pipeline's own calls (a KV cache copy per decode step) are not kept."""
        from runtime.backends import load_runners
        from runtime.pipelines import make_pipeline

        self.say(f"loading the engines ({self.backend})")
        runners = load_runners(self.manifest, self.backend)
        return make_pipeline(self.manifest, runners), runners

    def onnx_answers(self, onnx, pixel_values):
        self.say(f"generation: ONNX ({self.backend})")
        return onnx.answer([], self.questions, max_new_tokens=self.max_new_tokens, pixel_values=pixel_values,
                           num_beams=self.num_beams)

    def float64_outputs(self, requests: dict[Any, tuple[str, dict[str, np.ndarray]]]) -> dict[Any, dict | None]:
        """The float64 reference's outputs for each ``key: (graph, fp32 reference feeds)`` — the model converted to
        float64 once for all of them, then back; every value None without a float64 calibration."""
        if self.calibration.mode != "float64" or not requests:
            return {key: None for key in requests}
        self.say("float64 reference (rounding-noise calibration)")
        return self.reference.float64_outputs(requests)

    def judge(self, ref32, ref64, actual, names, rows=None) -> dict[str, Any]:
        """Float tensors against the calibrated bound (``runtime.tolerance``), optionally on ``rows`` only."""
        return judge(ref32, ref64, actual, names, self.calibration, rows)


def answer_with_margins(pipeline, pixel_values, questions, max_new_tokens, margins_out):
    """Run the reference pipeline batch by batch, recording each row's top-2 logit margin at every greedy step."""
    from runtime.pipelines import slice_pixels

    steps: list[np.ndarray] = []
    originals = {name: pipeline.runners[name] for name in ("prefill", "decode")}

    class Margins:
        def __init__(self, runner):
            self.runner, self.input_names, self.output_names = runner, runner.input_names, runner.output_names

        def run(self, feeds):
            outputs = self.runner.run(feeds)
            top2 = np.sort(outputs["logits"], axis=-1)[:, -2:]  # (B, 2)
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


def beam_answers_with_margins(pipeline, pixel_values, questions, max_new_tokens, num_beams, margins_out):
    """Beam search on the reference pipeline, request by request; each question's margin is the smallest gap between
    adjacent top candidate scores over its whole search (the final tokens can change at any earlier position), given
    for every step (``compare_tokens`` reads it at the first differing one)."""
    from runtime.pipelines import slice_pixels

    gaps: list[np.ndarray] = []
    pipeline.on_beam_margins = lambda step, gap: gaps.append(gap)  # (B,) per step
    answers = []
    try:
        batch = max(1, pipeline.manifest.max_batch // num_beams)
        for start in range(0, len(questions), batch):
            gaps.clear()
            chunk = questions[start : start + batch]
            answers += pipeline.answer([], chunk, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                       pixel_values=slice_pixels(pixel_values, start, start + batch))
            smallest = np.min(gaps, axis=0) if gaps else np.full(len(chunk), np.inf)  # (B,)
            margins_out += [[float(smallest[row])] * max_new_tokens for row in range(len(chunk))]
    finally:
        pipeline.on_beam_margins = None
    return answers


def hf_anchor_stage(generation, reference_tokens: list[list[int]], eos_token_ids) -> dict[str, Any]:
    """The ``hf_anchor`` stage from the reference's :class:`export.reference.HfGeneration`: HF's tokens against the
    reference's, or not applicable (and why) where HF cannot express the configuration."""
    if generation.tokens is None:
        return {"passed": True, "applicable": False, "why": generation.why}
    return compare_hf_tokens(generation.tokens, reference_tokens, eos_token_ids, generation.mode)


# ------------------------------------------------------------------------------------------------- families

FamilyStages = Callable[[ParityContext], dict[str, Any]]
FAMILY_STAGES: dict[str, FamilyStages] = {}


def register_stages(family: str) -> Callable[[FamilyStages], FamilyStages]:
    """Decorator: ``@register_stages("mllama")`` over ``stages(context) -> {stage name: result}``."""

    def wrap(stages: FamilyStages) -> FamilyStages:
        FAMILY_STAGES[family] = stages
        return stages

    return wrap


def family_stages(family: str) -> FamilyStages:
    if family not in FAMILY_STAGES:
        raise UsageError(f"parity has no stages for model family {family!r} (known: {', '.join(FAMILY_STAGES)})")
    return FAMILY_STAGES[family]


def integrity(manifest) -> dict[str, Any]:
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


def stderr_say(quiet: bool) -> Callable[[str], None]:
    return (lambda *_: None) if quiet else (lambda msg: print(f"parity: {msg}", file=sys.stderr, flush=True))


def save_recorded_reference(context: ParityContext, path: Path) -> dict[str, str]:
    """Every graph call the reference pipeline made, with the float64 reference's outputs of the same feeds under
    the float64 calibration, written in Polygraphy's formats (``runtime/parity/run_results.py``)."""
    from runtime.parity import run_results

    calls = context.reference_calls
    context.say(f"saving the reference's {len(calls)} graph calls")
    float64 = context.float64_outputs({index: (call.graph, call.feeds) for index, call in enumerate(calls)})
    saved_float64 = None if context.calibration.mode != "float64" else [float64[index] for index in range(len(calls))]
    bounds, any_bounds = [], False
    for call in calls:  # rank-count methods: the score bounds of every call that selects tokens
        selects = {"scores", "kept_indices"} <= set(call.outputs)
        found = context.reference.score_bounds(call.feeds, tie_rtol=2 * context.tol["attention_rtol"]) if selects else None
        bounds.append({} if found is None else {run_results.LOWER: found[0], run_results.UPPER: found[1]})
        any_bounds = any_bounds or found is not None
    outputs, inputs = run_results.save_reference(path, calls, saved_float64, bounds if any_bounds else None)
    return {"outputs": str(outputs), "inputs": str(inputs)}


# ------------------------------------------------------------------------------------------------- run


def open_engines(engines: str | Path, calibration: str, backend: str | None = None):
    """What every parity run starts with: the flag checked, the manifest loaded, every file's sha256 checked, the
    backend able to run here (one line now, before the reference loads) → (manifest, the integrity stage, the
    precision's tolerances)."""
    from runtime.backends import resolve_backend
    from runtime.manifest import Manifest

    if calibration not in CALIBRATIONS:
        raise UsageError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    manifest = Manifest.load(engines, verify=False)
    checked = integrity(manifest)
    if backend is not None:
        resolve_backend(backend, manifest)
    return manifest, checked, TOLERANCES[manifest.precision]


def report_head(engines, backend: str, manifest, tol: dict, chosen: Calibration) -> dict[str, Any]:
    """The fields every parity report starts with: what was checked, on what, with which tolerances."""
    return {"engines": str(Path(engines)), "backend": backend, "precision": manifest.precision, "tolerances": tol,
            "calibration": chosen.describe()}


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
    save_reference: str | Path | None = None,
    reference_dtype: str = "auto",
    num_beams: int = 1,
) -> dict[str, Any]:
    """Compare the engines in ``engines`` with the PyTorch reference; write ``parity.json``; return the report.

    ``calibration``: ``float64`` (judge float tensors against a float64 run of the reference, calibrated on the fp32
    reference's own noise), ``relative`` (a tensor-scale-relative tolerance), ``auto`` (float64 where a float64
    copy of the model fits in memory). ``reference_dtype``: ``fp32``, ``fp16`` (as the exporter builds it), ``auto``
    (fp32 where an fp32 copy of the checkpoint fits in memory, else the engines' precision). ``save_reference``: also
    write the reference's graph calls (inputs, fp32 and, when calibrated so, float64 outputs) in Polygraphy's formats (``runtime/parity/run_results.py``).
    ``num_beams`` > 1: the generation and HF-anchor stages decode by beam search (HF ``generate(num_beams=N)``)."""
    from runtime.parity import run_results

    say = stderr_say(quiet)
    manifest, checked, tol = open_engines(engines, calibration, backend)
    from runtime.pipelines.base import check_num_beams

    check_num_beams(num_beams, manifest.max_batch)
    questions = list(questions or DEFAULT_QUESTIONS)
    images = images if images is not None else default_images(len(questions))
    if len(images) != len(questions):
        raise UsageError(f"{len(images)} image(s) for {len(questions)} question(s)")
    stages_of = family_stages(manifest.family)
    out_path = check_report_path(out_json, engines)
    if save_reference is not None:
        save_reference = run_results.check_save_path(save_reference, manifest)

    from export.reference import choose_reference_dtype, load_reference  # the one import of export/ (torch) in runtime/

    source = Path(model or manifest.model["source"])
    dtype, dtype_why = choose_reference_dtype(reference_dtype, manifest, source, available_memory())
    say(f"loading the PyTorch reference ({dtype}: {dtype_why})")
    reference = load_reference(manifest, model, dtype)
    chosen = choose_calibration(reference, manifest.precision, calibration)
    if chosen.mode != "float64":
        say(f"float tensors judged with a relative tolerance: {chosen.why}")

    context = ParityContext(manifest, reference, backend, tol, chosen, images, questions, max_new_tokens, say,
                            save_reference, num_beams)
    stages: dict[str, Any] = {"integrity": checked, **stages_of(context)}
    report = {
        **report_head(engines, backend, manifest, tol, chosen),
        "reference_dtype": {"dtype": dtype, "why": dtype_why},
        "samples": len(questions),
        "num_beams": num_beams,
        "pruning": manifest.pruning.to_dict(),
        "stages": stages,
        "passed": all(stage["passed"] for stage in stages.values()),
    }
    if context.saved_reference is not None:
        report["saved_reference"] = context.saved_reference
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_report(out_path, report)
    if not quiet:
        show_summary(stages, report["passed"], out_path)
    return report
