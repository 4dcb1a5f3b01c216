// Integer-dot-product int4 GEMV for the AVX2 variant: included by qlinear_kernels.cpp in the avx2
// translation unit only. The same scheme as qlinear_vnni.h (activation limbs, limb_layout.h) on
// AVX2's vpmaddubsw, for CPUs without AVX-512: the fp32 kernel converts every nibble to a float
// and pays two FMAs per 8 weights, and at M = 1 read well below the memory's bandwidth
// (docs/cpu-kernels.md, "Inner loops").
//
// vpmaddubsw multiplies u8 weights by s8 limbs and adds adjacent pairs into s16 with saturation;
// nibbles (<= 15) times limbs (|h| <= 127) keep a pair within 2 * 15 * 127 = 3810, and the sum
// of a low-nibble and a high-nibble pair within 7620, far from the s16 limit, so nothing
// saturates. vpmaddwd by ones then widens to s32 lanes of 4 weight bytes, as vpdpbusd's lanes.
// (int8 weights would need 255 * 127 * 2 > 2^15 per pair: they keep the fp32 kernel.)
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "common/qformat.h"
#include "cpu/limb_layout.h"
#include "cpu/prefetch.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA::limbs_avx2 {

using limbs::kLimbs;
using limbs::Layout;

inline __m256 round_nearest(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline int64_t reduce_add(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t total = 0;
  for (int32_t lane : lanes) total += lane;
  return total;
}

// max |x| and sum |x| over a block of `len` (a multiple of 8) activations.
struct BlockStats {
  float amax, abs_sum;
  BlockStats(const float* xb, int64_t len) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
    for (int64_t k = 0; k < len; k += 8) {
      const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + k));
      vmax = _mm256_max_ps(vmax, v);
      vsum = _mm256_add_ps(vsum, v);  // unlike max, a sum keeps NaN and inf
    }
    amax = Vec::reduce_max(vmax);
    abs_sum = Vec::sum(vsum);
  }
};

// The two-limb split of one block (limb_layout.h): q = round(256 x / s), h = q >> 8, l = q & 255.
inline void split_two_limbs(const float* xb, int64_t len, float amax, const Layout& L, limbs::RowOut& out,
                            int64_t b, int64_t k0) {
  const float s = amax / 127.0f;
  const __m256 inv256 = _mm256_set1_ps((1.0f / s) * 256.0f);  // 256 fl(1 / s), exact
  const __m256i low_byte = _mm256_set1_epi32(255);
  __m256i sum_q = _mm256_setzero_si256();
  for (int64_t k = 0; k < len; k += 16) {
    __m256i h[2], l[2];
    for (int half = 0; half < 2; ++half) {
      const __m256i q = _mm256_cvtps_epi32(round_nearest(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8 * half), inv256)));
      h[half] = _mm256_srai_epi32(q, 8);
      l[half] = _mm256_and_si256(q, low_byte);
      sum_q = _mm256_add_epi32(sum_q, q);  // |q| <= 32513, so 128 of them fit
    }
    const int64_t pos = L.position(k0 + k);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.limb[0] + pos), pack_i32x16_to_i8(h[0], h[1]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.limb[1] + pos), pack_u32x16_to_u8(l[0], l[1]));
  }
  out.scales[b] = s * (1.0f / 256.0f);  // with the kernel's fold (H << 8) + L
  out.sums[b] = static_cast<float>(static_cast<double>(s) * static_cast<double>(reduce_add(sum_q)) / 256.0);
}

