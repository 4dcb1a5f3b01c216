// Entry points that every per-ISA build of qlinear_kernels.cpp provides. The qlinear kernels work
// on the output rows [n_begin, n_end) so the dispatcher can hand disjoint row ranges to threads;
// before them, once per call, qlinear_prepare fills a workspace of qlinear_workspace_bytes (64-byte
// aligned) that all threads read, e.g. the activation limbs of the VNNI kernels.
#pragma once

#include <cstdint>

#include "common/qformat.h"

namespace cgq::cpu {
// A [N, K] weight to quantize, row-major, in the checkpoint's own element type: the kernels widen
// each row to float32 in cache, so a fp16 checkpoint is never copied to float32 in memory first.
enum class WeightType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
struct WeightRows {
  const void* data = nullptr;
  WeightType type = WeightType::kFloat32;
  int64_t K = 0;
};
// Optional by-product of quantizing rows [0, N): per row, sum over k of (w - dequant(q))^2 and
// of w^2, for the relative error the quantizer reports (both null: not measured).
struct RowErrors {
  double* err2 = nullptr;
  double* sq = nullptr;
};
// Where quantize_rows puts rows [0, N) of a weight: codes, fp16 scales (and zero points), computed
// in one pass per row (min/max, scale, codes, error) as codegen_q/quantization/rtn.py specifies them.
struct QuantizeOut {
  int bits = 8;                  // 8: symmetric int8, one scale per row; 4: int4 per group
  int64_t group_size = 0;        // int4 only
  bool symmetric = true;         // int4 only; int8 is always symmetric
  void* q = nullptr;             // int8 [N, K] or packed uint8 [N, K/2] (common/qformat.h)
  uint16_t* scales = nullptr;    // fp16 bits, [N] or [N, K/group_size]
  uint8_t* zeros = nullptr;      // int4 asymmetric only, [N, K/group_size]
  RowErrors err;
};
// quantize_rows' status bits: the rows held NaN or inf; a scale does not fit fp16.
constexpr int kQuantizeNonFinite = 1;
constexpr int kQuantizeScaleOverflow = 2;
// Floats of scratch paged_attention takes, for queries of at most `longest` positions: a row of
// scores and one float per head.
inline int64_t attention_scratch_floats(int64_t n_head, int64_t longest) { return n_head * (longest + 1); }
// Causal self-attention of one fresh prompt of n tokens (cpu/causal_attention.h): q, k, v and out
// are [n, n_head, head_dim] float32 with rows *_stride floats apart; query i attends to keys
// [0, i]. kv_fp16: K and V are used rounded to fp16 (nearest even), the values an fp16 KV cache
// holds, so the result is what attention over that cache computes.
// Causal attention of n query rows over past + n key / value rows (cpu/causal_attention.h): query
// row i is at position past + i and attends to keys 0 .. past + i. past = 0: a fresh prompt over
// itself; past > 0: a prompt chunk continuing a sequence whose K/V (its own included) k and v hold.
struct CausalAttentionArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  int64_t n = 0, n_head = 0, head_dim = 0, past = 0;
  int64_t q_stride = 0, k_stride = 0, v_stride = 0, out_stride = 0;
  float scale = 1.0f;
  bool kv_fp16 = false;
};
}  // namespace cgq::cpu

#define CGQ_DECLARE_ISA_KERNELS(isa)                                                   \
  namespace cgq::cpu::isa {                                                            \
  int64_t qlinear_workspace_bytes(const QLinearArgs& a, bool int4);                    \
  void qlinear_prepare(const QLinearArgs& a, bool int4, void* workspace);              \
  /* qlinear_prepare in independent parts (0: it has none, call qlinear_prepare) */      \
  int64_t qlinear_prepare_parts(const QLinearArgs& a, bool int4);                      \
  void qlinear_prepare_part(const QLinearArgs& a, bool int4, void* workspace,          \
                            int64_t begin, int64_t end);                               \
  void qlinear_int8(const QLinearArgs& a, int64_t n_begin, int64_t n_end);             \
  void qlinear_int4(const QLinearArgs& a, int64_t n_begin, int64_t n_end);             \
  /* the fewest rows of x that take the int8-activation GEMM (cpu/qlinear_i8gemm.h) */   \
  int64_t int8_activation_min_rows();                                                  \
  void dequantize_int8(const DequantArgs& a, int64_t n_begin, int64_t n_end);          \
  void dequantize_int4(const DequantArgs& a, int64_t n_begin, int64_t n_end);          \
  uint64_t read_checksum(const uint8_t* data, int64_t bytes);                          \
  int quantize_rows(const WeightRows& w, const QuantizeOut& out, int64_t n_begin,       \
                    int64_t n_end);                                                    \
  void paged_attention(const AttentionArgs& a, float* scores, int64_t task_begin,       \
                       int64_t task_end);                                              \
  /* K and V gathered per head first (kv_floats, kv over heads), then the tasks */       \
  int64_t causal_attention_tasks(const CausalAttentionArgs& a);                        \
  int64_t causal_attention_scratch(int64_t head_dim);                                  \
  int64_t causal_attention_kv_floats(const CausalAttentionArgs& a);                    \
  void causal_attention_kv(const CausalAttentionArgs& a, float* kv, int64_t h_begin,   \
                           int64_t h_end);                                             \
  void causal_attention(const CausalAttentionArgs& a, const float* kv, float* scratch,  \
                        int64_t task_begin, int64_t task_end);                         \
  void rotary_kv_append(const RotaryAppendArgs& a, int64_t t_begin, int64_t t_end);     \
  /* src[0, n) into a KV cache at element `slot`, as fp16 (half) or fp32 */              \
  void store_kv_row(void* cache, bool half, int64_t slot, const float* src, int64_t n);  \
  }

CGQ_DECLARE_ISA_KERNELS(scalar)
CGQ_DECLARE_ISA_KERNELS(avx2)
CGQ_DECLARE_ISA_KERNELS(avx512)
