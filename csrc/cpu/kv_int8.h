// The int8 KV cache's one quantization rule (common/qformat.h, KVType::kInt8), used by the rotary +
// append kernel and the fused decode step alike, so every ISA and both paths store the same bytes.
//
// One head's row x[0, D) of one token becomes D int8 codes and one fp16 scale s:
//   s = max|x| / 127 rounded UP to fp16 (so |x| / s <= 127: no code is clipped),
//   code = round(x / s), ties to even, read back as code * s.
// Hence |x - code * s| <= s * (1/2 + 127 * 2^-24) (half a step, plus fp32's rounding of x / s),
// the per-element bound the attention error bound builds on (docs/cpu-kernels.md, "int8 KV").
// Why an fp16 scale, not fp32: it is the GPU's format (issue #17), so the CPU stays its reference,
// and it costs 2 bytes per (token, head) instead of 4 (3 % of a 64-wide head's row instead of 6 %);
// its range (|x| up to 65504 * 127) exceeds an fp16 cache's (65504), the default this replaces;
// past it the scale is inf and the head's attention NaN.
// A row with NaN or inf gets a NaN scale and zero codes: the head's attention becomes NaN, as an
// fp16 cache's inf or NaN would make it non-finite. An all-zero row gets scale 0 and zero codes.
//
// Not vectorised: a token's append is D divisions per head, nothing beside the projections that
// produced it. Internal linkage for the reason fast_exp.h gives (one copy per ISA build).
#pragma once

#include <cstdint>

#include "common/half.h"

namespace cgq::cpu {
namespace {  // NOLINT: one copy per translation unit

constexpr uint16_t kKVScaleNaN = 0x7E00;

// Round to nearest, ties to even, for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, and
// fp32 addition rounds ties to even. (No libm call, and the same bits on every ISA.)
inline float round_even_small(float v) {
  constexpr float kShift = 12582912.0f;
  return (v + kShift) - kShift;
}

inline void quantize_kv_head(const float* x, int64_t D, int8_t* codes, uint16_t* scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {
    const float a = x[d] < 0.0f ? -x[d] : x[d];
    if (!(a <= 3.402823466e38f)) finite = false;  // NaN or inf
    amax = a > amax ? a : amax;
  }
  if (!finite || amax == 0.0f) {
    for (int64_t d = 0; d < D; ++d) codes[d] = 0;
    *scale = finite ? 0 : kKVScaleNaN;
    return;
  }
  // Nearest fp16 to amax / 127, then one fp16 step up if it fell below: s * 127 is exact in fp32
  // (11 + 7 significant bits), so the test is exact and s * 127 >= amax after it.
  uint16_t h = float_to_half_bits(amax / 127.0f);
  if (half_bits_to_float(h) * 127.0f < amax) ++h;
  const float s = half_bits_to_float(h);
  *scale = h;
  for (int64_t d = 0; d < D; ++d) {
    float c = round_even_small(x[d] / s);
    c = c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c);
    codes[d] = static_cast<int8_t>(c);
  }
}

}  // namespace
}  // namespace cgq::cpu
