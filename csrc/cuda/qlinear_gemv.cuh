// Small-M (decode) weight-only GEMV for CUDA: memory-bound, so everything serves keeping enough
// 16-byte weight loads in flight and spending few instructions per weight byte.
//
// - A warp owns R output rows (GemvTile); each lane loads 16 bytes of each row per step (16 int8
//   weights or one 32-element int4 block), kUnroll steps ahead of any math. The 4 warps of a
//   block split K among themselves when K is long enough (partial sums meet in shared memory),
//   and take different rows when it is not, so every warp has full steps of loads.
// - Each of the M <= kMaxGemvM activation rows has its own accumulators (template parameter), so
//   one weight load serves every row of x; for M > 1 the R rows are decoded once per step.
// - x is read straight from global memory (L1-cached, shared by the R rows of a warp), in the
//   activation's own dtype: half the bytes of fp32 for fp16 and bf16.
//
// Two ways to do the arithmetic, by activation dtype:
//
// float32 and bfloat16 x: every product in fp32, like the CPU twin (the same fp32 bound holds;
//   bf16 x is exact in fp32). Weights become floats with the 2^23 trick: a byte b placed under
//   the exponent bits of 2^23 (one byte_perm) is the float 2^23 + b, and one subtraction leaves
//   b - offset exactly.
//
// float16 x: half2 arithmetic, two elements per instruction. The fp16 magic number does the
//   conversion: OR-ing a 10-bit integer q into the mantissa of 0x6400 (1024.0) gives 1024 + q.
//   int4: for a 32-bit word at byte 4i of a block, (w & 0x000F000F) | 0x64006400 holds elements
//   (4i, 4i+2) and (w & 0x00F000F0) | 0x64006400 holds 1024 + 16 q of (4i+16, 4i+18); after
//   w >>= 8 the same two masks give (4i+1, 4i+3) and (4i+17, 4i+19). One HSUB2 of 1024 + zero,
//   or one HFMA2 by 1/16 minus 64 + zero, leaves q - zero exactly, so the stored layout needs no
//   repack. x's natural-order pairs are regrouped to match with one PRMT per pair, once per warp
//   step and shared by the warp's R weight rows. int8: byte_perm puts q + 128 under 0x64, one
//   HSUB2 of 1152 leaves q, one HMUL2 by the row's scale gives the weight rounded to fp16, which
//   is exactly dequantize(w, float16).
//   Products are summed in half2 chains of kHalfChainProducts per half, each chain converted to
//   fp32 and added there (the int4 group scale is applied in fp32 per 32-element block), so an
//   fp16 partial sum never holds more than kHalfChainProducts terms: the error bound and the
//   overflow limit in codegen_q/testing/reference.py (half_gemv_bound) follow from that.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_ops.h"

namespace cgq::cuda {

// y = x W^T + bias for a.M <= kMaxGemvM rows, 16-byte aligned x and weight, and (int8) K a
// multiple of 16: the cases choose_qlinear_kernel sends here.
void gemv(const LinearArgs& a, cudaStream_t stream);

}  // namespace cgq::cuda
