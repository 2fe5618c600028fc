#!/usr/bin/env python
"""Randomly initialised checkpoints with the real widths of BLIP-2 OPT-2.7B or LLaMA-3.2-11B-Vision and reduced
depth — the builder lives in the package (``export/presets.py``); this is the script users run.

    python scripts/make_preset.py --help
"""
from __future__ import annotations

import sys

from export.presets import main

if __name__ == "__main__":
    sys.exit(main())
