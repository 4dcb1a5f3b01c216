#!/usr/bin/env bash
# Every GPU check in one call, for the few minutes a GPU machine is lent:
#
#   bash tools/gpu_suite.sh OUTDIR
#
# On a machine with an NVIDIA GPU and a CUDA build of torch (offline): build for this GPU's own
# architecture only, run the CUDA tests, compute-sanitizer memcheck on a small exact subset (noted
# and skipped where the sanitizer is missing or cannot attach), the kernel benchmark on every
# CodeGen shape at M = 1..512 beside cuBLAS fp16 and torch's int4pack_mm, the decode-attention
# benchmark (fp16 and int8 KV beside torch's SDPA), and one table of every
# target with pass/fail (tools/gpu_targets.py). Everything measured lands under OUTDIR; the exit
# status is non-zero when a test fails (a missed speed target is reported, not an error).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash tools/gpu_suite.sh OUTDIR}"
mkdir -p "$out"
py="${PYTHON:-python3}"
log() { echo "== $* ($(date +%H:%M:%S))" | tee -a "$out/suite.log"; }

log "device"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite: torch sees no CUDA device; install a CUDA build of torch first" | tee -a "$out/suite.log" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$out/nvidia-smi.csv"
arch=$("$py" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")

log "build for sm_$arch"
build_args=(-Ccmake.define.CODEGEN_Q_CUDA=ON "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$arch")
# The tests know the build is for this architecture only (test_cuda_build.py checks the default list
# otherwise).
export CGQ_CUDA_ARCHS="$arch"
if "$py" -c "import scikit_build_core, pybind11" 2>/dev/null; then
  build_args+=(--no-build-isolation --no-deps)
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
if ! "$py" -m pip install --quiet "${build_args[@]}" -e . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  exit 1
fi
"$py" -m codegen_q.cli.main backends | tee "$out/backends.json"

status=0
log "CUDA tests"
"$py" -m pytest -q -rs tests/test_cuda_ops.py tests/test_cuda_attention.py tests/test_cuda_build.py tests/test_half_bound.py \
  tests/test_runtime.py::test_cuda_runtime_matches_cpu tests/test_runtime.py::test_cuda_runtime_with_fp16_activations \
  tests/test_runtime.py::test_cuda_runtime_with_int8_kv \
  tests/test_runtime.py::test_cuda_engine_chunked_prefill_gives_the_whole_prompts_tokens \
  2>&1 | tee "$out/pytest-cuda.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "compute-sanitizer memcheck (exact problems, graph capture, streams)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$py" -m pytest -q -x tests/test_cuda_ops.py tests/test_cuda_attention.py \
    -k "exact or capturable or current_stream or int8_cache or bad_block" \
    >"$out/memcheck.log" 2>&1
  rc=$?
  tail -n 5 "$out/memcheck.log"
  case $rc in
    0) echo "memcheck: clean" ;;
    124) echo "memcheck: timed out after 300 s (not judged)" ;;
    3) echo "memcheck: ERRORS, see memcheck.log"; status=1 ;;
    *) echo "memcheck: exit $rc (the sanitizer may not attach here; see memcheck.log)" ;;
  esac
else
  echo "memcheck: compute-sanitizer is not on PATH; skipped" | tee "$out/memcheck.log"
fi

log "kernel benchmark"
"$py" tools/bench_kernels_cuda.py --json "$out/bench-kernels-cuda.json" 2>&1 | tee "$out/bench-kernels-cuda.txt" \
  | tail -n 70
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "attention benchmark"
"$py" tools/bench_attention_cuda.py --json "$out/bench-attention-cuda.json" 2>&1 | tee "$out/bench-attention-cuda.txt" \
  | tail -n 25

log "targets"
if [ -f "$out/bench-kernels-cuda.json" ]; then
  "$py" tools/gpu_targets.py "$out/bench-kernels-cuda.json" --json "$out/targets.json" | tee "$out/targets.txt"
fi
log "done (status $status)"
exit $status
