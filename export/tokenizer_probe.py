"""Find which special ids a Hugging Face tokenizer adds around a text, so the torch-free runtime can add the same.

The runtime encodes with ``tokenizers`` (``add_special_tokens=False``) and adds ``prefix_ids``/``suffix_ids``
itself; that is exact whether HF adds BOS/EOS in its ``tokenizer.json`` post-processor or in Python.
"""
from __future__ import annotations

from runtime.errors import CheckpointError

PROBES = ("Question: what is in the image? Answer:", "a", "Hello, world! 42 + 7 = 49.", "  two  spaces ")


def special_ids_around_text(tokenizer) -> tuple[list[int], list[int]]:
    backend = tokenizer.backend_tokenizer
    prefix = suffix = None
    for text in PROBES:
        full = list(tokenizer(text).input_ids)
        core = backend.encode(text, add_special_tokens=False).ids
        start = _find(full, core)
        if start is None:
            raise CheckpointError(f"the tokenizer's ids for {text!r} cannot be reproduced from tokenizer.json")
        this_prefix, this_suffix = full[:start], full[start + len(core) :]
        if prefix is None:
            prefix, suffix = this_prefix, this_suffix
        elif (prefix, suffix) != (this_prefix, this_suffix):
            raise CheckpointError("the tokenizer adds different special tokens to different texts; not supported")
    return list(prefix or []), list(suffix or [])


def _find(haystack: list[int], needle: list[int]) -> int | None:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return None
