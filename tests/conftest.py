"""Shared fixtures: tiny BLIP-2 checkpoints and engines built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# the CLIs that tests start import this checkout too, whichever checkout the package is installed from
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(script: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run one of the repo's CLIs as a user would: ``python export/build.py ...``."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory) -> Path:
    from export.tiny import make_tiny_blip2

    return make_tiny_blip2(tmp_path_factory.mktemp("models") / "tiny-blip2")


@pytest.fixture(scope="session")
def engines_factory(tiny_blip2, tmp_path_factory):
    """Build engines for a configuration once per session (library call, as build.py does)."""
    from export.builder import BuildOptions, build
    from export.pruning import PruningConfig

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("engines")

    def make(model: Path | None = None, positions: str = "original", precision: str = "fp32", **pruning) -> Path:
        model = model or tiny_blip2
        key = (str(model), positions, precision, tuple(sorted(pruning.items())))
        if key not in cache:
            out = root / f"e{len(cache)}"
            options = BuildOptions(model=model, out=out, pruning=PruningConfig(**pruning), positions=positions, precision=precision)
            cache[key] = build(options, root, quiet=True)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def engines(engines_factory) -> Path:
    """The default configuration: CATP, ratio 0.5, first-layer weights, original positions, fp32."""
    return engines_factory(ratio=0.5)