// The three-limb split of one block (limb_layout.h) on its power-of-two scale 2^e.
inline void split_three_limbs(const float* xb, int64_t len, float amax, const Layout& L, limbs::RowOut& out,
                              int64_t b, int64_t k0) {
  const int e = limbs::block_exponent(amax);
  // For 2^-e beyond the fp32 range (denormal x), scale in two exact steps.
  const bool two_steps = e < -126;
  const __m256 inv = _mm256_set1_ps(two_steps ? std::ldexp(1.0f, -e - 64) : std::ldexp(1.0f, -e));
  const __m256 pre = _mm256_set1_ps(std::ldexp(1.0f, 64));
  const __m256 c128 = _mm256_set1_ps(128.0f);
  __m256i sum[kLimbs] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t k = 0; k < len; k += 16) {
    __m256i parts[2][kLimbs];
    for (int half = 0; half < 2; ++half) {
      __m256 t = _mm256_loadu_ps(xb + k + 8 * half);
      if (two_steps) t = _mm256_mul_ps(t, pre);
      t = _mm256_mul_ps(t, inv);
      const __m256 h = round_nearest(t);
      const __m256 r1 = _mm256_mul_ps(_mm256_sub_ps(t, h), c128);
      const __m256 l = round_nearest(r1);
      const __m256 ll = round_nearest(_mm256_mul_ps(_mm256_sub_ps(r1, l), c128));
      parts[half][0] = _mm256_cvtps_epi32(h);
      parts[half][1] = _mm256_cvtps_epi32(l);
      parts[half][2] = _mm256_cvtps_epi32(ll);
    }
    const int64_t pos = L.position(k0 + k);
    for (int j = 0; j < kLimbs; ++j) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.limb[j] + pos), pack_i32x16_to_i8(parts[0][j], parts[1][j]));
      sum[j] = _mm256_add_epi32(sum[j], _mm256_add_epi32(parts[0][j], parts[1][j]));
    }
  }
  out.scales[b] = std::ldexp(1.0f, e - 14);  // with the kernel's fold ((H << 7) + L) << 7) + LL
  out.sums[b] = limbs::limb_sum(reduce_add(sum[0]), reduce_add(sum[1]), reduce_add(sum[2]), e);
}

// Splits activation rows into limbs for int4 weights (L.nibble_order, blocks = groups of a
// multiple of 32 that divides K): two in the chunks that allow it, else three. Runs once per
// qlinear call.
inline void prepare(const float* x, int64_t M, const Layout& L, uint8_t* ws) {
  limbs::prepare_rows(
      x, M, L, ws, [](const float* xb, int64_t len) { return BlockStats(xb, len); },
      [](auto&&... args) { split_two_limbs(args...); }, [](auto&&... args) { split_three_limbs(args...); });
}

// fp32 dot product of one int4 group with its dequantized weights, for blocks marked fp32.
inline float dot_int4_fp32(const uint8_t* w, const float* x, int64_t G, float scale, float zero) {
  float total = 0.0f;
  for (int64_t b = 0; b < G; b += kInt4BlockElems)
    for (int i = 0; i < kInt4BlockBytes; ++i) {
      const uint8_t byte = w[b / 2 + i];
      total += x[b + i] * ((static_cast<float>(byte & 0x0F) - zero) * scale);
      total += x[b + i + 16] * ((static_cast<float>(byte >> 4) - zero) * scale);
    }
  return total;
}

// The activation side of a span of `span` <= 8 groups from g0, shared by the tile's rows: block
// scales (with the limb fold, limb_layout.h) and block sums sum(x_hat); 0 past the span.
struct SpanActivations {
  __m256 scale, sum;
};
inline SpanActivations span_activations(const float* block_scale, const float* block_sum, int64_t g0, int64_t span) {
  __m256 sx, sums;
  if (span == 8) {
    sx = _mm256_loadu_ps(block_scale + g0);
    sums = _mm256_loadu_ps(block_sum + g0);
  } else {
    const __m256i lane_in_span = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(span)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    sx = _mm256_maskload_ps(block_scale + g0, lane_in_span);
    sums = _mm256_maskload_ps(block_sum + g0, lane_in_span);
  }
  return {sx, sums};
}

