// The size, pointer and KV-type checks of the attention-side ops, the same on both devices: the
// CPU ops (cpu/dispatch.cpp) add the checks that read the tables and positions in host memory;
// the CUDA ops (cuda/attention_cuda.cu) the GPU's own limits, since device memory cannot be read
// there without a sync. Errors are std::invalid_argument naming the op.
#pragma once

#include <stdexcept>
#include <string>

#include "common/qformat.h"

namespace cgq {

// The cache's element type is one of KVType's, and an int8 cache comes with its scales.
inline void check_kv_type(KVType t, const void* k_scales, const void* v_scales, const char* op) {
  if (t != KVType::kFloat32 && t != KVType::kFloat16 && t != KVType::kInt8)
    throw std::invalid_argument(std::string(op) + ": kv_type must be 0 (float32), 1 (float16) or 2 (int8)");
  if (t == KVType::kInt8 && (!k_scales || !v_scales))
    throw std::invalid_argument(std::string(op) + ": an int8 KV cache needs its k and v scales");
}

inline void check_attention_args(const AttentionArgs& a, const char* op) {
  check_kv_type(a.kv_type, a.k_scales, a.v_scales, op);
  if (a.n_query < 0 || a.n_head <= 0 || a.head_dim <= 0 || a.block_size <= 0 || a.max_blocks <= 0 ||
      a.n_table_rows <= 0)
    throw std::invalid_argument(std::string(op) + ": sizes must be positive");
  if (!a.q || !a.k_cache || !a.v_cache || !a.block_tables || !a.lengths || !a.out)
    throw std::invalid_argument(std::string(op) + ": null pointer");
  if (a.q_stride != 0 && a.q_stride < a.n_head * a.head_dim)
    throw std::invalid_argument(std::string(op) + ": q rows overlap (q_stride < n_head * head_dim)");
}

inline void check_rotary_append_args(const RotaryAppendArgs& a) {
  if (a.T < 0 || a.n_head <= 0 || a.head_dim <= 0 || a.block_size <= 0 || a.num_blocks <= 0 || a.n_positions <= 0)
    throw std::invalid_argument("rotary_kv_append: sizes must be positive");
  if (a.rotary_dim < 0 || a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim)
    throw std::invalid_argument("rotary_kv_append: rotary_dim must be even and at most head_dim");
  if (!a.qkv || !a.positions || !a.sin || !a.cos || !a.slot_blocks || !a.slot_offsets || !a.k_cache || !a.v_cache)
    throw std::invalid_argument("rotary_kv_append: null pointer");
  check_kv_type(a.kv_type, a.k_scales, a.v_scales, "rotary_kv_append");
}

}  // namespace cgq
