// gelu_new for the fused decode step (decode_step.cpp), compiled once per ISA: built there with the
// module's baseline flags it ran one element at a time (scalar SSE, a division per element).
#include <cstdint>

#include "cpu/fast_exp.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {
namespace {

// transformers' NewGELUActivation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), with
// tanh(u) = 1 - 2 / (exp(2u) + 1). Errors ~1e-7 relative to |x|, as with tanhf.
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

inline float gelu_scalar(float x) {
  const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
  return 0.5f * x * (2.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f));
}

}  // namespace

void gelu_new(float* v, int64_t n) {
  int64_t i = 0;
#if !defined(CGQ_ISA_SCALAR)
  using R = Vec::R;
  constexpr int W = Vec::W;
  const R half = Vec::set1(0.5f), one = Vec::set1(1.0f), two = Vec::set1(2.0f);
  for (; i + W <= n; i += W) {
    const R x = Vec::load(v + i);
    const R u = Vec::mul(Vec::set1(kSqrt2OverPi), Vec::fma(Vec::mul(Vec::set1(kCubic), x), Vec::mul(x, x), x));
    const R e = exp_vec(Vec::mul(two, u));
    const R one_plus_tanh = Vec::sub(two, Vec::div(two, Vec::add(e, one)));
    Vec::store(v + i, Vec::mul(Vec::mul(half, x), one_plus_tanh));
  }
#endif
  for (; i < n; ++i) v[i] = gelu_scalar(v[i]);
}

}  // namespace cgq::cpu::CGQ_ISA
