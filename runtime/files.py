"""Small file helpers shared by the CLIs and the manifest: JSON parsed into one-line errors, the umask, writes that
are never half done."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

from runtime.errors import VtpruneError


def parse_json(text: str, where: str, error: type[VtpruneError]) -> Any:
    """``json.loads(text)``; invalid or absurdly nested JSON is one ``error`` line starting with ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise error(f"{where} is not valid here: JSON nested too deeply") from None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def writing_atomically(path: Path) -> Iterator[TextIO]:
    """A text stream whose contents replace ``path`` through a temporary sibling and a rename once the block ends:
    never a half-written file (an exception leaves ``path`` as it was); the file gets the permissions the user's
    umask gives a new file. For large files written piece by piece."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            yield stream
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary sibling and a rename: never a half-written file; the file gets
    the permissions the user's umask gives a new file."""
    with writing_atomically(path) as stream:
        stream.write(text)
