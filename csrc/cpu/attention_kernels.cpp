// Attention over the paged KV cache (decode and causal prefill alike, see AttentionArgs): keys and
// values read through the sequence's block table (fp32, fp16 or int8), fp32 softmax. Compiled once
// per ISA like the other CPU kernels, on simd.h's vector vocabulary.
//
// int8 caches (KVType::kInt8): one scale per (token, head), so the scales factor out of the sums:
// a score is s_k * (q . codes), and the weighted sum of values takes p_t * s_v as each position's
// weight; the codes are converted to fp32 (exactly) in registers, as fp16 is. The scales of a
// block, [block_size, n_head] fp16, are read (and prefetched) with it.
//
// Memory order. A cache block is [block_size, n_head, head_dim]: one token's row of a head is
// 128-512 bytes, the next token's row of that head 2-12 KB further on. Walking one head at a time
// (the first version) meant one cache-missing line after another at that stride, which the
// hardware prefetchers do not follow across 4 KB pages. So a run of consecutive heads of one
// query (the tasks a thread was given) is walked block by block: in each block every token's
// rows of those heads are one contiguous piece, and the pieces two blocks ahead are prefetched,
// a slice per head, while this block is computed on (in one burst per block it stalled).
//
// Registers. The head dims CodeGen has (64, 80, 256; 128 as well) are compiled as constants:
// every loop over a head's vectors unrolls and its accumulators stay in registers. With head_dim
// a run-time value they lived on the stack (an array indexed by a loop variable), a store and a
// load around every FMA. Other head dims take the same code with run-time loops, unrolled by
// hand four vectors at a time. The softmax's exp runs in vectors (exp_vec). With a compiled head
// dim, q . k is taken for W positions at once and their W horizontal sums done as one tree
// (lane_sums): a separate reduction per position was half of a short context's instructions.
// What each of these gained: docs/cpu-kernels.md, "Attention".
#include <cmath>
#include <cstdint>

#include "cpu/fast_exp.h"
#include "cpu/causal_attention.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {
namespace {

using R = Vec::R;
constexpr int W = Vec::W;

// Accumulator registers one pass over V may hold: AVX-512 has 32 vector registers, AVX2 16.
#if defined(CGQ_ISA_AVX512)
constexpr int kMaxAccumulators = 16;
#else
constexpr int kMaxAccumulators = 8;
#endif

// A cache element as fp32 (fp16 -> fp32 and int8 -> fp32 are exact; int8 is the code, unscaled).
inline R load_kv(const float* p) { return Vec::load(p); }
inline R load_kv(const uint16_t* p) { return Vec::load_half(p); }
inline R load_kv(const int8_t* p) { return Vec::from_i8(p); }
inline float kv_value(float v) { return v; }
inline float kv_value(uint16_t v) { return Vec::half(v); }
inline float kv_value(int8_t v) { return static_cast<float>(v); }

// One query's heads [h0, h1) in the cache: its L positions, block by block.
template <typename T>
struct QueryRows {
  static constexpr bool kScaled = sizeof(T) == 1;  // int8 codes with per-(token, head) scales
  const T* k;
  const T* v;
  const uint16_t* k_scales;  // int8 only: [num_blocks * block_size, n_head]
  const uint16_t* v_scales;
  const int32_t* table;
  int64_t L, block_size, block_stride, token_stride, h0, h1, head_dim, n_head;

  // The scale of position o, head h, of the block whose rows start at element `base` (an int8
  // cache), from scale_base(base): one division per block, not per position.
  int64_t scale_base(int64_t base) const { return kScaled ? base / head_dim : 0; }
  float scale_at(const uint16_t* scales, int64_t sbase, int64_t o, int64_t h) const {
    return Vec::half(scales[sbase + o * n_head + h]);
  }

  // Calls f(t0, n, base, ahead) for each block: positions t0 .. t0 + n - 1, whose rows of head h
  // start at element base + o * token_stride + h * head_dim (o = 0 .. n - 1); `ahead` is the
  // block kAhead blocks on, for f to prefetch over its work. No division per token: the block
  // size is a run-time value and a division cost as much as a token's work.
  static constexpr int64_t kAhead = 2;
  struct Ahead {
    const char* first;  // its rows of heads [h0, h1): `rows` pieces of row_bytes, token_stride apart
    int64_t rows, row_bytes;
  };
  template <typename F>
  void for_each_block(const T* cache, const uint16_t* scales, F f) const {
    for (int64_t blk = 0, t0 = 0; t0 < L; ++blk, t0 += block_size) {
      Ahead ahead{nullptr, 0, 0};
      const int64_t ahead_t0 = t0 + kAhead * block_size;
      if (ahead_t0 < L) {
        ahead.first = reinterpret_cast<const char*>(cache + table[blk + kAhead] * block_stride + h0 * head_dim);
        ahead.rows = L - ahead_t0 < block_size ? L - ahead_t0 : block_size;
        ahead.row_bytes = (h1 - h0) * head_dim * static_cast<int64_t>(sizeof(T));
        if constexpr (kScaled) {  // the block's scales: a few lines, in one go
          const char* first = reinterpret_cast<const char*>(scales + table[blk + kAhead] * block_size * n_head);
          for (int64_t b = 0; b < block_size * n_head * 2; b += 64) __builtin_prefetch(first + b, 0, 2);
        }
      }
      f(t0, L - t0 < block_size ? L - t0 : block_size, table[blk] * block_stride, ahead);
    }
  }

