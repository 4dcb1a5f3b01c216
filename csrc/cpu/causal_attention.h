// Causal attention of a prompt's rows, tiled flash-style: each task is one head and a block of kBQ
// query rows, walking the keys up to its last row in blocks of kBK with an online softmax, so no
// [n, n] score matrix exists. The keys are the prompt's own (past = 0, a fresh prompt) or a
// sequence's whole K/V when the rows continue it (past > 0, a chunk of a prompt after what the
// cache holds: chunked prefill). Included by attention_kernels.cpp in every ISA's translation unit.
//
// First, once per call, each head's K is transposed to [D][keys] and its V gathered to contiguous
// [keys][D] rows (rounded to fp16's values on the way when kv_fp16). Per key block: a score row is
// kBK / W vector accumulators fed by broadcasts of q (four query rows at a time share each K
// load); then the row maxima, exp (exp_vec) and sums; then O += P V with four rows sharing each V
// load, D in slabs of kDS so the accumulators stay in registers for any head dim. fp32 throughout.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/half.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA::causal {

constexpr int64_t kBQ = 32;  // query rows per task
constexpr int64_t kBK = 64;  // keys per block
#if defined(CGQ_ISA_AVX2)
constexpr int kRows = 2;     // query rows sharing each K / V load: 4 x 2 accumulators + loads in 16 ymm
#else
constexpr int kRows = 4;     // query rows sharing each K / V load
#endif
constexpr int kKV = 4;       // key vectors per score tile
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
constexpr int64_t kDS = 4 * Vec::W;  // head-dim slab of the P V accumulators: 4 vectors per row
#else
constexpr int64_t kDS = 16;
#endif

inline int64_t scratch_floats(int64_t D) { return kBQ * kBK + kBQ * D + 2 * kBQ; }

// Keys per head row of the transposed K: n rounded up to whole vectors (the tail is zeros).
inline int64_t padded_keys(int64_t n) { return (n + Vec::W - 1) / Vec::W * Vec::W; }

// Key / value rows: the past ones, then the n of the query rows.
inline int64_t key_rows(const CausalAttentionArgs& a) { return a.past + a.n; }

// Floats of the gathered K and V: per head, K^T [D][padded_keys(keys)] then V [keys][D].
inline int64_t head_kv_floats(const CausalAttentionArgs& a) {
  return a.head_dim * (padded_keys(key_rows(a)) + key_rows(a));
}
inline int64_t kv_floats(const CausalAttentionArgs& a) { return a.n_head * head_kv_floats(a); }

// x, or the float nearest-even fp16 rounding gives (the value an fp16 cache holds).
inline float kv_scalar(float x, bool fp16) { return fp16 ? half_bits_to_float(float_to_half_bits(x)) : x; }
inline Vec::R kv_vector(Vec::R x, bool fp16) {
#if defined(CGQ_ISA_AVX512)
  return fp16 ? _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) : x;
#elif defined(CGQ_ISA_AVX2)
  return fp16 ? _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) : x;
#else
  return kv_scalar(x, fp16);
#endif
}

// K and V of heads [h_begin, h_end) into kv (layout: head_kv_floats), once per call: every block
// of query rows of a head reads them.
inline void gather_kv(const CausalAttentionArgs& a, float* kv, int64_t h_begin, int64_t h_end) {
  const int64_t D = a.head_dim, nk = key_rows(a), np = padded_keys(nk);
  for (int64_t h = h_begin; h < h_end; ++h) {
    float* kt = kv + h * head_kv_floats(a);
    float* vh = kt + D * np;
    for (int64_t j = 0; j < nk; ++j) {
      const float* src = a.k + j * a.k_stride + h * D;
      int64_t d = 0;
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
      alignas(64) float row[Vec::W];  // rounded a vector at a time, then spread down the column
      for (; d + Vec::W <= D; d += Vec::W) {
        Vec::store(row, kv_vector(Vec::load(src + d), a.kv_fp16));
        for (int l = 0; l < Vec::W; ++l) kt[(d + l) * np + j] = row[l];
      }
#endif
      for (; d < D; ++d) kt[d * np + j] = kv_scalar(src[d], a.kv_fp16);
      const float* vs = a.v + j * a.v_stride + h * D;
      float* vd = vh + j * D;
      d = 0;
      for (; d + Vec::W <= D; d += Vec::W) Vec::store(vd + d, kv_vector(Vec::load(vs + d), a.kv_fp16));
      for (; d < D; ++d) vd[d] = kv_scalar(vs[d], a.kv_fp16);
    }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = nk; j < np; ++j) kt[d * np + j] = 0.0f;
  }
}

