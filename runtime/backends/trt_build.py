"""TensorRT plans from an engines folder's ONNX graphs, torch-free (plans are built where they run).

    tensorrt_module()        TensorRT 10/11 (``tensorrt``, datacenter GPUs) when installed, else TensorRT for RTX
                             (``tensorrt_rtx``, builds ahead of time without a GPU); which one, and its version
    optimization_profile()   every dynamic dimension of a graph's inputs → (min, opt, max) from the manifest's
                             ``dynamic_dims``, which the model adapter declared at export time; ``k`` is static
    build_plan()             parse (from file: external data works) → profile → build → serialized plan; a graph
                             the parser or builder refuses is one line naming the node, its op and the message

The two flavours share TensorRT 10's API and are both used strongly typed: precision comes from the graph's own
types (an fp16 manifest's graphs carry fp16 tensors; fp32 ones stay fp32), so a plan computes in the precision its
parity was judged in. TensorRT for RTX is strongly typed by construction (``create_network(0)``; it has no fp16
flag); TensorRT 10/11 gets the ``STRONGLY_TYPED`` network flag. TF32 (on by default) is turned off, so that fp32 graphs
multiply in fp32: parity holds fp32 plans to fp32's rounding noise. TensorRT for RTX targets compute capabilities
(``--compute-capability``; by default its own portable set) and must not be
given a timing cache (it then looks for a GPU). Only the TensorRT for RTX path runs on this project's CI machines;
TensorRT 10/11 proper is written against the same calls and was not executed here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import BackendError, UnsupportedError, UsageError

INSTALL_HINT = ("install TensorRT: pip install '.[trt-rtx]' (TensorRT for RTX: builds without a GPU, runs on RTX-class "
                "GPUs) or '.[trt]' (TensorRT 10/11, NVIDIA's index)")


@dataclass(frozen=True)
class TensorRT:
    module: Any
    flavour: str  # "tensorrt" or "tensorrt-rtx"
    version: str


def tensorrt_module() -> TensorRT:
    """The TensorRT Python module this machine has: ``tensorrt`` first (TensorRT 10/11), else ``tensorrt_rtx``."""
    try:
        import tensorrt as module

        return TensorRT(module, "tensorrt", str(module.__version__))
    except ImportError:
        pass
    try:
        import tensorrt_rtx as module
    except ImportError:
        raise UnsupportedError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    return TensorRT(module, "tensorrt-rtx", str(module.__version__))


def compute_capabilities(trt: TensorRT, names: list[str] | None) -> list[str]:
    """TensorRT for RTX's target list (``SM80``…) as asked; [] for its own default (a portable set — listing every
    capability by hand fails for fp32 graphs: SM75 has no fp32 GEMM) and for TensorRT proper (it builds for the GPU
    it runs on)."""
    if trt.flavour != "tensorrt-rtx":
        if names:
            raise UsageError("--compute-capability is a TensorRT for RTX option; TensorRT builds for the GPU it runs on")
        return []
    known = [name for name in trt.module.ComputeCapability.__members__ if name.startswith("SM")]
    if not names:
        return []
    unknown = [name for name in names if name.upper() not in known]
    if unknown:
        raise UsageError(f"--compute-capability {unknown[0]!r}: TensorRT for RTX {trt.version} targets {', '.join(known)}")
    return [name.upper() for name in names]


def optimization_profile(graph_spec, dynamic_dims: dict[str, list[int]]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """input name → (min, opt, max) shapes: each symbolic dimension's range from ``dynamic_dims``."""
    shapes = {}
    for tensor in graph_spec.inputs:
        bounds = []
        for dim in tensor.shape:
            if isinstance(dim, int):
                bounds.append((dim, dim, dim))
            elif dim in dynamic_dims:
                bounds.append(tuple(dynamic_dims[dim]))
            else:
                raise UsageError(f"input {tensor.name!r}: dimension {dim!r} has no range in the manifest's dynamic_dims "
                                 "(rebuild the engines folder with this version)")
        shapes[tensor.name] = tuple([b[i] for b in bounds] for i in range(3))
    return shapes


class ErrorLogger:
    """A TensorRT logger that keeps errors (for the one-line message) and drops the rest."""

    def __new__(cls, trt: TensorRT):
        module = trt.module

        class Logger(module.ILogger):
            def __init__(self):
                module.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, message):
                if severity <= module.ILogger.Severity.ERROR:
                    self.errors.append(str(message))

        return Logger()


def parser_errors(parser) -> str:
    """The parser's first error as one line: node, op, message."""
    if parser.num_errors == 0:
        return "the ONNX parser refused the graph without saying why"
    error = parser.get_error(0)
    node = error.node_name() or f"#{error.node()}"
    return f"node {node} ({error.node_operator() or 'op unknown'}): {str(error.desc()).strip().splitlines()[0]}"


