// The active ISA's kernels, for the code that orchestrates them (dispatch.cpp, decode_step.cpp).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

#include "common/qformat.h"
#include "cpu/kernels.h"

namespace cgq::cpu {

struct KernelTable {
  int64_t (*qlinear_workspace_bytes)(const QLinearArgs&, bool);
  void (*qlinear_prepare)(const QLinearArgs&, bool, void*);
  int64_t (*qlinear_prepare_parts)(const QLinearArgs&, bool);
  void (*qlinear_prepare_part)(const QLinearArgs&, bool, void*, int64_t, int64_t);
  void (*qlinear_int8)(const QLinearArgs&, int64_t, int64_t);
  void (*qlinear_int4)(const QLinearArgs&, int64_t, int64_t);
  int64_t (*int8_activation_min_rows)();
  void (*dequantize_int8)(const DequantArgs&, int64_t, int64_t);
  void (*dequantize_int4)(const DequantArgs&, int64_t, int64_t);
  uint64_t (*read_checksum)(const uint8_t*, int64_t);
  int (*quantize_rows)(const WeightRows&, const QuantizeOut&, int64_t, int64_t);
  void (*paged_attention)(const AttentionArgs&, float*, int64_t, int64_t);
  int64_t (*causal_attention_tasks)(const CausalAttentionArgs&);
  int64_t (*causal_attention_scratch)(int64_t);
  int64_t (*causal_attention_kv_floats)(const CausalAttentionArgs&);
  void (*causal_attention_kv)(const CausalAttentionArgs&, float*, int64_t, int64_t);
  void (*causal_attention)(const CausalAttentionArgs&, const float*, float*, int64_t, int64_t);
  void (*rotary_kv_append)(const RotaryAppendArgs&, int64_t, int64_t);
  void (*store_kv_row)(void*, bool, int64_t, const float*, int64_t);
};

// Scratch memory, 64-byte aligned, grown as needed and kept: decode calls the same shapes
// thousands of times (e.g. per-thread qlinear_prepare workspaces).
struct AlignedScratch {
  void* data = nullptr;
  int64_t bytes = 0;
  AlignedScratch() = default;
  AlignedScratch(const AlignedScratch&) = delete;
  AlignedScratch& operator=(const AlignedScratch&) = delete;
  ~AlignedScratch() { std::free(data); }
  void* get(int64_t want) {
    if (want > bytes) {
      std::free(data);
      data = nullptr;
      bytes = 0;
      const int64_t rounded = (want + 4095) / 4096 * 4096;
      data = std::aligned_alloc(64, static_cast<size_t>(rounded));
      if (!data) throw std::bad_alloc();
      bytes = rounded;
    }
    return data;
  }
  template <typename T>
  T* get_as(int64_t count) {
    return static_cast<T*>(get(count * static_cast<int64_t>(sizeof(T))));
  }
};

// The table of the ISA in use now (CPUID, or forced by CODEGEN_Q_CPU_ISA / set_isa).
const KernelTable& kernels();

}  // namespace cgq::cpu