inline int64_t tasks(const CausalAttentionArgs& a) { return a.n_head * ((a.n + kBQ - 1) / kBQ); }

// S[r][0..kc) = scale * q_row . k_j for NR rows, from kt (this head's [D][ld], at the block's
// first key): tiles of NR rows x kKV key vectors, so each K load and each q broadcast feed
// several FMAs.
template <int NR>
inline void scores(const float* const* q, int64_t D, const float* kt, int64_t ld, int64_t kc, float scale,
                   float* s_rows) {
  constexpr int W = Vec::W;
  for (int64_t j0 = 0; j0 < kc; j0 += kKV * W) {
    const int nv = static_cast<int>((kc - j0 + W - 1) / W < kKV ? (kc - j0 + W - 1) / W : kKV);
    Vec::R acc[NR][kKV];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < kKV; ++i) acc[r][i] = Vec::zero();
    if (nv == kKV) {
      for (int64_t d = 0; d < D; ++d) {
        Vec::R k[kKV];
        for (int i = 0; i < kKV; ++i) k[i] = Vec::load(kt + d * ld + j0 + i * W);
        for (int r = 0; r < NR; ++r) {
          const Vec::R qv = Vec::set1(q[r][d]);
          for (int i = 0; i < kKV; ++i) acc[r][i] = Vec::fma(qv, k[i], acc[r][i]);
        }
      }
    } else {
      for (int64_t d = 0; d < D; ++d)
        for (int r = 0; r < NR; ++r) {
          const Vec::R qv = Vec::set1(q[r][d]);
          for (int i = 0; i < nv; ++i) acc[r][i] = Vec::fma(qv, Vec::load(kt + d * ld + j0 + i * W), acc[r][i]);
        }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < nv; ++i) Vec::store(s_rows + r * kBK + j0 + i * W, Vec::mul(acc[r][i], Vec::set1(scale)));
  }
}

