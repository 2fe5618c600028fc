#!/usr/bin/env python
"""Accuracy against pruning ratio — the evaluation lives in the package (``export/evaluate.py``); this is the
script users and the README run, with the same flags, output and exit codes as ``vtprune eval``.

    python scripts/eval_vqa.py --help
"""
from __future__ import annotations

import sys

from export.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