  // Prefetches slice j of `parts` of the block ahead into L2.
  void prefetch_slice(const Ahead& a, int64_t j, int64_t parts) const {
    const int64_t begin = a.rows * j / parts, end = a.rows * (j + 1) / parts;
    for (int64_t o = begin; o < end; ++o)
      for (int64_t b = 0; b < a.row_bytes; b += 64)
        __builtin_prefetch(a.first + o * token_stride * static_cast<int64_t>(sizeof(T)) + b, 0, 2);
  }
};

// q . k over NV whole vectors (head_dim = NV * W), four independent FMA chains. A single chain
// ended by a 16-term serial sum was latency-bound.
template <int NV, typename T>
inline float dot_fixed(const float* q, const T* k) {
  R acc[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
#pragma GCC unroll 64
  for (int j = 0; j < NV; ++j) acc[j % 4] = Vec::fma(Vec::load(q + j * W), load_kv(k + j * W), acc[j % 4]);
  return Vec::sum(Vec::add(Vec::add(acc[0], acc[1]), Vec::add(acc[2], acc[3])));
}

// q . k over NV whole vectors left as a vector of partial sums (lane_sums finishes W of them at
// once), in two chains: with W positions in flight that hides the FMA latency.
template <int NV, typename T>
inline R dot_partial(const float* q, const T* k) {
  R acc[2] = {Vec::zero(), Vec::zero()};
#pragma GCC unroll 64
  for (int j = 0; j < NV; ++j) acc[j % 2] = Vec::fma(Vec::load(q + j * W), load_kv(k + j * W), acc[j % 2]);
  return Vec::add(acc[0], acc[1]);
}

// The same over any D: four vectors per step by hand, then single vectors, then scalars.
template <typename T>
inline float dot_any(const float* q, const T* k, int64_t D) {
  R a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) {
    a0 = Vec::fma(Vec::load(q + d), load_kv(k + d), a0);
    a1 = Vec::fma(Vec::load(q + d + W), load_kv(k + d + W), a1);
    a2 = Vec::fma(Vec::load(q + d + 2 * W), load_kv(k + d + 2 * W), a2);
    a3 = Vec::fma(Vec::load(q + d + 3 * W), load_kv(k + d + 3 * W), a3);
  }
  for (; d + W <= D; d += W) a0 = Vec::fma(Vec::load(q + d), load_kv(k + d), a0);
  float sum = Vec::sum(Vec::add(Vec::add(a0, a1), Vec::add(a2, a3)));
  for (; d < D; ++d) sum += q[d] * kv_value(k[d]);
  return sum;
}

// scores[t] = exp(scores[t] - max) for t < L; returns their sum. In vectors: GCC left the
// scalar exp_approx loop scalar, with branches for the clamps, ~20% of the kernel's time.
inline float exponentiate(float* scores, int64_t L, float max_score) {
  const R m = Vec::set1(max_score);
  R acc = Vec::zero();
  int64_t t = 0;
  for (; t + W <= L; t += W) {
    const R e = exp_vec(Vec::sub(Vec::load(scores + t), m));
    Vec::store(scores + t, e);
    acc = Vec::add(acc, e);
  }
  float sum = Vec::sum(acc);
  for (; t < L; ++t) sum += scores[t] = exp_approx(scores[t] - max_score);
  return sum;
}

// out[0 .. C W) += sum over n rows of p[o] * row_o[0 .. C W), rows token_stride elements apart:
// C vectors of out held in registers over the rows.
template <int C, typename T>
inline void accumulate_chunk(const T* v, int64_t token_stride, const float* p, int64_t n, float* out) {
  R acc[C];
#pragma GCC unroll 64
  for (int j = 0; j < C; ++j) acc[j] = Vec::load(out + j * W);
  for (int64_t o = 0; o < n; ++o) {
    const R po = Vec::set1(p[o]);
#pragma GCC unroll 64
    for (int j = 0; j < C; ++j) acc[j] = Vec::fma(po, load_kv(v + o * token_stride + j * W), acc[j]);
  }
#pragma GCC unroll 64
  for (int j = 0; j < C; ++j) Vec::store(out + j * W, acc[j]);
}

// accumulate_chunk over the NV vectors of a fixed head dim, in as few chunks as the registers
// allow, split evenly (80 dims on AVX2: two chunks of 5, not 8 + 2).
template <int NV, int Done = 0, typename T>
inline void accumulate_fixed(const T* v, int64_t token_stride, const float* p, int64_t n, float* out) {
  if constexpr (Done < NV) {
    constexpr int kChunks = (NV + kMaxAccumulators - 1) / kMaxAccumulators;
    constexpr int kChunk = (NV + kChunks - 1) / kChunks;
    constexpr int kCount = NV - Done < kChunk ? NV - Done : kChunk;
    accumulate_chunk<kCount>(v + Done * W, token_stride, p, n, out + Done * W);
    accumulate_fixed<NV, Done + kCount>(v, token_stride, p, n, out);
  }
}

// Any D: four vectors per chunk, then single vectors, then the dims past the last whole vector.
template <typename T>
inline void accumulate_any(const T* v, int64_t token_stride, const float* p, int64_t n, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) accumulate_chunk<4>(v + d, token_stride, p, n, out + d);
  for (; d + W <= D; d += W) accumulate_chunk<1>(v + d, token_stride, p, n, out + d);
  for (; d < D; ++d)
    for (int64_t o = 0; o < n; ++o) out[d] += p[o] * kv_value(v[o * token_stride + d]);
}

