// gelu_new, transformers' NewGELUActivation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))),
// with tanh(u) = 1 - 2 / (exp(2u) + 1). Errors ~1e-7 relative to |x|, as with tanhf. Inline, so
// that every qlinear kernel that applies it (QLinearArgs::gelu: the int8 GEMM's epilogue, the
// others' pass over their columns), for prompts and the fused decode step alike, computes the same
// values; included by per-ISA translation units only (exp_vec is per ISA).
#pragma once

#include <cstdint>

#include "cpu/fast_exp.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {

constexpr float kGeluSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

inline float gelu_scalar(float x) {
  const float u = kGeluSqrt2OverPi * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (2.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f));
}

#if !defined(CGQ_ISA_SCALAR)
inline Vec::R gelu_vec(Vec::R x) {
  const Vec::R two = Vec::set1(2.0f);
  const Vec::R u = Vec::mul(Vec::set1(kGeluSqrt2OverPi), Vec::fma(Vec::mul(Vec::set1(kGeluCubic), x), Vec::mul(x, x), x));
  const Vec::R e = exp_vec(Vec::mul(two, u));
  const Vec::R one_plus_tanh = Vec::sub(two, Vec::div(two, Vec::add(e, Vec::set1(1.0f))));
  return Vec::mul(Vec::mul(Vec::set1(0.5f), x), one_plus_tanh);
}
#endif

// v[0, n) = gelu_new(v[0, n)) in place.
inline void gelu_inplace(float* v, int64_t n) {
  int64_t i = 0;
#if !defined(CGQ_ISA_SCALAR)
  for (; i + Vec::W <= n; i += Vec::W) Vec::store(v + i, gelu_vec(Vec::load(v + i)));
#endif
  for (; i < n; ++i) v[i] = gelu_scalar(v[i]);
}

}  // namespace cgq::cpu::CGQ_ISA
