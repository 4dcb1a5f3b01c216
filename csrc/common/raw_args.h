// The attention-side argument structs (qformat.h) from the raw addresses and sizes the Python
// bindings take, shared by bindings_cpu.cpp and bindings_cuda.cpp so that both devices read a
// call alike. The KV type code is a relabel here; each op checks it.
#pragma once

#include <cstdint>

#include "common/qformat.h"

namespace cgq {

template <typename T>
inline T* raw_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline AttentionArgs attention_args(uintptr_t q, int64_t q_stride, uintptr_t k_cache, uintptr_t v_cache,
                                    uintptr_t block_tables, int64_t n_table_rows, uintptr_t query_rows,
                                    uintptr_t lengths, uintptr_t out, int64_t n_query, int64_t n_head,
                                    int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t num_blocks,
                                    float scale, int kv_type, uintptr_t k_scales, uintptr_t v_scales) {
  AttentionArgs a;
  a.q = raw_ptr<const float>(q), a.q_stride = q_stride;
  a.k_cache = raw_ptr<const void>(k_cache), a.v_cache = raw_ptr<const void>(v_cache);
  a.kv_type = static_cast<KVType>(kv_type);
  a.k_scales = raw_ptr<const uint16_t>(k_scales), a.v_scales = raw_ptr<const uint16_t>(v_scales);
  a.block_tables = raw_ptr<const int32_t>(block_tables), a.n_table_rows = n_table_rows;
  a.query_rows = raw_ptr<const int32_t>(query_rows), a.lengths = raw_ptr<const int32_t>(lengths);
  a.out = raw_ptr<float>(out), a.n_query = n_query, a.n_head = n_head, a.head_dim = head_dim;
  a.block_size = block_size, a.max_blocks = max_blocks, a.num_blocks = num_blocks, a.scale = scale;
  return a;
}

inline RotaryAppendArgs rotary_append_args(uintptr_t qkv, int64_t T, int64_t n_head, int64_t head_dim,
                                           int64_t rotary_dim, uintptr_t positions, uintptr_t sin, uintptr_t cos,
                                           int64_t n_positions, uintptr_t slot_blocks, uintptr_t slot_offsets,
                                           uintptr_t k_cache, uintptr_t v_cache, int64_t block_size,
                                           int64_t num_blocks, int kv_type, uintptr_t k_scales, uintptr_t v_scales) {
  RotaryAppendArgs a;
  a.qkv = raw_ptr<float>(qkv), a.T = T, a.n_head = n_head, a.head_dim = head_dim, a.rotary_dim = rotary_dim;
  a.positions = raw_ptr<const int32_t>(positions), a.sin = raw_ptr<const float>(sin);
  a.cos = raw_ptr<const float>(cos), a.n_positions = n_positions;
  a.slot_blocks = raw_ptr<const int32_t>(slot_blocks), a.slot_offsets = raw_ptr<const int32_t>(slot_offsets);
  a.k_cache = raw_ptr<void>(k_cache), a.v_cache = raw_ptr<void>(v_cache);
  a.block_size = block_size, a.num_blocks = num_blocks, a.kv_type = static_cast<KVType>(kv_type);
  a.k_scales = raw_ptr<uint16_t>(k_scales), a.v_scales = raw_ptr<uint16_t>(v_scales);
  return a;
}

}  // namespace cgq
