"""Backends that run one graph each, registered by name (one module per backend: ``ort``, ``trt``).

Optional dependencies are imported lazily (Polygraphy style): ``import runtime.backends`` needs neither
onnxruntime nor tensorrt. ``auto`` picks the best backend this machine has.
"""
from __future__ import annotations

from runtime.backends import ort, trt  # noqa: F401  (each registers its backends)
from runtime.backends.base import BACKENDS, Backend, Runner
from runtime.errors import UsageError
from runtime.manifest import Manifest

__all__ = ["BACKENDS", "Backend", "Runner", "load_runners", "resolve_backend"]


def resolve_backend(name: str, manifest: Manifest | None = None) -> str:
    """``auto`` → ``trt`` when the manifest has plans and a GPU is usable, else ``ort-cuda`` when the CUDA provider
    exists, else ``ort-cpu``; a named backend this machine cannot run is one line now, not after the inputs were
    read."""
    if name == "auto":
        if manifest is not None and trt.has_plans_and_gpu(manifest):
            return "trt"
        return "ort-cuda" if ort.has_cuda_provider() else "ort-cpu"
    if name not in BACKENDS:
        raise UsageError(f"unknown --backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    BACKENDS[name].check()
    return name


def load_runners(manifest: Manifest, backend: str, settings=None) -> dict[str, Runner]:
    """One runner per graph of the manifest. ``settings``: the backend's own (``OrtSettings`` for ``ort-*``);
    None: its defaults."""
    backend = resolve_backend(backend, manifest)
    extra = () if settings is None else (settings,)
    return {graph: BACKENDS[backend].load(manifest, graph, *extra) for graph in manifest.graphs}