// O[r][d0 .. d0 + kDS) += sum_j P[r][j] V[j][d0 ..] for NR rows.
template <int NR>
inline void accumulate_pv(const float* p_rows, const float* v, int64_t v_stride, int64_t kc, int64_t d0, int64_t ds,
                          float* o_rows, int64_t D) {
  constexpr int W = Vec::W;
  constexpr int kV = static_cast<int>(kDS / W);
  if (ds == kDS) {
    Vec::R acc[NR][kV];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < kV; ++i) acc[r][i] = Vec::load(o_rows + r * D + d0 + i * W);
    for (int64_t j = 0; j < kc; ++j) {
      Vec::R vv[kV];
      for (int i = 0; i < kV; ++i) vv[i] = Vec::load(v + j * v_stride + d0 + i * W);
      for (int r = 0; r < NR; ++r) {
        const Vec::R p = Vec::set1(p_rows[r * kBK + j]);
        for (int i = 0; i < kV; ++i) acc[r][i] = Vec::fma(p, vv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < kV; ++i) Vec::store(o_rows + r * D + d0 + i * W, acc[r][i]);
    return;
  }
  for (int r = 0; r < NR; ++r)  // a head dim that is not a whole number of slabs: the last part
    for (int64_t j = 0; j < kc; ++j)
      for (int64_t d = d0; d < d0 + ds; ++d) o_rows[r * D + d] += p_rows[r * kBK + j] * v[j * v_stride + d];
}

// Tasks [task_begin, task_end): (head, block of query rows) pairs, head-major.
inline void run(const CausalAttentionArgs& a, const float* kv, float* scratch, int64_t task_begin,
                int64_t task_end) {
  constexpr int W = Vec::W;
  const int64_t D = a.head_dim, blocks = (a.n + kBQ - 1) / kBQ, ld = padded_keys(key_rows(a));
  float* s = scratch;             // [kBQ][kBK]: scores, then probabilities
  float* o = s + kBQ * kBK;       // [kBQ][D]
  float* m = o + kBQ * D;         // [kBQ] running maxima
  float* l = m + kBQ;             // [kBQ] running sums
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t h = task / blocks, i0 = task % blocks * kBQ;
    const float* head_kt = kv + h * head_kv_floats(a);  // K^T [D][ld], then V [n][D]
    const float* head_v = head_kt + D * ld;
    const int64_t nq = a.n - i0 < kBQ ? a.n - i0 : kBQ;
    const float* q_rows[kBQ];
    for (int64_t r = 0; r < nq; ++r) q_rows[r] = a.q + (i0 + r) * a.q_stride + h * D;
    for (int64_t r = 0; r < nq; ++r) {
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.0f;
      for (int64_t d = 0; d < D; ++d) o[r * D + d] = 0.0f;
    }
    const int64_t keys = a.past + i0 + nq;  // causal: the block's last row sees keys [0, keys)
    for (int64_t j0 = 0; j0 < keys; j0 += kBK) {
      const int64_t kc = keys - j0 < kBK ? keys - j0 : kBK;
      const int64_t kc_pad = (kc + W - 1) / W * W;
      const float* kt = head_kt + j0;
      int64_t r = 0;
      for (; r + kRows <= nq; r += kRows) scores<kRows>(q_rows + r, D, kt, ld, kc_pad, a.scale, s + r * kBK);
      for (; r < nq; ++r) scores<1>(q_rows + r, D, kt, ld, kc_pad, a.scale, s + r * kBK);
      // mask, online softmax
      for (r = 0; r < nq; ++r) {
        float* sr = s + r * kBK;
        const int64_t visible = a.past + i0 + r + 1 - j0;  // keys j0 .. past + i0 + r
        const int64_t seen = visible < kc ? (visible > 0 ? visible : 0) : kc;
        for (int64_t j = seen; j < kc_pad; ++j) sr[j] = -std::numeric_limits<float>::infinity();
        float bmax = -std::numeric_limits<float>::infinity();
        {
          int64_t j = 0;
          Vec::R vmax = Vec::set1(bmax);
          for (; j + W <= seen; j += W) vmax = Vec::max(Vec::load(sr + j), vmax);
          bmax = Vec::reduce_max(vmax);
          for (; j < seen; ++j) bmax = sr[j] > bmax ? sr[j] : bmax;
        }
        if (seen == 0) {  // this row sees none of this block
          for (int64_t j = 0; j < kc_pad; ++j) sr[j] = 0.0f;
          continue;
        }
        const float m_new = bmax > m[r] ? bmax : m[r];
        const float correction = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first block
        float sum = 0.0f;
        int64_t j = 0;
        for (; j + W <= kc_pad; j += W) {
          const Vec::R p = exp_vec(Vec::sub(Vec::load(sr + j), Vec::set1(m_new)));
          Vec::store(sr + j, p);
        }
        for (; j < kc_pad; ++j) sr[j] = exp_approx(sr[j] - m_new);
        for (j = seen; j < kc_pad; ++j) sr[j] = 0.0f;  // exp of -inf, made exact
        {
          Vec::R vsum = Vec::zero();
          for (j = 0; j + W <= kc_pad; j += W) vsum = Vec::add(vsum, Vec::load(sr + j));  // zeros past seen
          sum = Vec::sum(vsum);
        }
        l[r] = l[r] * correction + sum;
        m[r] = m_new;
        if (correction != 1.0f) {
          int64_t d = 0;
          for (; d + W <= D; d += W) Vec::store(o + r * D + d, Vec::mul(Vec::load(o + r * D + d), Vec::set1(correction)));
          for (; d < D; ++d) o[r * D + d] *= correction;
        }
      }
      const float* v = head_v + j0 * D;
      for (int64_t d0 = 0; d0 < D; d0 += kDS) {
        const int64_t ds = D - d0 < kDS ? D - d0 : kDS;
        for (r = 0; r + kRows <= nq; r += kRows)
          accumulate_pv<kRows>(s + r * kBK, v, D, kc, d0, ds, o + r * D, D);
        for (; r < nq; ++r) accumulate_pv<1>(s + r * kBK, v, D, kc, d0, ds, o + r * D, D);
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      float* out = a.out + (i0 + r) * a.out_stride + h * D;
      const float inv = 1.0f / l[r];
      for (int64_t d = 0; d < D; ++d) out[d] = o[r * D + d] * inv;
    }
  }
}

}  // namespace cgq::cpu::CGQ_ISA::causal
