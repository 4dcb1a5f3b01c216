// One piece of an int4 weight row as float32, shared by dequantize_int4 (qlinear_kernels.cpp) and
// the blocked GEMM's panels (qlinear_gemm.h), so both produce the same bits. Included by per-ISA
// translation units only, so it lives in the ISA's namespace.
#pragma once

#include <cstdint>

#include "common/qformat.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {

// Elements [k0, k0 + kc) of row n of an int4 [N, K] weight (common/qformat.h) into out:
// (q - zero) * scale per group of G, computed as fma(q, scale, -zero * scale). k0 and kc are
// multiples of G. Always inlined: where G is a constant, finding a group is a shift.
__attribute__((always_inline)) inline void dequantize_int4_part(const uint8_t* qweight, const uint16_t* scales,
                                                                const uint8_t* zeros, int64_t K, int64_t G, int64_t n,
                                                                int64_t k0, int64_t kc, float* out) {
  constexpr int W = Vec::W;
  constexpr int kRegsPerBlock = kInt4BlockElems / W;
  const int64_t groups = K / G;
  const uint8_t* row = qweight + n * (K / 2);
  for (int64_t k = 0; k < kc; k += G) {
    const int64_t idx = n * groups + (k0 + k) / G;
    const float s = Vec::half(scales[idx]);
    const float z = zeros ? static_cast<float>(zeros[idx]) : static_cast<float>(kInt4SymmetricZero);
    const Vec::R sv = Vec::set1(s), ov = Vec::set1(-z * s);
    for (int64_t b = k; b < k + G; b += kInt4BlockElems) {
      Vec::R wv[kRegsPerBlock];
      Vec::from_u4_block(row + (k0 + b) / 2, wv);
      for (int j = 0; j < kRegsPerBlock; ++j) Vec::store(out + b + j * W, Vec::fma(wv[j], sv, ov));
    }
  }
}

}  // namespace cgq::cpu::CGQ_ISA
