#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build with CUDA forced on, print what the build
# sees, run the CUDA test suite (CUDA kernels against their CPU twins) and the kernel benchmark.
# Usage: bash tools/gpu_check.sh   (from the repository root, inside the project's venv or not)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet torch==2.13.0 2>/dev/null || true   # keep a CUDA torch if one is there
python -m pip install --quiet -Ccmake.define.CODEGEN_Q_CUDA=ON -e ".[test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
codegen-q backends
python -m pytest -q tests/test_cuda_ops.py -rs
python tools/bench_kernels.py --json "${OUT:-.}/bench-kernels-gpu-host.json"
