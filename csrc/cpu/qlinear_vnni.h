// Integer-dot-product qlinear for the AVX-512 variant (needs AVX512-VNNI): included by
// qlinear_kernels.cpp in the avx512 translation unit only.
//
// Why: converting every weight to fp32 and FMA-ing makes a CPU GEMV ALU-bound far below memory
// bandwidth. ggml's answer is to quantize the activation row to int8 and use integer dot products
// (vpdpbusd: 64 u8 x s8 products per instruction), at the cost of activation precision. Here the
// activation is instead split *exactly enough* into three int8 "limbs" per block (limb_layout.h):
// anything with <= 21 significant bits relative to the block max is represented exactly. The
// result holds the same fp32-accumulation error bound as the float kernels
// (tests/test_qlinear.py), for about a third of the instructions.
//
// Weights enter vpdpbusd as the unsigned operand: int4 nibbles are 0..15 already; int8 is offset by
// +128 (xor 0x80). The offset (zero point) term z * sum(x_block) comes from per-block limb sums
// computed with the limbs, so it costs nothing per weight.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "common/qformat.h"
#include "cpu/limb_layout.h"
#include "cpu/prefetch.h"

namespace cgq::cpu::CGQ_ISA::vnni {

using limbs::kInt8Block;
using limbs::kLimbs;
using limbs::Layout;

inline __m512 round_nearest(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// max |x| and sum |x| over `len` activations.
struct BlockStats {
  float amax, abs_sum;
  BlockStats(const float* xb, int64_t len) {
    __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
    for (int64_t k = 0; k < len; k += 16) {
      const __mmask16 mask = (len - k >= 16) ? __mmask16(0xFFFF) : __mmask16((1u << (len - k)) - 1);
      const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, xb + k));
      vmax = _mm512_max_ps(vmax, v);
      vsum = _mm512_add_ps(vsum, v);  // unlike max, a sum keeps NaN and inf
    }
    amax = _mm512_reduce_max_ps(vmax);
    abs_sum = _mm512_reduce_add_ps(vsum);
  }
};

// The two-limb split of one block (limb_layout.h): q = round(256 x / s), h = q >> 8, l = q & 255.
inline void split_two_limbs(const float* xb, int64_t len, float amax, const Layout& L, limbs::RowOut& out,
                            int64_t b, int64_t k0) {
  const float s = amax / 127.0f;
  const __m512 inv256 = _mm512_set1_ps((1.0f / s) * 256.0f);  // 256 fl(1 / s), exact
  __m512i sum_q = _mm512_setzero_si512();
  for (int64_t k = 0; k < len; k += 16) {
    const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + k), inv256),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const int64_t pos = L.position(k0 + k);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.limb[0] + pos), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.limb[1] + pos),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(255))));
    sum_q = _mm512_add_epi32(sum_q, q);  // |q| <= 32513, so 128 of them fit
  }
  out.scales[b] = s * (1.0f / 256.0f);  // with the kernel's fold (H << 8) + L
  out.sums[b] = static_cast<float>(static_cast<double>(s) * static_cast<double>(_mm512_reduce_add_epi32(sum_q)) / 256.0);
}

