// Tensor-core GEMM for quantized weights and fp16 / bf16 activations, for the rows of x between
// the GEMV and the dequantize + cuBLAS path (qlinear_plan.h decides). sm_80 and later.
//
// A block of 4 warps computes a 64 x 64 tile of y (rows of x by output features), K in steps of
// 64. Each step stages the x tile in shared memory and dequantizes the weight tile there, each
// element (q - zero) * scale formed exactly in fp32 and rounded once to the activation's type
// (as dequantize(w, dtype) does); each warp then multiplies its 32 x 32 sub-tile with
// mma.sync.m16n8k16 (fp32 accumulation), its fragments read from shared memory by the PTX
// fragment layout. y = the fp32 sums + bias, rounded once to the activation's type.
//
// The weights are read in their stored layout (no repack), two int4 blocks or 64 int8 bytes
// per row and step, so a step reads whole 32-byte sectors. No cp.async pipeline yet: the loads
// of step k + 1 do not overlap the math of step k.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_ops.h"

namespace cgq::cuda {

// y = x W^T + bias for the calls choose_qlinear_kernel sends here (kMma).
void mma_gemm(const LinearArgs& a, cudaStream_t stream);

}  // namespace cgq::cuda
