"""The contract every backend implements (``Runner``) and the registry that names them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from runtime.manifest import Manifest


class Runner(Protocol):
    """Runs one graph: a dict of numpy feeds in, a dict of numpy outputs out, named as in the manifest."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


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
