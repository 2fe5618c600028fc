"""Prompt formatting and tokenisation with ``tokenizers`` alone (no transformers).

At build time the exporter probes the HF tokenizer and records in the manifest which special ids it adds around
a text, so the runtime reproduces HF's ids exactly (tests and ``parity.py`` check that).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from runtime.errors import UsageError


def format_prompt(template: str, question: str) -> str:
    if "{}" not in template:
        raise UsageError(f"--prompt-template must contain '{{}}' where the question goes, got {template!r}")
    return template.replace("{}", question, 1)


class TextCodec:
    """Encode prompts to ids and decode generated ids, as the checkpoint's HF tokenizer does."""

    def __init__(self, tokenizer_file: str | Path, settings: dict[str, Any]):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.settings = settings
        self.prefix_ids: list[int] = list(settings.get("prefix_ids", []))
        self.suffix_ids: list[int] = list(settings.get("suffix_ids", []))
        self.eos_token_ids: list[int] = list(settings["eos_token_ids"])
        self.pad_token_id: int = int(settings["pad_token_id"])

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.prefix_ids + ids + self.suffix_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
