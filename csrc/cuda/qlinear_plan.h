// Which CUDA kernel computes a qlinear call: the one place that decides. Host-only, so the
// bindings export it (codegen_q/kernels/ops.py asks it per call; the tests read its limits) and
// the entry point in qlinear_cuda.cu obeys the same answer.
#pragma once

#include <cstdint>

namespace cgq::cuda {

// The activation (x and y) dtype of a CUDA qlinear call.
enum class ActType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class QLinearKernel : int32_t {
  // qlinear_gemv.cu: small M, every weight byte read once for all rows of x.
  kGemv = 0,
  // qlinear_cuda.cu: one warp per output, any alignment; the obviously-correct version, for what
  // the GEMV's 16-byte loads cannot take (a view of x off a 16-byte boundary, int8 with K % 16).
  kPlain = 1,
  // Many rows (prompts): dequantize the weight tile by tile to the activation's dtype (never to
  // float32 for fp16/bf16 activations) and let the caller's GEMM (torch's cuBLAS) multiply.
  kDequantGemm = 2,
  // qlinear_mma.cu: the tensor-core GEMM (sm_80+, fp16/bf16 x) for the rows between the GEMV's and
  // the point where dequantizing the whole weight once for cuBLAS costs less than its own steps.
  kMma = 3,
};

// Rows of x the GEMV and the plain kernel take; more go to the GEMM. The GEMV keeps one set of
// accumulators per row in registers, so its cost per weight byte grows with M, while a GEMM's
// shrinks; 8 is where the fp32 GEMV stopped paying on the H100 (docs/benchmarks.md, "GPU").
constexpr int64_t kMaxGemvM = 8;
// The tensor-core GEMM's tile (qlinear_mma.cu): rows of x per block and K per step (so K must be
// a multiple of it), and the most rows it takes. Its steps have no load pipeline yet, so larger M
// stays with dequantize + cuBLAS until a GPU run shows where the two cross.
constexpr int64_t kMmaTileM = 64;
constexpr int64_t kMmaTileK = 64;
constexpr int64_t kMaxMmaM = 64;

// Products per fp16 partial sum in the GEMV's fp16-activation arithmetic (qlinear_gemv.cuh): the
// error bound and overflow limit of that path follow from it (codegen_q/testing/reference.py).
constexpr int kHalfChainProducts = 4;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// `arch` is the device's compute capability as 10 * major + minor (80 for sm_80).
inline QLinearKernel choose_qlinear_kernel(int64_t M, int64_t K, int bits, ActType act, int arch, const void* x,
                                           const void* qweight) {
  const bool aligned = aligned16(x) && aligned16(qweight);
  if (M > kMaxGemvM) {
    const bool mma = M <= kMaxMmaM && arch >= 80 && act != ActType::kFloat32 && K % kMmaTileK == 0 && aligned;
    return mma ? QLinearKernel::kMma : QLinearKernel::kDequantGemm;
  }
  const bool gemv_shape = bits == 4 || K % 16 == 0;  // whole 16-byte chunks of every weight row
  return gemv_shape && aligned ? QLinearKernel::kGemv : QLinearKernel::kPlain;
}

}  // namespace cgq::cuda
