"""Typed, user-facing errors. A CLI turns any of them into one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class VtpruneError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class UsageError(VtpruneError):
    """A bad flag or flag combination."""


class CheckpointError(VtpruneError):
    """The model folder is missing, of another architecture, or incomplete (no processor)."""


class UnsupportedError(VtpruneError):
    """A feature that exists in the CLI but is not available here (no TensorRT, no CUDA provider ...)."""


class ManifestError(VtpruneError):
    """The engines folder does not match its manifest (missing file, sha256 mismatch, unknown schema)."""


class BackendError(VtpruneError):
    """A backend could not load or run a graph."""

    exit_code = 1


class ExportError(VtpruneError):
    """Tracing or checking a graph failed for a reason the flags did not predict (the traceback goes to a log)."""

    exit_code = 1


class ParityError(VtpruneError):
    """Parity failed: a stage differs from the PyTorch reference beyond tolerance."""

    exit_code = 1


@contextmanager
def cli_errors(prog: str):
    """Turn ``VtpruneError`` into one clear line and ``SystemExit(exit_code)``; never a traceback."""
    try:
        yield
    except VtpruneError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
