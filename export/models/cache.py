"""Names of the exported language models' key/value cache tensors, one pair per layer.

A prefill returns ``present.{i}.key|value``; a decode step takes ``past.{i}.key|value`` and returns the next
``present.*`` (the runtime feeds one step's ``present.*`` back as the next step's ``past.*``); Mllama's trimmed
cross-attention keys/values are ``cross.{i}.key|value``. ``i`` is the decoder layer's index in the model.
"""
from __future__ import annotations

from typing import Iterable


def cache_names(layers: Iterable[int], prefix: str) -> list[str]:
    """``past.0.key, past.0.value, past.1.key, …`` for ``layers`` (0, 1, …), with ``prefix`` past/present/cross."""
    return [f"{prefix}.{i}.{part}" for i in layers for part in ("key", "value")]
