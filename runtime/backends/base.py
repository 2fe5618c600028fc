"""The contract every backend implements (``Runner``) and the registry that names them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from runtime.manifest import Manifest


class Runner(Protocol):
    """Runs one graph: a dict of numpy feeds in, a dict of numpy outputs out, named as in the manifest. Every
    backend has it; it is what parity's recorders and the PyTorch reference wrap. ``run`` must not keep the feed
    arrays after it returns (the KV cache passes its live buffers, written in place afterwards)."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class BindingRunner(Runner, Protocol):
    """A runner that can also bind buffers once and run many times over them (ONNX Runtime's IO binding; TensorRT's
    tensor addresses): ``bind(inputs, outputs)`` returns a call that reads the inputs' current contents and writes
    the outputs in place. Buffers are whatever the backend's device holds — C-contiguous numpy arrays for the CPU;
    device allocations for a GPU backend. ``output_shapes`` gives each output's (shape with symbolic dims, dtype), so
    that callers can allocate the output buffers. The decode loop uses it when the pipeline's ``io_binding`` is on
    (``runtime/pipelines/decoding.py``) and falls back to ``run`` for runners without it."""

    output_shapes: dict[str, tuple[list, type]]

    def bind(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> Callable[[], None]: ...


@dataclass(frozen=True)
class Backend:
    """A named way to run graphs: ``check()`` says (one line, raising) whether this machine can; ``load(manifest,
    graph)`` makes a runner for one of the manifest's graphs."""

    name: str
    load: Callable[[Manifest, str], Runner]
    check: Callable[[], None]


BACKENDS: dict[str, Backend] = {}


def register(name: str, check: Callable[[], None]):
    """Decorator over a backend's loader: ``@register("ort-cpu", check=...)``."""

    def wrap(load: Callable[[Manifest, str], Runner]) -> Callable[[Manifest, str], Runner]:
        BACKENDS[name] = Backend(name, load, check)
        return load

    return wrap
