"""The pruned inference pipelines: image + question → answer, over any set of runners (ONNX Runtime, TensorRT, or
the PyTorch reference that parity plugs in). One module per model family, each registering its pipeline class
by family name (``@register``, as ``export/adapters`` does); the manifest's ``family`` picks one.
"""
from __future__ import annotations

from runtime.backends.base import Runner
from runtime.errors import UsageError
from runtime.manifest import Manifest
from runtime.pipelines import blip2, mllama  # noqa: F401  (each registers its pipeline)
from runtime.pipelines.base import PIPELINES, Answer, BatchedPipeline, slice_pixels

__all__ = ["Answer", "BatchedPipeline", "PIPELINES", "make_pipeline", "slice_pixels"]


def make_pipeline(manifest: Manifest, runners: dict[str, Runner], prompt_template: str | None = None) -> BatchedPipeline:
    """The registered pipeline for the manifest's model family, over one runner per graph."""
    if manifest.family not in PIPELINES:
        raise UsageError(f"this runtime has no pipeline for model family {manifest.family!r} (known: {', '.join(PIPELINES)})")
    return PIPELINES[manifest.family](manifest, runners, prompt_template)
