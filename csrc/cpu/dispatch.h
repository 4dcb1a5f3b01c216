// The CPU ops as the bindings see them: pick the active ISA's kernel and spread rows over threads.
#pragma once

#include <cstdint>

#include "common/qformat.h"
#include "cpu/kernels.h"

namespace cgq::cpu {

void qlinear_int8(const QLinearArgs& a);
void qlinear_int4(const QLinearArgs& a);
void dequantize_int8(const DequantArgs& a);
void dequantize_int4(const DequantArgs& a);
// The per-element quantization pass for rows [0, N) (see cpu/quantize_kernels.cpp).
void quantize_int8(const WeightRows& w, int64_t N, const uint16_t* scales, int8_t* q, const RowErrors& err = {});
void quantize_int4(const WeightRows& w, int64_t N, int64_t group_size, const uint16_t* scales, const uint8_t* zeros,
                   uint8_t* packed, const RowErrors& err = {});
// lo/hi [N, K / group] = min/max of each row group; false if w holds NaN or inf.
bool minmax(const WeightRows& w, int64_t N, int64_t group, float* lo, float* hi);
// Attention of every (query, head) pair over the paged cache, threaded; validates the tables.
void paged_attention(const AttentionArgs& a);
// The checks paged_attention makes (sizes, pointers, every table row and block id a query will
// read; std::invalid_argument otherwise). Returns the longest length, the kernel's scratch size.
int64_t check_attention_tables(const AttentionArgs& a);
// Rotary on q and k of a fused qkv projection + append of k and v to the cache; validated.
void rotary_kv_append(const RotaryAppendArgs& a);
// Reads `bytes` with every pool thread (one contiguous slice each) and returns a checksum.
uint64_t read_checksum(const uint8_t* data, int64_t bytes);

}  // namespace cgq::cpu
