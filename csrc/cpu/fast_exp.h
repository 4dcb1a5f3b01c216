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

// The clamp, log2(e) and the polynomial's coefficients (highest power first): the one method,
// shared with simd.h's exp_vec.
constexpr float kExpClamp = 87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExpPoly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                               5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

inline float exp_approx(float x) {
  x = x < -kExpClamp ? -kExpClamp : (x > kExpClamp ? kExpClamp : x);
  const float t = x * kLog2e;
  const float n = static_cast<float>(static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f)));
  const float f = t - n;
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = p * f + kExpPoly[i];
  const int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace
}  // namespace cgq::cpu
