// The CPU ops as the bindings see them: pick the active ISA's kernel and spread rows over threads.
#pragma once

#include <cstdint>

#include "common/qformat.h"
#include "cpu/kernels.h"

namespace cgq::cpu {

void qlinear_int8(const QLinearArgs& a);
void qlinear_int4(const QLinearArgs& a);
// Rows of x per tile of the active ISA's int8-activation GEMM (fewer rows are padded to one).
int64_t int8_activation_min_rows();
void dequantize_int8(const DequantArgs& a);
void dequantize_int4(const DequantArgs& a);
// Quantize rows [0, N) of a weight in one pass per row (see cpu/quantize_kernels.cpp).
// Returns kQuantize* status bits (0: all finite and every scale fits fp16).
int quantize(const WeightRows& w, int64_t N, const QuantizeOut& out);
// Attention of every (query, head) pair over the paged cache, threaded; validates the tables.
void paged_attention(const AttentionArgs& a);
// The checks paged_attention makes (sizes, pointers, every table row and block id a query will
// read; std::invalid_argument otherwise). Returns the longest length, the kernel's scratch size.
int64_t check_attention_tables(const AttentionArgs& a);
// Causal self-attention of one fresh prompt, threaded over (head, block of query rows); validated.
void causal_attention(const CausalAttentionArgs& a);
// Rotary on q and k of a fused qkv projection + append of k and v to the cache; validated.
void rotary_kv_append(const RotaryAppendArgs& a);
// Reads `bytes` with every pool thread (one contiguous slice each) and returns a checksum.
uint64_t read_checksum(const uint8_t* data, int64_t bytes);

}  // namespace cgq::cpu
