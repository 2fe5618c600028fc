"""Build an engines folder: load the checkpoint through its adapter, trace every graph, write the manifest.

The folder is assembled in a hidden sibling and published atomically only when complete (``export/outdir.py``), so
a failure — or a kill at any instant — never leaves a half-written ``--out``, and a folder this project did not
write is never replaced without ``--force``.
"""
from __future__ import annotations

import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from export import adapters, outdir, pruning
from export.pruning import PruningConfig
from export.tracing import DEFAULT_OPSET, EXPORTER, SUPPORTED_OPSETS, TWO_GB, export_graph
from export.weights import WeightStore
from runtime.contract import POSITION_POLICIES, ResolvedPruning
from runtime.errors import UsageError
from runtime.manifest import Manifest
from runtime.memory import gib, peak_rss_bytes

PRECISIONS = ("fp32", "fp16")
BACKENDS = ("onnx", "trt")


@dataclass
class BuildOptions:
    model: Path
    out: Path | None = None
    pruning: PruningConfig = field(default_factory=PruningConfig)
    positions: str = "original"
    precision: str = "fp32"
    backend: str = "onnx"
    prompt_template: str | None = None
    max_batch: int = 8
    opset: int = DEFAULT_OPSET
    external_data_threshold: int = TWO_GB
    force: bool = False  # replace an --out this project did not write
    compute_capabilities: list[str] | None = None  # --backend trt with TensorRT for RTX: its targets
    workspace_mib: int | None = None  # --backend trt: the builder's workspace limit


def default_out(options: BuildOptions, engines_root: Path) -> Path:
    ratio = f"{options.pruning.ratio:g}"
    return engines_root / f"{options.model.name}-{options.pruning.method}-r{ratio}"


