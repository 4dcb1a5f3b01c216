// Small-M (decode) weight-only GEMV for CUDA: memory-bound, so everything serves keeping enough
// 16-byte weight loads in flight and touching each weight byte exactly once.
//
// - A warp owns R output rows (GemvTile); each lane loads 16 bytes of each row per step (16 int8
//   weights or one 32-element int4 block), kUnroll steps ahead of any math. The 4 warps of a
//   block split K among themselves when K is long enough (partial sums meet in shared memory),
//   and take different rows when it is not, so every warp has full steps of loads.
// - Weights become floats exactly with the 2^23 trick: a byte b placed under the exponent bits
//   of 2^23 (one byte_perm) is the float 2^23 + b, and one subtraction of 2^23 + offset leaves
//   b - offset. No int->float conversion instructions (a quarter-rate unit on recent GPUs).
// - x stays fp32 and is read through L1 once per chunk, shared by the R rows; every product is
//   formed in fp32 like the CPU twin, so the same error bound holds. int4 sums x*(q - zero) over
//   a block and applies the group scale once per block.
// - Each of the M <= kMaxGemvM activation rows has its own accumulators (template parameter),
//   so one weight load serves every row of x; for M > 1 the R rows are decoded once per step.
//
// At M = 1 int8 reads close to the memory's bandwidth and int4 well under it (bound by the decode
// arithmetic, not by memory). M = 4..8 is limited by the fp32 x reads and is slower than cuBLAS
// fp16 there: that case wants tensor cores (a later kernel). Figures: docs/benchmarks.md, "GPU".
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cgq::cuda {

constexpr int kMaxGemvM = 8;

// Returns false when the fast path does not apply (alignment, K not a multiple of 16 for int8);
// the caller then uses the plain kernel.
bool gemv_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, const float* bias,
               float* y, int64_t N, cudaStream_t stream);
bool gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
               const uint8_t* zeros, int64_t group_size, const float* bias, float* y, int64_t N,
               cudaStream_t stream);

}  // namespace cgq::cuda
