"""TensorRT backend (``trt``): engines are not built by this version yet, so the backend says so in one line."""
from __future__ import annotations

from runtime.backends.base import Runner, register
from runtime.errors import UnsupportedError
from runtime.manifest import Manifest


def require_engines() -> None:
    raise UnsupportedError("backend trt: TensorRT engines are not built by this version yet (use ort-cpu or ort-cuda)")


@register("trt", check=require_engines)
def engine_runner(manifest: Manifest, graph: str) -> Runner:
    require_engines()
    raise UnsupportedError("backend trt: unavailable")
