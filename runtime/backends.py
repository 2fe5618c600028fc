"""Backends that run one graph: a ``Runner`` maps a dict of numpy feeds to a dict of numpy outputs.

Optional dependencies are imported lazily (Polygraphy style): ``import runtime.backends`` needs neither
onnxruntime nor tensorrt. Backends are registered by name; ``auto`` picks the best one present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from runtime.errors import BackendError, UnsupportedError, UsageError
from runtime.manifest import Manifest


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UnsupportedError(
            "onnxruntime is not installed: pip install '.[cpu]' (or '.[gpu]' for onnxruntime-gpu, never both)"
        ) from None
    return onnxruntime


class OrtRunner:
    """One ONNX Runtime session."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # ORT raises its own exception types; keep the message, drop the trace
            raise BackendError(f"onnxruntime could not load {path.name}: {str(err).splitlines()[0]}") from None
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: feeds[name] for name in self.input_names}
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as err:
            raise BackendError(f"onnxruntime failed on {self.path.name}: {str(err).splitlines()[0]}") from None
        return dict(zip(self.output_names, outputs))


def _ort_cpu(manifest: Manifest, graph: str) -> Runner:
    return OrtRunner(manifest.graph_path(graph), ["CPUExecutionProvider"])


def _require_cuda_provider() -> None:
    if "CUDAExecutionProvider" not in _onnxruntime().get_available_providers():
        raise UnsupportedError(
            "backend ort-cuda: this onnxruntime has no CUDAExecutionProvider (install '.[gpu]' in an environment "
            "without the CPU 'onnxruntime' package)"
        )


def _ort_cuda(manifest: Manifest, graph: str) -> Runner:
    _require_cuda_provider()
    return OrtRunner(manifest.graph_path(graph), ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _require_trt() -> None:
    raise UnsupportedError("backend trt: TensorRT engines are not built by this version yet (use ort-cpu or ort-cuda)")


def _trt(manifest: Manifest, graph: str) -> Runner:
    _require_trt()
    raise AssertionError("unreachable")


BACKENDS: dict[str, Callable[[Manifest, str], Runner]] = {
    "ort-cpu": _ort_cpu,
    "ort-cuda": _ort_cuda,
    "trt": _trt,
}


# what a backend needs from this machine, checked before any input is read
REQUIREMENTS: dict[str, Callable[[], None]] = {"ort-cpu": lambda: None, "ort-cuda": _require_cuda_provider, "trt": _require_trt}


def resolve_backend(name: str) -> str:
    """``auto`` → ``ort-cuda`` when the CUDA provider exists, else ``ort-cpu``; a named backend this machine cannot
    run is one line now, not after the inputs were read."""
    if name == "auto":
        providers = _onnxruntime().get_available_providers()
        return "ort-cuda" if "CUDAExecutionProvider" in providers else "ort-cpu"
    if name not in BACKENDS:
        raise UsageError(f"unknown --backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    REQUIREMENTS[name]()
    return name


def load_runners(manifest: Manifest, backend: str) -> dict[str, Runner]:
    """One runner per graph of the manifest."""
    backend = resolve_backend(backend)
    return {graph: BACKENDS[backend](manifest, graph) for graph in manifest.graphs}