// The three-limb split of one block (limb_layout.h) on its power-of-two scale 2^e.
inline void split_three_limbs(const float* xb, int64_t len, float amax, const Layout& L, limbs::RowOut& out,
                              int64_t b, int64_t k0) {
  const int e = limbs::block_exponent(amax);
  const __m512 inv = _mm512_set1_ps(::ldexpf(1.0f, -e));  // 2^-e, exact
  const __m512 c128 = _mm512_set1_ps(128.0f);
  __m512i sum_h = _mm512_setzero_si512(), sum_l = sum_h, sum_ll = sum_h;
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 mask = (len - k >= 16) ? __mmask16(0xFFFF) : __mmask16((1u << (len - k)) - 1);
    // For 2^-e beyond the fp32 range (denormal x), scale in two exact steps.
    __m512 t = _mm512_maskz_loadu_ps(mask, xb + k);
    if (e < -126) t = _mm512_mul_ps(_mm512_mul_ps(t, _mm512_set1_ps(::ldexpf(1.0f, 64))),
                                    _mm512_set1_ps(::ldexpf(1.0f, -e - 64)));
    else t = _mm512_mul_ps(t, inv);
    const __m512 h = round_nearest(t);
    const __m512 r1 = _mm512_mul_ps(_mm512_sub_ps(t, h), c128);
    const __m512 l = round_nearest(r1);
    const __m512 ll = round_nearest(_mm512_mul_ps(_mm512_sub_ps(r1, l), c128));
    const __m512i hi = _mm512_cvtps_epi32(h), li = _mm512_cvtps_epi32(l), lli = _mm512_cvtps_epi32(ll);
    const int64_t pos = L.position(k0 + k);
    _mm_mask_storeu_epi8(out.limb[0] + pos, mask, _mm512_cvtepi32_epi8(hi));
    _mm_mask_storeu_epi8(out.limb[1] + pos, mask, _mm512_cvtepi32_epi8(li));
    _mm_mask_storeu_epi8(out.limb[2] + pos, mask, _mm512_cvtepi32_epi8(lli));
    sum_h = _mm512_add_epi32(sum_h, hi);  // masked-off lanes loaded as 0
    sum_l = _mm512_add_epi32(sum_l, li);
    sum_ll = _mm512_add_epi32(sum_ll, lli);
  }
  out.scales[b] = ::ldexpf(1.0f, L.nibble_order ? e - 14 : e);  // int4: with the fold ((H << 7) + L) << 7) + LL
  out.sums[b] = limbs::limb_sum(_mm512_reduce_add_epi32(sum_h), _mm512_reduce_add_epi32(sum_l),
                            _mm512_reduce_add_epi32(sum_ll), e);
}

// Splits activation rows into limbs (limb_layout.h): two per element in the int4 chunks that
// allow it, else three. Runs once per qlinear call. Blocks that fail limbs::keeps_limbs are
// marked for the fp32 pass.
inline void prepare(const float* x, int64_t M, const Layout& L, uint8_t* ws) {
  limbs::prepare_rows(
      x, M, L, ws, [](const float* xb, int64_t len) { return BlockStats(xb, len); },
      [](auto&&... args) { split_two_limbs(args...); }, [](auto&&... args) { split_three_limbs(args...); });
}

// Combines the three limb accumulators of one block into fp32: H + L/128 + LL/128^2.
inline __m512 combine(__m512i h, __m512i l, __m512i ll) {
  const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ll), _mm512_set1_ps(1.0f / 128.0f), _mm512_cvtepi32_ps(l));
  return _mm512_fmadd_ps(f, _mm512_set1_ps(1.0f / 128.0f), _mm512_cvtepi32_ps(h));
}

// fp32 dot product of `len` activations with int8 weights (unscaled), for blocks marked fp32.
inline float dot_int8_fp32(const int8_t* w, const float* x, int64_t len) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 mask = (len - k >= 16) ? __mmask16(0xFFFF) : __mmask16((1u << (len - k)) - 1);
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + k)));
    acc = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + k), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// fp32 dot product of one int4 group (packed bytes of its 32-blocks, natural-order x) with the
// dequantized weights (q - zero) * scale, for blocks marked fp32.
inline float dot_int4_fp32(const uint8_t* w, const float* x, int64_t len, float scale, float zero) {
  const __m512 s = _mm512_set1_ps(scale), offset = _mm512_set1_ps(-zero * scale);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < len; k += kInt4BlockElems) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    const __m512 w_lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s, offset);
    const __m512 w_hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s, offset);
    acc = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x + k), acc);
    acc = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x + k + 16), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Low `n` bits set, n in [0, 64].
inline __mmask64 low_bytes(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << (n > 0 ? n : 0)) - 1; }

