"""ONNX Runtime backends: ``ort-cpu`` and ``ort-cuda``. onnxruntime itself is imported on first use."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.backends.base import Runner, register
from runtime.errors import BackendError, UnsupportedError
from runtime.manifest import Manifest


def onnxruntime_module():
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
        ort = onnxruntime_module()
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


def require_onnxruntime() -> None:
    onnxruntime_module()


@register("ort-cpu", check=require_onnxruntime)
def cpu_runner(manifest: Manifest, graph: str) -> Runner:
    return OrtRunner(manifest.graph_path(graph), ["CPUExecutionProvider"])


def has_cuda_provider() -> bool:
    return "CUDAExecutionProvider" in onnxruntime_module().get_available_providers()


def require_cuda_provider() -> None:
    if not has_cuda_provider():
        raise UnsupportedError(
            "backend ort-cuda: this onnxruntime has no CUDAExecutionProvider (install '.[gpu]' in an environment "
            "without the CPU 'onnxruntime' package)"
        )


@register("ort-cuda", check=require_cuda_provider)
def cuda_runner(manifest: Manifest, graph: str) -> Runner:
    require_cuda_provider()
    return OrtRunner(manifest.graph_path(graph), ["CUDAExecutionProvider", "CPUExecutionProvider"])