// Heads [h0, h1) of query i. scratch: (h1 - h0) * (L + 1) floats, a row of L scores per head
// and then one float per head (its running max, then 1 / its softmax sum).
template <int NV, typename T>
void attend_heads(const AttentionArgs& a, const QueryRows<T>& rows, const float* q, float* out, float* scratch) {
  const int64_t D = a.head_dim, L = rows.L, n_heads = rows.h1 - rows.h0, stride = rows.token_stride;
  float* norm = scratch + n_heads * L;
  for (int64_t j = 0; j < n_heads; ++j) norm[j] = -INFINITY;
  // Scores and their maxima, block by block (K).
  rows.for_each_block(rows.k, rows.k_scales, [&](int64_t t0, int64_t n, int64_t base, const auto& ahead) {
    [[maybe_unused]] const int64_t sbase = rows.scale_base(base);
    for (int64_t j = 0; j < n_heads; ++j) {
      rows.prefetch_slice(ahead, j, n_heads);
      const int64_t h = rows.h0 + j;
      const float* qh = q + h * D;
      const T* k = rows.k + base + h * D;
      float* s = scratch + j * L + t0;
      float m = norm[j];
      int64_t o = 0;
      if constexpr (NV > 0) {  // W positions at a time: one reduction tree instead of W reductions
        R mv = Vec::set1(m);
        for (; o + W <= n; o += W) {
          R part[W];
#pragma GCC unroll 16
          for (int p = 0; p < W; ++p) part[p] = dot_partial<NV>(qh, k + (o + p) * stride);
          R sc = Vec::mul(lane_sums(part), Vec::set1(a.scale));
          if constexpr (QueryRows<T>::kScaled) {
            float ks[W];
            for (int p = 0; p < W; ++p) ks[p] = rows.scale_at(rows.k_scales, sbase, o + p, h);
            sc = Vec::mul(sc, Vec::load(ks));
          }
          Vec::store(s + o, sc);
          mv = Vec::max(sc, mv);
        }
        m = Vec::reduce_max(mv);
      }
      for (; o < n; ++o) {
        if constexpr (NV > 0) s[o] = dot_fixed<NV>(qh, k + o * stride) * a.scale;
        else s[o] = dot_any(qh, k + o * stride, D) * a.scale;
        if constexpr (QueryRows<T>::kScaled) s[o] *= rows.scale_at(rows.k_scales, sbase, o, h);
        m = s[o] > m ? s[o] : m;
      }
      norm[j] = m;
    }
  });
  for (int64_t j = 0; j < n_heads; ++j) norm[j] = 1.0f / exponentiate(scratch + j * L, L, norm[j]);
  // The probability-weighted sum of the values, block by block (V), normalised at the end.
  for (int64_t d = 0; d < n_heads * D; ++d) out[rows.h0 * D + d] = 0.0f;
  rows.for_each_block(rows.v, rows.v_scales, [&](int64_t t0, int64_t n, int64_t base, const auto& ahead) {
    [[maybe_unused]] const int64_t sbase = rows.scale_base(base);
    for (int64_t j = 0; j < n_heads; ++j) {
      rows.prefetch_slice(ahead, j, n_heads);
      const int64_t h = rows.h0 + j;
      float* p = scratch + j * L + t0;
      if constexpr (QueryRows<T>::kScaled)  // each position's weight p_t * s_v (p is not needed after)
        for (int64_t o = 0; o < n; ++o) p[o] *= rows.scale_at(rows.v_scales, sbase, o, h);
      if constexpr (NV > 0) accumulate_fixed<NV>(rows.v + base + h * D, stride, p, n, out + h * D);
      else accumulate_any(rows.v + base + h * D, stride, p, n, D, out + h * D);
    }
  });
  for (int64_t j = 0; j < n_heads; ++j)
    for (int64_t d = 0; d < D; ++d) out[(rows.h0 + j) * D + d] *= norm[j];
}