// y[m0 .. m0+MR, n0 .. n0+NR] for int8 weights. Each activation block (128 elements, two 64-byte
// loads per weight row) gets fresh integer accumulators that are folded into the fp32 ones at
// its end; keeping the integer ones across a loop instead made GCC spill all twelve to the stack
// (a load and a store per vpdpbusd).
template <int MR, int NR>
void int8_tile(const QLinearArgs& a, const Layout& L, const uint8_t* ws, int64_t m0, int64_t n0) {
  static_assert(kInt8Block == 128, "two 64-byte steps per block");
  const int8_t* w = static_cast<const int8_t*>(a.qweight) + n0 * a.K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < L.n_blocks; ++b) {
    const int64_t k = b * kInt8Block;
    // Masked loads: the tail of the last row must not read past the weight buffer. Lanes past K
    // load 0 -> 128 after the flip, but meet zero limbs.
    const __mmask64 mask0 = low_bytes(a.K - k), mask1 = low_bytes(a.K - k - 64);
    prefetch_next_tile<NR, kInt8Block>(w + kLimbTilesAhead * NR * a.K, a.K, k);
    __m512i xl[MR][kLimbs][2];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < kLimbs; ++j) {
        xl[m][j][0] = _mm512_load_si512(L.limb(ws, m0 + m, j) + k);
        xl[m][j][1] = _mm512_load_si512(L.limb(ws, m0 + m, j) + k + 64);
      }
    __m512 s[MR];
    for (int m = 0; m < MR; ++m) s[m] = _mm512_set1_ps(L.block_scale(ws, m0 + m)[b]);
    for (int r = 0; r < NR; ++r) {
      const __m512i w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask0, w + r * a.K + k), flip);
      const __m512i w1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask1, w + r * a.K + k + 64), flip);
      for (int m = 0; m < MR; ++m) {
        const __m512i zero = _mm512_setzero_si512();
        const __m512i ih = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w0, xl[m][0][0]), w1, xl[m][0][1]);
        const __m512i il = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w0, xl[m][1][0]), w1, xl[m][1][1]);
        const __m512i ill = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w0, xl[m][2][0]), w1, xl[m][2][1]);
        acc[m][r] = _mm512_fmadd_ps(combine(ih, il, ill), s[m], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    float offset_sum = 0.0f;  // sum over blocks of 2^e * sum(x_hat): the +128 offset's contribution
    const float* sums = L.block_sum(ws, m0 + m);
    for (int64_t b = 0; b < L.n_blocks; ++b) offset_sum += sums[b];
    float fp32_part[NR] = {};
    const uint8_t* fp32_block = L.fp32_block(ws, m0 + m);
    for (int64_t b = 0; b < L.n_blocks && fp32_block[L.n_blocks]; ++b) {
      if (!fp32_block[b]) continue;
      const int64_t k0 = b * kInt8Block, len = (a.K - k0 < kInt8Block) ? a.K - k0 : kInt8Block;
      for (int r = 0; r < NR; ++r) fp32_part[r] += dot_int8_fp32(w + r * a.K + k0, a.x + (m0 + m) * a.K + k0, len);
    }
    for (int r = 0; r < NR; ++r) {
      const float scale = _cvtsh_ss(a.scales[n0 + r]);
      const float bias = a.bias ? a.bias[n0 + r] : 0.0f;
      a.y[(m0 + m) * a.N + n0 + r] =
          (_mm512_reduce_add_ps(acc[m][r]) - 128.0f * offset_sum + fp32_part[r]) * scale + bias;
    }
  }
}

// One 128-element chunk of NR rows of W (nibbles lo, hi) against one row of x's three limbs at
// x0, x1, x2: the fold ((H << 7) + L) << 7) + LL per row, into f. The rows' chains run side by
// side, limb by limb, the limbs read straight from L1 as memory operands (that frees six
// registers: the accumulators were spilled before).
template <int NR>
__attribute__((always_inline)) inline void fold_three_limbs(const __m512i* lo, const __m512i* hi, const int8_t* x0,
                                                            const int8_t* x1, const int8_t* x2, __m512i* f) {
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], _mm512_load_si512(x0));
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(f[r], hi[r], _mm512_load_si512(x0 + 64));
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(_mm512_slli_epi32(f[r], 7), lo[r], _mm512_load_si512(x1));
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(f[r], hi[r], _mm512_load_si512(x1 + 64));
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(_mm512_slli_epi32(f[r], 7), lo[r], _mm512_load_si512(x2));
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(f[r], hi[r], _mm512_load_si512(x2 + 64));
}

