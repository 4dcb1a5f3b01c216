// Attention over the paged KV cache (decode and causal prefill alike, see AttentionArgs): keys and
// values read through the sequence's block table, fp32 softmax. Compiled once per ISA like the
// other CPU kernels; the loops over head_dim are plain C++ that the compiler vectorizes.
#include <cmath>
#include <cstdint>

#include "cpu/fast_exp.h"
#include "cpu/kernels.h"

namespace cgq::cpu::CGQ_ISA {
namespace {

// q . k over head_dim with 16 independent partial sums: a plain `dot += q[d] * k[d]` is one
// dependent chain the compiler may not reorder (no -ffast-math), 64-256 FMA latencies per key;
// 16 lanes make it one vector FMA per 16 dims.
inline float dot(const float* q, const float* k, int64_t D) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += q[d + j] * k[d + j];
  float sum = 0.0f;
  for (; d < D; ++d) sum += q[d] * k[d];
  for (int j = 0; j < kLanes; ++j) sum += part[j];
  return sum;
}

}  // namespace

// For each (query i, head h) in [task_begin, task_end) (task = i * H + h), with s = the query's
// table row and L = lengths[i]:
//   out[i, h, :] = softmax(scale * K_s[:L, h, :] @ q[i, h, :]) @ V_s[:L, h, :]
// position t of sequence s living in block block_tables[s * max_blocks + t / block_size] at offset
// t % block_size. `scores` is scratch of at least max(lengths) floats.
void paged_attention(const AttentionArgs& a, float* scores, int64_t task_begin, int64_t task_end) {
  const int64_t H = a.n_head, D = a.head_dim, B = a.block_size;
  const int64_t token_stride = H * D, block_stride = B * H * D;
  const int64_t q_stride = a.q_stride ? a.q_stride : H * D;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t i = task / H, h = task % H;
    const int64_t s = a.query_rows ? a.query_rows[i] : i;
    const int64_t L = a.lengths[i];
    const int32_t* table = a.block_tables + s * a.max_blocks;
    const float* q = a.q + i * q_stride + h * D;
    float* out = a.out + (i * H + h) * D;
    float max_score = -INFINITY;
    for (int64_t t = 0; t < L; ++t) {
      const float* k = a.k_cache + table[t / B] * block_stride + (t % B) * token_stride + h * D;
      scores[t] = dot(q, k, D) * a.scale;
      max_score = scores[t] > max_score ? scores[t] : max_score;
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < L; ++t) {
      scores[t] = exp_approx(scores[t] - max_score);
      sum += scores[t];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
    for (int64_t t = 0; t < L; ++t) {
      const float* v = a.v_cache + table[t / B] * block_stride + (t % B) * token_stride + h * D;
      const float p = scores[t] * inv;
      for (int64_t d = 0; d < D; ++d) out[d] += p * v[d];
    }
  }
}

}  // namespace cgq::cpu::CGQ_ISA