// NV > 0: head_dim = NV * W, compiled as a constant; NV = 0: any head_dim. Tasks are split into
// runs of consecutive heads of one query.
template <int NV, typename T>
void attend(const AttentionArgs& a, float* scratch, int64_t task_begin, int64_t task_end) {
  const int64_t H = a.n_head, D = a.head_dim;
  const int64_t q_stride = a.q_stride ? a.q_stride : H * D;
  for (int64_t task = task_begin; task < task_end;) {
    const int64_t i = task / H, h0 = task % H;
    const int64_t h1 = task_end - i * H < H ? task_end - i * H : H;
    const int64_t s = a.query_rows ? a.query_rows[i] : i;
    const QueryRows<T> rows{static_cast<const T*>(a.k_cache), static_cast<const T*>(a.v_cache), a.k_scales,
                            a.v_scales, a.block_tables + s * a.max_blocks, a.lengths[i], a.block_size,
                            a.block_size * H * D, H * D, h0, h1, D, H};
    attend_heads<NV>(a, rows, a.q + i * q_stride, a.out + i * H * D, scratch);
    task = i * H + h1;
  }
}

template <typename T>
void attend_head_dim(const AttentionArgs& a, float* scratch, int64_t task_begin, int64_t task_end) {
#if !defined(CGQ_ISA_SCALAR)  // the scalar reference keeps the plain loops
  if (a.head_dim % W == 0) {
    switch (a.head_dim / W) {
      case 64 / W: return attend<64 / W, T>(a, scratch, task_begin, task_end);
      case 80 / W: return attend<80 / W, T>(a, scratch, task_begin, task_end);
      case 128 / W: return attend<128 / W, T>(a, scratch, task_begin, task_end);
      case 256 / W: return attend<256 / W, T>(a, scratch, task_begin, task_end);
      default: break;
    }
  }
#endif
  attend<0, T>(a, scratch, task_begin, task_end);
}

}  // namespace

// For each (query i, head h) in [task_begin, task_end) (task = i * H + h), with s = the query's
// table row and L = lengths[i]:
//   out[i, h, :] = softmax(scale * K_s[:L, h, :] @ q[i, h, :]) @ V_s[:L, h, :]
// position t of sequence s living in block block_tables[s * max_blocks + t / block_size] at offset
// t % block_size. `scratch` holds attention_scratch_floats(n_head, max(lengths)) floats. fp16
// caches are converted on load (exactly), so they give the same arithmetic on the same values;
// int8 caches give it on code * scale, up to the order of fp32 roundings.
void paged_attention(const AttentionArgs& a, float* scratch, int64_t task_begin, int64_t task_end) {
  switch (a.kv_type) {
    case KVType::kInt8: return attend_head_dim<int8_t>(a, scratch, task_begin, task_end);
    case KVType::kFloat16: return attend_head_dim<uint16_t>(a, scratch, task_begin, task_end);
    default: return attend_head_dim<float>(a, scratch, task_begin, task_end);
  }
}

int64_t causal_attention_tasks(const CausalAttentionArgs& a) { return causal::tasks(a); }

int64_t causal_attention_scratch(int64_t head_dim) { return causal::scratch_floats(head_dim); }

int64_t causal_attention_kv_floats(const CausalAttentionArgs& a) { return causal::kv_floats(a); }

void causal_attention_kv(const CausalAttentionArgs& a, float* kv, int64_t h_begin, int64_t h_end) {
  causal::gather_kv(a, kv, h_begin, h_end);
}

void causal_attention(const CausalAttentionArgs& a, const float* kv, float* scratch, int64_t task_begin,
                      int64_t task_end) {
  causal::run(a, kv, scratch, task_begin, task_end);
}

}  // namespace cgq::cpu::CGQ_ISA