def build_plan(trt: TensorRT, onnx_path: Path, profile: dict, workspace_bytes: int | None,
               capabilities: list[str], graph: str = "") -> tuple[bytes, float]:
    """A serialized plan for one ONNX graph (``graph`` names it in errors) and how long the build took (seconds)."""
    graph = graph or onnx_path.name
    module = trt.module
    logger = ErrorLogger(trt)
    builder = module.Builder(logger)
    flags = 0
    if trt.flavour == "tensorrt" and hasattr(module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # precision from the graph's types
    network = builder.create_network(flags)
    parser = module.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BackendError(f"TensorRT cannot parse graph {graph}: {parser_errors(parser)}")
    config = builder.create_builder_config()
    if hasattr(module.BuilderFlag, "TF32"):  # on by default: fp32 graphs would multiply in TF32 (10-bit mantissa)
        config.clear_flag(module.BuilderFlag.TF32)  # and parity judges fp32 plans against fp32 noise
    if workspace_bytes:
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, workspace_bytes)
    if capabilities:
        config.num_compute_capabilities = len(capabilities)
        for index, name in enumerate(capabilities):
            config.set_compute_capability(getattr(module.ComputeCapability, name), index)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None:
        why = logger.errors[-1].splitlines()[0] if logger.errors else "no message"
        raise BackendError(f"TensorRT could not build graph {graph}: {why}")
    return bytes(plan), seconds


def build_engines(folder: str | Path, capability_names: list[str] | None = None, workspace_mib: int | None = None,
                  say=lambda message: None) -> dict[str, dict[str, Any]]:
    """A plan per graph of the engines ``folder`` (``<graph>.plan``), recorded in its manifest (``plans``,
    ``backend: trt``). All or nothing: a graph TensorRT refuses leaves no plan behind and the manifest as it was."""
    from runtime.manifest import Manifest

    if workspace_mib is not None and workspace_mib < 1:
        raise UsageError(f"--workspace-mib must be at least 1, got {workspace_mib}")
    manifest = Manifest.load(folder)
    if manifest.dynamic_dims is None:
        raise UsageError(f"{folder}: the manifest has no dynamic_dims (the shape ranges TensorRT's profiles need); "
                         "rebuild the engines folder with this version's export/build.py")
    trt = tensorrt_module()
    capabilities = compute_capabilities(trt, capability_names)
    root = Path(manifest.root)
    written: list[Path] = []
    records: dict[str, dict[str, Any]] = {}
    try:
        for index, (graph, spec) in enumerate(manifest.graphs.items(), 1):
            profile = optimization_profile(spec, manifest.dynamic_dims)
            plan, seconds = build_plan(trt, manifest.graph_path(graph), profile,
                                       workspace_mib << 20 if workspace_mib else None, capabilities, graph)
            path = root / f"{graph}.plan"
            written.append(path)
            temporary = root / f".{graph}.plan.partial"
            written.append(temporary)
            temporary.write_bytes(plan)
            temporary.replace(path)
            records[graph] = {"file": path.name, "tensorrt": trt.flavour, "version": trt.version,
                              "compute_capabilities": capabilities, "gpu": None, "tf32": False,
                              "profile": {name: [list(shape) for shape in shapes] for name, shapes in profile.items()},
                              "build_seconds": round(seconds, 3), "size_bytes": len(plan)}
            say(f"[{index}/{len(manifest.graphs)}] {graph}: {len(plan) / 1e6:.1f} MB plan in {seconds:.1f} s")
        manifest.plans = records
        manifest.backend = "trt"
        manifest.write(root)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return records


def _shape_flag(profile: dict, which: int, sep: str, fmt) -> str:
    return sep.join(f"{name}:{fmt(shapes[which])}" for name, shapes in profile.items())


def hand_commands(manifest) -> list[str]:
    """For people who build by hand: per graph, the ``trtexec`` (TensorRT; ``tensorrt_rtx`` takes the same shape
    flags) and ``polygraphy run --trt --onnxrt`` command lines with the manifest's profile shapes."""
    lines = []
    for graph, spec in manifest.graphs.items():
        profile = optimization_profile(spec, manifest.dynamic_dims or {})
        dims = lambda shape: "x".join(map(str, shape))  # noqa: E731
        lists = lambda shape: "[" + ",".join(map(str, shape)) + "]"  # noqa: E731
        lines.append(f"# {graph}")
        lines.append(f"trtexec --onnx={spec.file} --saveEngine={graph}.plan --stronglyTyped "
                     + " ".join(f"--{kind}Shapes={_shape_flag(profile, i, ',', dims)}"
                                for i, kind in enumerate(("min", "opt", "max"))))
        lines.append(f"polygraphy run {spec.file} --trt --onnxrt --strongly-typed "
                     + " ".join(f"--trt-{kind}-shapes {_shape_flag(profile, i, ' ', lists)}"
                                for i, kind in enumerate(("min", "opt", "max")))
                     + " --input-shapes " + _shape_flag(profile, 1, " ", lists))
    return lines
