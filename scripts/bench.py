#!/usr/bin/env python
"""What pruning buys, per stage, against Hugging Face ``generate`` — the bench lives in the package
(``export/bench.py``); this is the script users and the README run, with the same flags, output and exit codes as
``vtprune bench``.

    python scripts/bench.py --help
"""
from __future__ import annotations

import sys

from export.bench import main

if __name__ == "__main__":
    sys.exit(main())
