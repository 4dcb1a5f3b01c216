// Rotary embedding + KV-cache append in one pass (see RotaryAppendArgs): each token's q and k
// heads are rotated where they lie in the fused qkv projection, and k and v go straight into the
// token's cache slot, so nothing is copied twice. Compiled once per ISA; the loops are plain C++.
#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/kv_int8.h"
#include "cpu/rotary.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {
namespace {

inline void copy_floats(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

}  // namespace

void store_kv_row(void* cache, bool half, int64_t slot, const float* src, int64_t n) {
  if (half) floats_to_halves(src, static_cast<uint16_t*>(cache) + slot, n);
  else copy_floats(static_cast<float*>(cache) + slot, src, n);
}

void rotary_kv_append(const RotaryAppendArgs& a, int64_t t_begin, int64_t t_end) {
  const int64_t H = a.n_head, D = a.head_dim, half = a.rotary_dim / 2, row = H * D;
  for (int64_t t = t_begin; t < t_end; ++t) {
    float* q = a.qkv + t * 3 * row;
    float* k = q + row;
    const float* v = k + row;
    const float* sin = a.sin + a.positions[t] * half;
    const float* cos = a.cos + a.positions[t] * half;
    for (int64_t h = 0; h < H; ++h) {
      rotate_head(q + h * D, sin, cos, half);
      rotate_head(k + h * D, sin, cos, half);
    }
    const int64_t token = static_cast<int64_t>(a.slot_blocks[t]) * a.block_size + a.slot_offsets[t];
    if (a.kv_type == KVType::kInt8) {  // one scale per head
      for (int64_t h = 0; h < H; ++h) {
        quantize_kv_head(k + h * D, D, static_cast<int8_t*>(a.k_cache) + token * row + h * D, a.k_scales + token * H + h);
        quantize_kv_head(v + h * D, D, static_cast<int8_t*>(a.v_cache) + token * row + h * D, a.v_scales + token * H + h);
      }
    } else {
      store_kv_row(a.k_cache, a.kv_type == KVType::kFloat16, token * row, k, row);
      store_kv_row(a.v_cache, a.kv_type == KVType::kFloat16, token * row, v, row);
    }
  }
}

}  // namespace cgq::cpu::CGQ_ISA
