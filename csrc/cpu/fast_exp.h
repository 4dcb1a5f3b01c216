// exp(x) in plain float arithmetic that the compiler vectorises (libm's expf is a call per
// element): 2^(x log2 e) split into 2^n (written into the exponent bits) times 2^f, |f| <= 1/2,
// by a degree-6 polynomial. Relative error ~2e-7 over the clamped range [-87, 87]; exp of
// anything below is ~0, as softmax and gelu need.
//
// Internal linkage on purpose: the per-ISA kernel files include this and are compiled with
// different instruction sets; a shared inline definition could let the linker keep the AVX-512
// copy for every variant.
#pragma once

namespace cgq::cpu {
namespace {  // NOLINT: one copy per translation unit, see above

inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f)));
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace
}  // namespace cgq::cpu
