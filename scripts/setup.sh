#!/usr/bin/env bash
# Create .venv and install g3export into it. `setup.sh dev` adds the test dependencies
# (transformers as the parity reference, pytest, Triton for the kernel interpreter tests) and
# TensorRT-RTX, whose ONNX parser and CPU-only builder check our TensorRT graphs.
#
# torch goes first and pinned: `pip install torch==2.13.0` takes the CPU wheel (from local disk on
# our machines); a requirement that let pip choose a newer torch would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev,trt-rtx]"
  # the tritonserver binary for tests/serve; --no-deps: its Python API (unused here) pins numpy<2
  .venv/bin/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
  # numpy 1.x for Triton 2.51's Python backend stub (see g3export/serving/server.py: stub_numpy_dir)
  .venv/bin/python -m pip install -q --no-deps --target .venv/g3export-stub-numpy1 \
    "numpy>=1.26,<2" "ml_dtypes>=0.5,<0.6"
else
  .venv/bin/python -m pip install -q -e .
fi
