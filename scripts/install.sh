#!/usr/bin/env bash
# Install the project for export + ONNX Runtime (CPU) + TensorRT for RTX (builds plans without a GPU) + the
# evaluation + tests.
# torch goes first, pinned: with torch==2.13.0 present, nothing pulls the CUDA build from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[export,cpu,trt-rtx,eval,dev]"
