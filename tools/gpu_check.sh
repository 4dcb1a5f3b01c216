#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build with CUDA forced on, print what the build
# sees, run the CUDA tests (CUDA kernels against float64 and their CPU twins), the GPU kernel
# benchmark, then the whole test suite.
#
#   bash tools/gpu_check.sh [OUTDIR]     (default OUTDIR: build/gpu-check)
#
# Uses the Python on PATH (or $PYTHON), which must already hold a CUDA build of torch: a CPU torch
# would make every CUDA test skip, so that is an error here. Works offline: when scikit-build-core
# and pybind11 are installed the build uses them (no build isolation, no downloads).
# CGQ_CUDA_ARCHS (e.g. "90") limits the CUDA architectures compiled, for a faster build.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"

"$py" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch first")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true

build_args=(-Ccmake.define.CODEGEN_Q_CUDA=ON)
if [ -n "${CGQ_CUDA_ARCHS:-}" ]; then
  build_args+=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=${CGQ_CUDA_ARCHS}")
fi
if "$py" -c "import scikit_build_core, pybind11" 2>/dev/null; then
  build_args+=(--no-build-isolation --no-deps)
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
start=$(date +%s)
"$py" -m pip install --quiet "${build_args[@]}" -e . 2>&1 | tee "$out/build.log"
echo "build: $(( $(date +%s) - start )) s"
"$py" -m codegen_q.cli.main backends

status=0
"$py" -m pytest -q tests/test_cuda_ops.py tests/test_cuda_build.py -rs 2>&1 | tee "$out/pytest-cuda.log" || status=1
"$py" tools/bench_kernels_cuda.py --json "$out/bench-kernels-cuda.json" 2>&1 | tee "$out/bench-kernels-cuda.txt" \
  || status=1
timeout 240 "$py" -m pytest -q tests 2>&1 | tail -n 40 | tee "$out/pytest-all.log" || status=1
exit $status
