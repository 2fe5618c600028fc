"""Prompt formatting and tokenisation with ``tokenizers`` alone (no transformers).

At build time the exporter probes the HF tokenizer and records in the manifest which special ids it adds around
a text, so the runtime reproduces HF's ids exactly (tests and parity check that).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from runtime.errors import UsageError


def check_text(text: object, what: str) -> str:
    """``text`` as a question or template must be a string of real Unicode characters (no lone surrogates, as
    undecodable bytes on a command line or ``\\ud800`` in JSON give)."""
    if not isinstance(text, str):
        raise UsageError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"{what} is not valid Unicode text (a lone surrogate at character {err.start}; "
                         "undecodable bytes?)") from None
    return text


def format_prompt(template: str, question: str) -> str:
    check_text(template, "the prompt template")
    check_text(question, "the question")
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

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for each text, one tokenizer call each: ``encode_batch`` hands a batch to the tokenizers crate's
        thread pool, whose wake-up cost more than the encoding itself in a request (measured in place: README
        "Speed")."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
