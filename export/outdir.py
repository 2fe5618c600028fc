"""The output folder of a build: refuse what is not ours, stage beside it, publish atomically, clean up after kills.

A build is assembled in a hidden sibling, ``.<name>.vtprune-staging-<pid>-<random>``, and published in one step:

- ``--out`` absent: the staging folder is renamed to it (one ``rename``);
- ``--out`` present: the two folders are swapped with ``renameat2(RENAME_EXCHANGE)`` (Linux; one atomic system
  call), then the old build — now at the staging name — is deleted. Where the exchange is unavailable (another OS,
  a file system without it), the old folder is renamed aside to ``.<name>.vtprune-old-<pid>-<random>``, the new one
  renamed in, and the old one deleted; a build killed between those two renames leaves the old build aside, and the
  next build (or :func:`recover`) renames it back.

So at any instant ``--out`` holds either the complete old build or the complete new one. Hidden folders whose
process is gone (killed builds) are removed by the next build into the same parent.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from runtime.errors import UsageError
from runtime.files import current_umask
from runtime.contract import MANIFEST_NAME, SCHEMA_NAME

# Files this project's tools write into an engines folder beside those its manifest lists.
TOOL_FILES = frozenset({MANIFEST_NAME, "parity.json"})
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.vtprune-(?P<kind>staging|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


# ------------------------------------------------------------------------------------------------ checks


def not_ours_reason(folder: Path) -> str | None:
    """None when ``folder`` is an engines folder written by this project — a manifest of its schema, and nothing
    but the files that manifest lists (and the tools' own files); else why not."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return f"it has no {MANIFEST_NAME}"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return f"its {MANIFEST_NAME} is not readable JSON"
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(SCHEMA_NAME):
        return f"its {MANIFEST_NAME} is not a vtprune manifest"
    listed = data.get("files")
    if not isinstance(listed, dict):
        return f"its {MANIFEST_NAME} lists no files"
    allowed = set(listed) | TOOL_FILES
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(name.startswith(relative + "/") for name in allowed):
                return f"it holds a folder its manifest does not list ({relative}/)"
        elif relative not in allowed:
            return f"it holds a file its manifest does not list ({relative})"
    return None


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out(out: Path, model: Path | None, force: bool) -> None:
    """Every check of ``--out`` that can be made before anything is loaded: a usage error (exit 2) otherwise."""
    resolved = out.resolve()
    for ancestor in [resolved, *resolved.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            where = "is a file" if ancestor == resolved else f"is under a file ({ancestor})"
            raise UsageError(f"--out {out} {where}; give a folder path")
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)}
    if model is not None:
        protected.add(Path(model).resolve())
    for folder in protected:
        if _is_within(folder, resolved):
            what = "the checkpoint folder" if model is not None and folder == Path(model).resolve() else str(folder)
            raise UsageError(f"--out {out} would replace a folder holding {what}; choose a folder of its own")
    existing = next(a for a in [resolved, *resolved.parents] if a.exists())
    target = existing if existing != resolved else resolved.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {target} is not writable")
    if resolved.is_dir() and any(resolved.iterdir()) and not force:
        reason = not_ours_reason(resolved)
        if reason is not None:
            raise UsageError(f"--out {out} exists and is not an engines folder written by vtprune ({reason}); "
                             "choose another folder, or pass --force to replace it")


# ------------------------------------------------------------------------------------------------ staging


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> list[str]:
    """Tidy ``out``'s parent after killed builds: restore an old build left aside when ``out`` is missing, delete
    staging and old folders whose process is gone. Returns what was done (for tests and progress)."""
    done: list[str] = []
    parent = out.parent
    if not parent.is_dir():
        return done
    for entry in sorted(parent.iterdir()):
        match = _HIDDEN.match(entry.name)
        if not match or match["name"] != out.name or not entry.is_dir() or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not out.exists():
            entry.rename(out)
            done.append(f"restored {out} from {entry.name}")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry.name}")
    return done


def make_staging(out: Path) -> Path:
    """A new hidden folder beside ``out``, with the permissions the user's umask gives a new folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.vtprune-staging-{os.getpid()}-", dir=out.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create a folder in {out.parent}: {err.strerror or err}") from None
    return staging


# ------------------------------------------------------------------------------------------------ publish


def _rename_exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def publish(staging: Path, out: Path) -> None:
    """Make the complete build in ``staging`` the one at ``out``; at no instant is ``out`` incomplete."""
    if not out.exists() and not out.is_symlink():
        staging.rename(out)
        return
    if _rename_exchange(staging, out):
        shutil.rmtree(staging)  # the old build, now at the staging name
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.vtprune-old-{os.getpid()}-", dir=out.parent))
    aside.rmdir()
    out.rename(aside)
    staging.rename(out)
    shutil.rmtree(aside)
