"""Typed, user-facing errors. A CLI turns any of them into one line on stderr and a non-zero exit.

Exit codes of every CLI: 0 done; 1 a check failed (parity), or a failure the flags did not predict (export, a
backend, writing the output); 2 a usage or input error (bad flag, file, manifest, image, question); 130
interrupted; 141 standard output closed early (``| head``), as a program killed by SIGPIPE.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
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


class OutputError(VtpruneError):
    """Standard output could not be written (a full disk, a closed descriptor)."""

    exit_code = 1


EXIT_BROKEN_PIPE = 141


def emit(line: str) -> None:
    """Print one line of a CLI's result; a stdout that cannot take it is an ``OutputError`` (a closed pipe is
    ``BrokenPipeError``, which ``cli_errors`` turns into a quiet exit 141)."""
    if sys.stdout is None:
        raise OutputError("standard output is closed")
    try:
        sys.stdout.write(line + "\n")
    except BrokenPipeError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write to standard output: {err.strerror or err}") from None


def _flush_stdout() -> None:
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write to standard output: {err.strerror or err}") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's own flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``, ``\\x1b``): a message that quotes a
    user's file name or question stays one line and cannot drive the terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, AttributeError, ValueError):
        pass


def explain_unexpected(err: BaseException, what: str) -> str:
    """One line for a failure nobody predicted, the traceback saved to a log file it names."""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="vtprune-", suffix=".log", delete=False) as log:
            traceback.print_exception(type(err), err, err.__traceback__, file=log)
        where = f"; full traceback in {log.name}"
    except OSError:
        where = ""
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{what} ({type(err).__name__}: {first_line}){where}"


@contextmanager
def cli_errors(prog: str):
    """Turn ``VtpruneError`` into one clear line and ``SystemExit(exit_code)``; anything unexpected into one line
    naming a log file with the traceback (exit 1); never a traceback on the terminal."""
    try:
        yield
        _flush_stdout()
    except VtpruneError as err:
        _say(f"{prog}: error: {one_line(str(err))}")
        raise SystemExit(err.exit_code) from None
    except BrokenPipeError:
        _silence_stdout()
        raise SystemExit(EXIT_BROKEN_PIPE) from None
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - the safety net: one line, the details in a log
        _say(f"{prog}: error: {one_line(explain_unexpected(err, 'unexpected failure'))}")
        raise SystemExit(1) from None
