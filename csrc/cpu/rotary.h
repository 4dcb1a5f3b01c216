// GPT-J interleaved rotary on the first 2 * half dims of one head: pairs (2j, 2j + 1) turn by the
// angle of column j of the sin/cos tables, as transformers' rotate_every_two does. Shared by the
// per-ISA rotary kernel and the fused decode step; internal linkage for the reason given in
// fast_exp.h (one copy per instruction-set build).
#pragma once

#include <cstdint>

namespace cgq::cpu {
namespace {  // NOLINT: one copy per translation unit

inline void rotate_head(float* x, const float* sin, const float* cos, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float even = x[2 * j], odd = x[2 * j + 1];
    x[2 * j] = even * cos[j] - odd * sin[j];
    x[2 * j + 1] = odd * cos[j] + even * sin[j];
  }
}

}  // namespace
}  // namespace cgq::cpu
