"""Model adapters, one declarative class per model family, registered by name (optimum-exporters style).

``detect(path)`` reads ``config.json`` and looks the architecture up in the registry: a dictionary lookup,
never an if/elif chain on model-type strings.
"""
from __future__ import annotations

import json
from pathlib import Path

from export.adapters.base import ModelAdapter
from runtime.errors import CheckpointError

ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    ADAPTERS[adapter.name] = adapter
    return adapter


def by_architecture() -> dict[str, type[ModelAdapter]]:
    return {arch: adapter for adapter in ADAPTERS.values() for arch in adapter.architectures}


def read_config(path: Path) -> dict:
    config_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint folder (save_pretrained)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None


def detect(path: str | Path) -> type[ModelAdapter]:
    """The adapter for the checkpoint at ``path``, from its ``architectures`` field."""
    config = read_config(Path(path))
    known = by_architecture()
    architectures = config.get("architectures") or []
    for arch in architectures:
        if arch in known:
            return known[arch]
    found = ", ".join(architectures) or f"model_type={config.get('model_type')!r}"
    raise CheckpointError(
        f"{path}: unsupported architecture {found}; supported: {', '.join(sorted(known))}"
    )


def get(name: str) -> type[ModelAdapter]:
    if name not in ADAPTERS:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


# Adapters register themselves on import.
from export.adapters import blip2, mllama  # noqa: E402,F401
