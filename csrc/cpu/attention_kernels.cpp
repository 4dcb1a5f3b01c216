// Attention over the paged KV cache (decode and causal prefill alike, see AttentionArgs): keys and
// values read through the sequence's block table (fp32 or fp16), fp32 softmax. Compiled once per
// ISA like the other CPU kernels, on simd.h's vector vocabulary.
#include <cmath>
#include <cstdint>

#include "cpu/fast_exp.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {
namespace {

using R = Vec::R;
constexpr int W = Vec::W;

// A cache element as fp32 (fp16 -> fp32 is exact).
inline R load_kv(const float* p) { return Vec::load(p); }
inline R load_kv(const uint16_t* p) { return Vec::load_half(p); }
inline float kv_value(float v) { return v; }
inline float kv_value(uint16_t v) { return Vec::half(v); }

// q . k over head_dim: four vector accumulators (independent FMA chains), one tree reduction.
// A single chain ended by a 16-term serial sum was latency-bound: ~70 cycles per key, the whole
// decode step's cost at long contexts.
template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  R acc[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
  int64_t d = 0;
  for (; d + W <= D; d += W) acc[(d / W) & 3] = Vec::fma(Vec::load(q + d), load_kv(k + d), acc[(d / W) & 3]);
  float sum = Vec::sum(Vec::add(Vec::add(acc[0], acc[1]), Vec::add(acc[2], acc[3])));
  for (; d < D; ++d) sum += q[d] * kv_value(k[d]);
  return sum;
}

template <typename T>
void attend(const AttentionArgs& a, float* scores, int64_t task_begin, int64_t task_end) {
  const int64_t H = a.n_head, D = a.head_dim, B = a.block_size;
  const int64_t token_stride = H * D, block_stride = B * H * D;
  const int64_t q_stride = a.q_stride ? a.q_stride : H * D;
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
  constexpr int64_t kChunk = 8;  // vector registers of out kept live across the tokens
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t i = task / H, h = task % H;
    const int64_t s = a.query_rows ? a.query_rows[i] : i;
    const int64_t L = a.lengths[i];
    const int32_t* table = a.block_tables + s * a.max_blocks;
    // Calls f(t, offset of token t's head-h row) for t = 0 .. L-1, block by block: a division
    // per token (the block size is a run-time value) cost as much as the token's arithmetic.
    // (A software prefetch of the row a few tokens ahead measured no faster.)
    auto for_each_row = [&](auto f) {
      for (int64_t blk = 0, t0 = 0; t0 < L; ++blk, t0 += B) {
        const int64_t base = table[blk] * block_stride + h * D;
        const int64_t n = L - t0 < B ? L - t0 : B;
        for (int64_t o = 0; o < n; ++o) f(t0 + o, base + o * token_stride);
      }
    };
    const float* q = a.q + i * q_stride + h * D;
    float* out = a.out + (i * H + h) * D;
    float max_score = -INFINITY;
    for_each_row([&](int64_t t, int64_t at) {
      scores[t] = dot(q, k_cache + at, D) * a.scale;
      max_score = scores[t] > max_score ? scores[t] : max_score;
    });
    float sum = 0.0f;
    for (int64_t t = 0; t < L; ++t) {
      scores[t] = exp_approx(scores[t] - max_score);
      sum += scores[t];
    }
    const float inv = 1.0f / sum;
    // out = sum_t p_t v_t, kChunk vectors of out at a time held in registers over all tokens.
    const int64_t vector_dims = D / W * W;
    for (int64_t d0 = 0; d0 < vector_dims; d0 += kChunk * W) {
      const int64_t n = (vector_dims - d0) / W < kChunk ? (vector_dims - d0) / W : kChunk;
      R acc[kChunk];
      for (int64_t j = 0; j < kChunk; ++j) acc[j] = Vec::zero();
      for_each_row([&](int64_t t, int64_t at) {
        const R p = Vec::set1(scores[t] * inv);
        const T* v = v_cache + at + d0;
        for (int64_t j = 0; j < n; ++j) acc[j] = Vec::fma(p, load_kv(v + j * W), acc[j]);
      });
      for (int64_t j = 0; j < n; ++j) Vec::store(out + d0 + j * W, acc[j]);
    }
    for (int64_t d = vector_dims; d < D; ++d) {  // dims past the last whole vector
      float o = 0.0f;
      for_each_row([&](int64_t t, int64_t at) { o += scores[t] * inv * kv_value(v_cache[at + d]); });
      out[d] = o;
    }
  }
}

}  // namespace

// For each (query i, head h) in [task_begin, task_end) (task = i * H + h), with s = the query's
// table row and L = lengths[i]:
//   out[i, h, :] = softmax(scale * K_s[:L, h, :] @ q[i, h, :]) @ V_s[:L, h, :]
// position t of sequence s living in block block_tables[s * max_blocks + t / block_size] at offset
// t % block_size. `scores` is scratch of at least max(lengths) floats. fp16 caches are
// converted on load (exactly), so they give the same arithmetic on the same values.
void paged_attention(const AttentionArgs& a, float* scores, int64_t task_begin, int64_t task_end) {
  if (a.kv_half) attend<uint16_t>(a, scores, task_begin, task_end);
  else attend<float>(a, scores, task_begin, task_end);
}

}  // namespace cgq::cpu::CGQ_ISA
