"""Parity's report: where it goes (``ENGINES/parity.json`` unless ``--out``), how it is written (atomically, numpy
values as JSON numbers) and the one line per stage the CLI prints on stderr. Shared by the full run
(``runtime/parity/stages.py``) and the torch-free replay (``runtime/parity/replay.py``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UsageError
from runtime.files import write_atomically
from runtime.parity.compare import worst_exceedance


def check_report_path(out_json: str | Path | None, engines: str | Path) -> Path:
    """The report's path (default ``ENGINES/parity.json``), refused now when it names a folder."""
    out_path = Path(out_json) if out_json else Path(engines) / "parity.json"
    if out_path.is_dir():
        raise UsageError(f"--out {out_path} is a folder; give the report's file name")
    return out_path


def json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_report(out_path: Path, report: dict[str, Any]) -> None:
    try:
        write_atomically(out_path, json.dumps(report, indent=2, default=json_default) + "\n")
    except OSError as err:
        raise UsageError(f"cannot write the parity report {out_path}: {err.strerror or err}") from None


def stage_note(stage: dict) -> str:
    """``  (near_ties=1, error/bound=0.12)``: what a stage's summary line adds to ok/FAILED."""
    notes = []
    for key in ("near_ties", "mismatches"):
        if stage.get(key):
            notes.append(f"{key}={stage[key]}")
    worst = worst_exceedance(stage)
    if worst is not None:
        notes.append(f"error/bound={worst:.3g}")
    if stage.get("applicable") is False:
        notes.append("n/a")
    return f"  ({', '.join(notes)})" if notes else ""


def show_summary(stages: dict[str, Any], passed: bool, out_path: Path) -> None:
    """One stderr line per stage, then the verdict and the report's path."""
    for name, stage in stages.items():
        print(f"parity: {name:<11} {'ok' if stage['passed'] else 'FAILED'}{stage_note(stage)}", file=sys.stderr)
    print(f"parity: {'PASSED' if passed else 'FAILED'} -> {out_path}", file=sys.stderr)