// For the same span of weight row n, from one load of its fp16 scales: weight scale x activation
// scale (which includes the limb fold) and the zero-point term's part scale x zero x sum(x_hat).
// A whole span (8 groups, every span of a row whose group count is a multiple of 8) is loaded
// directly: copied into a small array first, the 16-byte load of that array waited on a failed
// store-to-load forward every time, 15 % of this kernel's time (perf, L2-resident 4096 x 128).
struct SpanScales {
  __m256 scale, offset;
};
inline SpanScales span_scales(const QLinearArgs& a, const SpanActivations& act, int64_t groups, int64_t n, int64_t g0,
                              int64_t span) {
  const uint16_t* sw = a.scales + n * groups + g0;
  const uint8_t* zeros = a.zeros ? a.zeros + n * groups + g0 : nullptr;
  __m128i half_bits, zero_bytes = _mm_set1_epi8(static_cast<char>(kInt4SymmetricZero));
  if (span == 8) {
    half_bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sw));
    if (zeros) zero_bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros));
  } else {
    alignas(16) uint16_t part[8] = {};
    std::memcpy(part, sw, static_cast<size_t>(span) * sizeof(uint16_t));
    half_bits = _mm_load_si128(reinterpret_cast<const __m128i*>(part));
    if (zeros) {
      alignas(16) uint8_t zpart[16] = {};
      std::memcpy(zpart, zeros, static_cast<size_t>(span));
      zero_bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(zpart));
    }
  }
  const __m256 w_scale = _mm256_cvtph_ps(half_bits);  // 0 past the span
  const __m256 zero = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(zero_bytes));
  return {_mm256_mul_ps(w_scale, act.scale),
          _mm256_mul_ps(_mm256_mul_ps(w_scale, zero), act.sum)};
}

