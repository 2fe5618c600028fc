"""Model adapters, one declarative class per model family, registered by name (optimum-exporters style).

The registry lives in ``export/adapters/registry.py``; this package re-exports its names and imports every
adapter module, so that ``from export import adapters; adapters.detect(path)`` sees every family.
"""
from __future__ import annotations

from export.adapters import blip2, mllama  # each registers itself on import
from export.adapters.registry import ADAPTERS, by_architecture, detect, get, load, read_config, register

__all__ = ["blip2", "mllama", "ADAPTERS", "by_architecture", "detect", "get", "load", "read_config", "register"]
