"""What the process holds and what the machine has left: the figures builds, parity and the bench report, and the
checks that decide whether a float64 copy or a checkpoint fits. Linux ``/proc``; elsewhere ``ru_maxrss`` / None."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` (Linux), which starts afresh at ``exec`` — unlike
    ``ru_maxrss``, which keeps the forking parent's high-water mark across it. Elsewhere ``ru_maxrss`` (KiB on Linux,
    bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(usage) if sys.platform == "darwin" else int(usage) * 1024


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` of /proc/meminfo), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gib(nbytes: int | float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
