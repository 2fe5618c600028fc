"""The adapter registry: model families by name, and the checkpoint → adapter lookup.

Adapters register with ``@register`` (``export/adapters/blip2.py``, ``mllama.py``); ``detect(path)`` reads
``config.json`` and looks its ``architectures`` up: a dictionary lookup, never an if/elif chain on model-type
strings. The registry sits in its own module so that the adapters import it without importing the package that
imports them (``export/adapters/__init__.py`` imports every adapter so that they register).
"""
from __future__ import annotations

from pathlib import Path

from export.adapters.base import ModelAdapter
from runtime.errors import CheckpointError, VtpruneError
from runtime.files import parse_json

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
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{config_path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise CheckpointError(f"{config_path} cannot be read: {err.strerror or err}") from None
    config = parse_json(text, str(config_path), CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a model config: expected a JSON object, got {type(config).__name__}")
    return config


def detect(path: str | Path) -> type[ModelAdapter]:
    """The adapter for the checkpoint at ``path``, from its ``architectures`` field."""
    config = read_config(Path(path))
    known = by_architecture()
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError(f"{path}/config.json: \"architectures\" must be a list of class names, got {architectures!r:.80}")
    for arch in architectures:
        if arch in known:
            return known[arch]
    found = ", ".join(architectures) or f"model_type={config.get('model_type')!r}"
    raise CheckpointError(
        f"{path}: unsupported architecture {found}; supported: {', '.join(sorted(known))}"
    )


def load(adapter_cls: type[ModelAdapter], path: Path, precision: str) -> ModelAdapter:
    """``adapter_cls(path, precision)``; a checkpoint that transformers cannot load (a config of the wrong shape,
    damaged weights) is one ``CheckpointError`` line — what fails here is the checkpoint, not the export."""
    try:
        return adapter_cls(path, precision)
    except VtpruneError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path}: the checkpoint does not fit in memory") from None
    except Exception as err:  # noqa: BLE001 - transformers/safetensors raise many types for a bad checkpoint
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot load the checkpoint ({type(err).__name__}: {first})") from None


def get(name: str) -> type[ModelAdapter]:
    if name not in ADAPTERS:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[name]