// The same against two limbs (h at x0, the unsigned l at x1): (H << 8) + L, four vpdpbusd and one
// shift per row instead of six and two. The weights are the unsigned operand against h and the
// signed one against l (nibbles 0..15 are both). |H| <= 15 * 128 * 8 and L <= 255 * 15 * 8, so
// the fold is below 2^22 and converts to fp32 exactly.
template <int NR>
__attribute__((always_inline)) inline void fold_two_limbs(const __m512i* lo, const __m512i* hi, const int8_t* x0,
                                                          const int8_t* x1, __m512i* f) {
  const __m512i l0 = _mm512_load_si512(x1), l1 = _mm512_load_si512(x1 + 64);
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], _mm512_load_si512(x0));
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(f[r], hi[r], _mm512_load_si512(x0 + 64));
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(_mm512_slli_epi32(f[r], 8), l0, lo[r]);
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) f[r] = _mm512_dpbusd_epi32(f[r], l1, hi[r]);
}

// y[m0 .. m0+MR, n0 .. n0+NR] for int4 weights; the activation blocks are the weight groups.
// Work goes in chunks of 128 elements (64 bytes of weights): a chunk holds 128 / G groups, and
// lane i of a dot-product vector covers bytes 4i..4i+3, i.e. 32-block i / 4, so lane quarters
// (G = 32), halves (G = 64) or the whole vector (G = 128) belong to one group.
//
// The group size is a template parameter, so the lane arithmetic is constant. The three limbs'
// dot products of a chunk are folded in int32 before the single conversion, as
// ((H << 7) + L) << 7) + LL: each limb's vpdpbusd pair starts from the shifted sum of the limbs
// before it, so the fold costs two shifts and no adds. A lane sums 8 products per
// chunk, |H| <= 15 * 127 * 8 < 2^14, so the result, < 2^29 in magnitude, cannot overflow.
//
// Chunks held as two limbs (limb_layout.h) fold as (H << 8) + L (fold_two_limbs). kMode says
// whether the tile's rows hold only three-limb chunks, only two-limb ones, or a mix, which costs
// a branch per chunk and row of x.
template <int G, int MR, int NR, limbs::LimbMode kMode>
void int4_tile(const QLinearArgs& a, const Layout& L, const uint8_t* ws, int64_t m0, int64_t n0) {
  static_assert(G == 32 || G == 64 || G == 128, "int4 group size");
  const int64_t groups = a.K / G;
  const int64_t row_bytes = a.K / 2;
  const uint8_t* w = static_cast<const uint8_t*>(a.qweight) + n0 * row_bytes;
  // Lane -> group-in-chunk index: a lane covers 8 elements, so G / 8 lanes share a group.
  const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               G == 32 ? 2 : (G == 64 ? 3 : 4));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][NR];
  // off: the zero-point term, sum over groups of scale * zero * 2^e * sum(x_hat), per lane.
  __m512 off[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = off[m][r] = _mm512_setzero_ps();
  const uint8_t* two_limb_chunk[MR];
  for (int m = 0; m < MR; ++m) two_limb_chunk[m] = L.two_limb_chunk(ws, m0 + m);

  // Scales go 16 groups at a time: one vector of weight scale x activation scale per (row of x,
  // row of W), from which each chunk takes its groups' lanes with one permute (G = 128: one
  // broadcast). Fetching and multiplying the scales chunk by chunk instead cost four of a chunk's
  // ~17 instructions. Written as NR chains side by side with the limbs as memory operands and the
  // G = 128 broadcast, a chunk-row with weights in L2 takes less time. The zero-point term is
  // gathered from the same scale loads (it had its own pass over the scales per row). Timings:
  // docs/cpu-kernels.md, "Inner loops".
  for (int64_t g_base = 0; g_base < groups; g_base += 16) {
    const int64_t span = (groups - g_base < 16) ? groups - g_base : 16;
    const __mmask16 span_mask = static_cast<__mmask16>((1u << span) - 1);
    // Per row of x: activation block scales (with the limb fold, limb_layout.h), and the blocks'
    // sums for the zero-point term.
    __m512 sx[MR], sums[MR];
    for (int m = 0; m < MR; ++m) {
      sx[m] = _mm512_maskz_loadu_ps(span_mask, L.block_scale(ws, m0 + m) + g_base);
      sums[m] = _mm512_maskz_loadu_ps(span_mask, L.block_sum(ws, m0 + m) + g_base);
    }
    __m512 scale[MR][NR];
    for (int r = 0; r < NR; ++r) {
      const __m512 sw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(span_mask, a.scales + (n0 + r) * groups + g_base));
      const __m512 z = a.zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                     _mm_maskz_loadu_epi8(span_mask, a.zeros + (n0 + r) * groups + g_base)))
                               : _mm512_set1_ps(static_cast<float>(kInt4SymmetricZero));
      const __m512 sz = _mm512_mul_ps(sw, z);
      for (int m = 0; m < MR; ++m) {
        scale[m][r] = _mm512_mul_ps(sw, sx[m]);
        off[m][r] = _mm512_fmadd_ps(sz, sums[m], off[m][r]);
      }
    }
    // G = 128: a chunk is one group, whose scale the FMA broadcasts from memory (no permute, no
    // register held per row).
    alignas(64) float scale_mem[MR][NR][16];
    if constexpr (G == 128)
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) _mm512_store_ps(scale_mem[m][r], scale[m][r]);
    // The span's accumulators as locals: updating acc itself, GCC stored all MR x NR of them to
    // the stack after every chunk.
    __m512 acc_span[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc_span[m][r] = acc[m][r];
    const int64_t k_end = (g_base + span) * G;
    for (int64_t k = g_base * G; k < k_end; k += 128) {
      // Only a chunk of G < 128 groups at the end of a row can be short (K is a multiple of G).
      const int64_t chunk_bytes = (G == 128 || k_end - k >= 128) ? 64 : (k_end - k) / 2;
      const __mmask64 byte_mask = chunk_bytes == 64 ? ~__mmask64(0) : ((__mmask64(1) << chunk_bytes) - 1);
      prefetch_next_tile<NR, 64>(w + kLimbTilesAhead * NR * row_bytes, row_bytes, k / 2);
      const __m512i lanes = _mm512_add_epi32(lane_group, _mm512_set1_epi32(static_cast<int>(k / G - g_base)));
      __m512i lo[NR], hi[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        const __m512i raw = _mm512_maskz_loadu_epi8(byte_mask, w + r * row_bytes + k / 2);
        lo[r] = _mm512_and_si512(raw, nibble);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      }
      for (int m = 0; m < MR; ++m) {
        const int8_t* x0 = L.limb(ws, m0 + m, 0) + k;
        const int8_t* x1 = L.limb(ws, m0 + m, 1) + k;
        const int8_t* x2 = L.limb(ws, m0 + m, 2) + k;
        __m512i f[NR];
        if constexpr (kMode == limbs::kTwoLimbs) fold_two_limbs<NR>(lo, hi, x0, x1, f);
        else if constexpr (kMode == limbs::kThreeLimbs) fold_three_limbs<NR>(lo, hi, x0, x1, x2, f);
        else if (two_limb_chunk[m][k / 128]) fold_two_limbs<NR>(lo, hi, x0, x1, f);
        else fold_three_limbs<NR>(lo, hi, x0, x1, x2, f);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          __m512 sc;
          if constexpr (G == 128) sc = _mm512_set1_ps(scale_mem[m][r][k / G - g_base]);
          else sc = _mm512_permutexvar_ps(lanes, scale[m][r]);
          acc_span[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(f[r]), sc, acc_span[m][r]);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] = acc_span[m][r];
  }
  for (int r = 0; r < NR; ++r) {
    const float bias = a.bias ? a.bias[n0 + r] : 0.0f;
    for (int m = 0; m < MR; ++m) {
      float fp32_part = 0.0f;
      const uint8_t* fp32_block = L.fp32_block(ws, m0 + m);
      for (int64_t g = 0; g < groups && fp32_block[groups]; ++g) {
        if (!fp32_block[g]) continue;
        const int64_t idx = (n0 + r) * groups + g;
        const float z = a.zeros ? static_cast<float>(a.zeros[idx]) : static_cast<float>(kInt4SymmetricZero);
        fp32_part += dot_int4_fp32(w + r * row_bytes + g * G / 2, a.x + (m0 + m) * a.K + g * G, G,
                                   _cvtsh_ss(a.scales[idx]), z);
      }
      a.y[(m0 + m) * a.N + n0 + r] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[m][r], off[m][r])) + fp32_part + bias;
    }
  }
}

}  // namespace cgq::cpu::CGQ_ISA::vnni
