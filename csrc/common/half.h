// IEEE fp16 <-> fp32 in portable code (no F16C needed): used by the scalar kernels and tests.
#pragma once

#include <cstdint>
#include <cstring>

namespace cgq {

// static: each ISA translation unit keeps its own copy, so no AVX-512 code can leak into another
// variant through the linker picking one inline definition for all.
static inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise it
      int e = -1;
      do {
        ++e;
        mantissa <<= 1;
      } while ((mantissa & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mantissa & 0x3FFu) << 13);
    }
  } else if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 -> IEEE fp16 bits, rounded to nearest even (as F16C's vcvtps2ph): overflow gives inf,
// NaN stays NaN, small values become subnormal or zero.
static inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN, inf
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to above 65504: inf
  if (abs < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    if (abs < 0x33000000u) return sign;  // below 2^-25: rounds to zero
    const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
    // The half's subnormal units are 2^-24: drop the significand's low 14..24 bits.
    const int shift = 126 - static_cast<int>(abs >> 23);
    const uint32_t kept = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    const uint32_t rounded = kept + (rest > halfway || (rest == halfway && (kept & 1u)));
    return sign | static_cast<uint16_t>(rounded);
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits (a carry may bump the
  // exponent, which is still the right answer).
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t kept = rebased >> 13, rest = rebased & 0x1FFFu;
  return sign | static_cast<uint16_t>(kept + (rest > 0x1000u || (rest == 0x1000u && (kept & 1u))));
}

}  // namespace cgq