def validate(options: BuildOptions) -> None:
    """Every check that needs no model, so bad flags fail in a second."""
    pruning.keep_count(32, options.pruning.ratio)  # ratio range
    if options.pruning.method is not None:
        pruning.check_method(options.pruning.method)
    if options.positions not in POSITION_POLICIES:
        raise UsageError(f"--positions must be one of {', '.join(POSITION_POLICIES)}, got {options.positions!r}")
    if options.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    if options.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}")
    if options.backend == "trt":  # TensorRT present and the flags it takes valid, before anything is loaded
        from runtime.backends.trt_build import compute_capabilities, tensorrt_module

        compute_capabilities(tensorrt_module(), options.compute_capabilities)
        if options.workspace_mib is not None and options.workspace_mib < 1:
            raise UsageError(f"--workspace-mib must be at least 1, got {options.workspace_mib}")
    elif options.compute_capabilities or options.workspace_mib is not None:
        raise UsageError("--compute-capability and --workspace-mib are TensorRT options: add --backend trt")
    if options.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {options.max_batch}")
    if options.opset not in SUPPORTED_OPSETS:
        raise UsageError(f"--opset must be between {SUPPORTED_OPSETS.start} and {SUPPORTED_OPSETS.stop - 1} "
                         f"(what the exporter and the graphs support), got {options.opset}")
    if options.pruning.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {options.pruning.seed}")
    if options.prompt_template is not None and "{}" not in options.prompt_template:
        raise UsageError(f"--prompt-template must contain '{{}}' where the question goes, got {options.prompt_template!r}")
    if options.pruning.layer_weights not in pruning.LAYER_WEIGHT_PRESETS:
        # a custom list: check it is numeric now; its length is checked against the model's layers later
        pruning.parse_weight_list(options.pruning.layer_weights)


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("vtprune", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


class Progress:
    """Numbered steps with timings on stderr."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.step, self.quiet = total, 0, quiet
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        self.step += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[{self.step}/{self.total}] {message}  (+{elapsed:.1f}s)", file=sys.stderr, flush=True)


def describe(adapter, resolved: ResolvedPruning, options: BuildOptions, folder: Path, graph_specs: dict) -> Manifest:
    """The manifest for ``adapter`` + ``resolved`` pruning; writes the tokenizer into ``folder``."""
    text = adapter.text_settings(options.prompt_template)
    text["tokenizer"] = adapter.save_tokenizer(folder)
    return Manifest(
        family=adapter.name,
        model=adapter.model_info(),
        pruning=resolved,
        precision=options.precision,
        opset=options.opset,
        exporter=EXPORTER,
        versions=tool_versions(),
        text=text,
        preprocess=adapter.preprocess_settings(),
        language_model=adapter.language_model_settings(),
        graphs=graph_specs,
        max_batch=options.max_batch,
        backend=options.backend,
        root=folder,
    )


def check_prompt(manifest: Manifest) -> None:
    """The runtime's own prompt code on a sample question: a template or chat template the runtime would refuse
    (no ``{}``, Mllama: not exactly one ``<|image|>``, a chat template that does not parse) fails the build now."""
    from runtime.pipelines import make_pipeline

    make_pipeline(manifest, runners={}).encode_questions(["what is in the image?"])


def with_default_method(options: BuildOptions, adapter_cls) -> BuildOptions:
    """``--method`` left out: the model family's own method (CATP for BLIP-2, trim-sum for LLaMA-3.2-Vision)."""
    if options.pruning.method is not None:
        return options
    return replace(options, pruning=replace(options.pruning, method=adapter_cls.default_method))


def build(options: BuildOptions, engines_root: Path, quiet: bool = False) -> Path:
    validate(options)
    adapter_cls = adapters.detect(options.model)
    options = with_default_method(options, adapter_cls)
    adapter_cls.check_options(options.pruning, options.positions)  # before the (possibly large) checkpoint is loaded
    out = Path(options.out) if options.out else default_out(options, engines_root)
    if out.is_symlink():  # a link to an engines folder: the folder it names is what gets replaced
        out = out.resolve()
    outdir.check_out(out, options.model, options.force)  # before the (possibly large) checkpoint is loaded

    outdir.recover(out)  # leftovers of killed builds into the same folder
    staging = outdir.make_staging(out)  # fails here, not after loading, when the folder cannot be created
    progress = Progress(total=3 + 4 + (options.backend == "trt"), quiet=quiet)  # refined once the graphs are known
    try:
        progress(f"loading {adapter_cls.name} checkpoint {options.model}")
        adapter = adapters.load(adapter_cls, options.model, options.precision)
        resolved = adapter.resolve(options.pruning, options.positions)
        manifest = describe(adapter, resolved, options, staging, graph_specs={})  # writes the tokenizer
        check_prompt(manifest)  # before any tracing
        store = WeightStore(staging)  # every graph's weights streamed into one weights.bin as it is traced
        try:
            graphs = adapter.graphs(resolved)
            progress.total = 3 + len(graphs) + (options.backend == "trt")  # load, each graph, manifest, [plans], done
            for graph in graphs:
                progress(f"tracing {graph.name} graph (weights so far: {store.bytes_written() / 1e9:.2f} GB)")
                manifest.graphs[graph.name] = export_graph(graph, staging, store, options.opset,
                                                           options.external_data_threshold)
            sharing = store.finish()
        finally:
            store.close()
        if not quiet:
            print(f"  weights: {sharing.graph_initializer_bytes / 1e6:.1f} MB across the graphs → "
                  f"{sharing.unique_bytes / 1e6:.1f} MB stored once ({sharing.unique_tensors} tensors)", file=sys.stderr)
        dim_names = {dim for spec in manifest.graphs.values() for tensor in (*spec.inputs, *spec.outputs)
                     for dim in tensor.shape if isinstance(dim, str)}
        manifest.dynamic_dims = adapter.dynamic_dims(dim_names, options.max_batch)
        progress("writing preprocessing settings and manifest")
        manifest.write(staging)
        if options.backend == "trt":  # plans built in the staging folder: a refused graph publishes nothing
            from runtime.backends.trt_build import build_engines

            progress("building TensorRT plans")
            build_engines(staging, options.compute_capabilities, options.workspace_mib,
                          say=(lambda message: None) if quiet else (lambda message: print(f"  {message}", file=sys.stderr)))
        outdir.publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"done: {out} (k={resolved.k} of {resolved.num_visual_tokens})")
    if not quiet:
        written = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
        print(f"  wrote {written / 1e9:.2f} GB; peak memory (RSS) {gib(peak_rss_bytes())}", file=sys.stderr)
    return out


def reference_pipeline(options: BuildOptions, folder: Path, adapter=None):
    """The PyTorch reference pipeline for ``options`` without tracing anything: the runtime pipeline driven by torch
    runners (``eval_vqa.py --backend torch``). ``folder`` receives the tokenizer; pass ``adapter`` to reuse a
    loaded model across configurations."""
    from runtime.pipelines import make_pipeline

    validate(options)
    adapter_cls = type(adapter) if adapter is not None else adapters.detect(options.model)
    options = with_default_method(options, adapter_cls)
    adapter = adapter or adapter_cls(options.model, "fp32")
    resolved = adapter.resolve(options.pruning, options.positions)
    Path(folder).mkdir(parents=True, exist_ok=True)
    manifest = describe(adapter, resolved, options, Path(folder), graph_specs={})
    return make_pipeline(manifest, adapter.torch_runners(resolved))