// y[m, n0 .. n0+NR] for int4 weights at one row of x. A chunk is 128 elements, 64 weight bytes
// per row, loaded as two 32-byte halves: half 0 holds 32-blocks 0-1, half 1 blocks 2-3, and each
// s32 lane of a half's dot product covers 4 weight bytes, so lanes 0-3 and 4-7 lie in one block.
// The three limbs fold in int32 as in qlinear_vnni.h: ((H << 7) + L) << 7) + LL < 2^29. With
// G = 128 both halves belong to one group, so their s16 pair sums are added before widening
// (4 x 3810 < 2^15) and the fold runs once per chunk.
//
// Two-limb chunks (limb_layout.h) fold as (H << 8) + L, the unsigned l limb as vpmaddubsw's
// unsigned operand and the nibbles as its signed one; a pair is then at most 2 * 255 * 15 = 7650
// and the four pairs of a G = 128 lane 30600 < 2^15. kMode: as in qlinear_vnni.h's int4_tile.
//
// Scales are computed 8 groups at a time into a small array that each chunk reads with a
// broadcast load (G = 32: two groups per half, one permute), not converted chunk by chunk.
template <int G, int NR, limbs::LimbMode kMode>
void int4_tile(const QLinearArgs& a, const Layout& L, const uint8_t* ws, int64_t m, int64_t n0) {
  static_assert(G == 32 || G == 64 || G == 128, "int4 group size");
  const uint8_t* two_limb_chunk = L.two_limb_chunk(ws, m);
  const int64_t groups = a.K / G;
  const int64_t row_bytes = a.K / 2;
  const uint8_t* w = static_cast<const uint8_t*>(a.qweight) + n0 * row_bytes;
  const float* block_scale = L.block_scale(ws, m);
  const int8_t* const limb_rows[kLimbs] = {L.limb(ws, m, 0), L.limb(ws, m, 1), L.limb(ws, m, 2)};
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lane_block = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);  // 32-block of a lane within its half
  const float* block_sum = L.block_sum(ws, m);
  __m256 acc[NR], off[NR];  // off: the zero-point term per lane
  for (int r = 0; r < NR; ++r) acc[r] = off[r] = _mm256_setzero_ps();
  for (int64_t g_base = 0; g_base < groups; g_base += 8) {
    const int64_t span = (groups - g_base < 8) ? groups - g_base : 8;
    const SpanActivations act = span_activations(block_scale, block_sum, g_base, span);
    alignas(32) float scale[NR][8];
    for (int r = 0; r < NR; ++r) {
      const SpanScales ss = span_scales(a, act, groups, n0 + r, g_base, span);
      _mm256_store_ps(scale[r], ss.scale);
      off[r] = _mm256_add_ps(off[r], ss.offset);
    }
    const int64_t k_end = (g_base + span) * G;
    for (int64_t k = g_base * G; k < k_end; k += 128) {
      const int64_t chunk_bytes = (k_end - k >= 128) ? 64 : (k_end - k) / 2;
      const int chunk_group = static_cast<int>(k / G - g_base);  // the chunk's first group in the span
      prefetch_next_tile<NR, 64>(w + kLimbTilesAhead * NR * row_bytes, row_bytes, k / 2);
      const bool two = kMode == limbs::kTwoLimbs || (kMode == limbs::kMixedLimbs && two_limb_chunk[k / 128]);
      // One row's chunk from the 64 weight bytes at src. Inlined into both loops below, so the
      // unrolled full-chunk loop keeps the accumulators in registers.
      auto row_chunk = [&](int r, const uint8_t* src, __m256 acc_r) __attribute__((always_inline)) {
        __m256i lo[2], hi[2];
        for (int half = 0; half < 2; ++half) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * half));
          lo[half] = _mm256_and_si256(raw, nibble);
          hi[half] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
        }
        // s16 pair sums of limb j for one half: low nibbles meet limb entries 32h.., high ones 64+32h..
        auto pairs = [&](int j, int half) __attribute__((always_inline)) {
          const int8_t* x = limb_rows[j] + k;
          const __m256i x_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 32 * half));
          const __m256i x_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 64 + 32 * half));
          if (two && j == 1)  // the unsigned l limb: the nibbles take the signed side
            return _mm256_add_epi16(_mm256_maddubs_epi16(x_lo, lo[half]), _mm256_maddubs_epi16(x_hi, hi[half]));
          return _mm256_add_epi16(_mm256_maddubs_epi16(lo[half], x_lo), _mm256_maddubs_epi16(hi[half], x_hi));
        };
        // The limbs' dot products folded in int32: ((H << 7) + L) << 7) + LL, or (H << 8) + L.
        auto fold = [&](auto dot) __attribute__((always_inline)) {
          if (two) return _mm256_add_epi32(_mm256_slli_epi32(dot(0), 8), dot(1));
          return _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(_mm256_slli_epi32(dot(0), 7), dot(1)), 7), dot(2));
        };
        if constexpr (G == 128) {
          const __m256i folded =
              fold([&](int j) { return _mm256_madd_epi16(_mm256_add_epi16(pairs(j, 0), pairs(j, 1)), ones); });
          return _mm256_fmadd_ps(_mm256_cvtepi32_ps(folded), _mm256_broadcast_ss(&scale[r][chunk_group]), acc_r);
        } else {
          for (int half = 0; half < 2; ++half) {
            const __m256i folded = fold([&](int j) { return _mm256_madd_epi16(pairs(j, half), ones); });
            __m256 s;
            if constexpr (G == 64) s = _mm256_broadcast_ss(&scale[r][chunk_group + half]);
            else s = _mm256_permutevar8x32_ps(_mm256_load_ps(scale[r]),
                                              _mm256_add_epi32(lane_block, _mm256_set1_epi32(chunk_group + 2 * half)));
            acc_r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(folded), s, acc_r);
          }
          return acc_r;
        }
      };
      if (chunk_bytes == 64) {
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[r] = row_chunk(r, w + r * row_bytes + k / 2, acc[r]);
      } else {  // the last chunk of a row whose K is not a multiple of 128: copy, don't overread
        for (int r = 0; r < NR; ++r) {
          alignas(32) uint8_t tail[64] = {};
          std::memcpy(tail, w + r * row_bytes + k / 2, static_cast<size_t>(chunk_bytes));
          acc[r] = row_chunk(r, tail, acc[r]);
        }
      }
    }
  }
  // The fp32 blocks (rows whose activations have them), the zero-point term, the bias.
  const uint8_t* fp32_block = L.fp32_block(ws, m);
  for (int r = 0; r < NR; ++r) {
    const uint16_t* sw = a.scales + (n0 + r) * groups;
    const uint8_t* zr = a.zeros ? a.zeros + (n0 + r) * groups : nullptr;
    float fp32_part = 0.0f;
    for (int64_t g = 0; g < groups && fp32_block[groups]; ++g) {
      if (!fp32_block[g]) continue;
      const float z = zr ? static_cast<float>(zr[g]) : static_cast<float>(kInt4SymmetricZero);
      fp32_part += dot_int4_fp32(w + r * row_bytes + g * G / 2, a.x + m * a.K + g * G, G, _cvtsh_ss(sw[g]), z);
    }
    const float bias = a.bias ? a.bias[n0 + r] : 0.0f;
    a.y[m * a.N + n0 + r] = Vec::sum(_mm256_sub_ps(acc[r], off[r])) + fp32_part + bias;
  }
}

}  // namespace cgq::cpu::CGQ_ISA::limbs_avx2
