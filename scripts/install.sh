#!/usr/bin/env bash
# Install the project for export + ONNX Runtime (CPU) + TensorRT for RTX (builds plans without a GPU) + the
# evaluation + Triton serving + tests.
# torch goes first, pinned: with torch==2.13.0 present, nothing pulls the CUDA build from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[export,cpu,trt-rtx,eval,serve,dev]"
# tritonserver (Python backend) bundled in nvidia-pytriton; --no-deps: its numpy<2 pin is for its own Python API,
# which this project does not use (pyproject.toml, extra "serve")
python -m pip install --quiet --disable-pip-version-check --no-deps nvidia-pytriton==0.7.0
