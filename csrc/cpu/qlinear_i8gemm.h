// The int8-activation GEMM for prompts (QLinearArgs::int8_activations): x is quantized to int8 on
// the fly, one scale per row and 128 elements of K, and multiplied against the int8 or int4
// weights with integer dot products (AVX-512-VNNI vpdpbusd: 64 products per instruction; AVX2
// vpmaddubsw + vpmaddwd: 32), where the fp32 GEMM (qlinear_gemm.h) pays one FMA per 16 (8)
// products. Prompts are compute-bound, so this is the lever the prompt pass has; the price is the
// activations' rounding, ~2^-8 of each 128-element chunk's largest magnitude per element, which
// the fp32 path does not pay. It is opt-in per call (codegen_q.kernels.ops.qlinear's gemm_dtype=int8).
//
// The contract, which the tests check with exact integer sums:
//   for each row m of x and chunk c of kChunk elements of K:
//     amax = max |x[m, c]|, inv = 127 / amax (float32), sx[m, c] = amax / 127 (float32),
//     q[m, k] = round_half_even(x[m, k] * inv)   (q = 0 and sx = 0 where inv is not finite, i.e.
//                                                 amax is 0 or below ~4e-37; a chunk holding NaN
//                                                 or inf gets sx = NaN: its row's outputs are NaN)
//   y[m, n] = bias[n] + rowscale[n] * sum over weight groups g of
//             sw[n, g] * sx[m, c(g)] * sum_{k in g} q[m, k] * (w_q[n, k] - z[n, g])
// with w_q, z, sw the stored codes, zero points and scales (int8: z = 0, sw = 1 and the row scale
// applied at the end, as in the fp32 path). Each group's integer sum is exact; it is converted to
// float exactly (|sum| < 2^24) and the groups are summed in fp32.
//
// Layout. Lanes run along the rows of x, as in the fp32 GEMM: quantized x is stored per tile of
// kMT rows as [K/4][kMT][4 bytes], so one vector load gives 4 consecutive k of kLanes rows, and a
// weight's 4 bytes at the same k are broadcast against it. The weights of NR output columns and
// one chunk are unpacked once into a small panel of bytes and used against every tile of x of the
// pass (n tiles outside, x tiles inside), so each weight byte is read from memory once per pass.
//
// Operand signs. vpdpbusd and vpmaddubsw multiply unsigned by signed bytes. x is signed; the
// weight side is made unsigned: int4 codes are 0..15 already; int8 codes are offset by 128 on
// AVX-512 (z = 128 folds the offset out, exactly as an int4 zero point does). On AVX2 the int16
// pair sums of vpmaddubsw would saturate with 255 x 127, so int8 takes |w| against x with w's
// sign (vpsignb), at most 2 x 128 x 127 = 32512 per pair: exact, z = 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/qformat.h"
#include "cpu/gelu.h"
#include "cpu/prefetch.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA::i8gemm {

// Elements of K per activation scale: a multiple of every int4 group size.
constexpr int64_t kChunk = 128;

#if defined(CGQ_ISA_AVX512)
constexpr int kLanes = 16;  // int32 lanes of a zmm: rows of x per vector
constexpr int kMV = 2;      // vectors of x rows per tile
// NR output columns x kMV vectors of accumulators: 24 of 32 zmm, leaving room for x and the
// broadcast weight.
template <bool kInt4> constexpr int kNR = 12;
#elif defined(CGQ_ISA_AVX2)
constexpr int kLanes = 8;
constexpr int kMV = 2;
// 16 ymm: 10 accumulators, x (2), the broadcast weight and a product; int8 also |w| and the ones
// of vpmaddwd.
template <bool kInt4> constexpr int kNR = 5;
#else
constexpr int kLanes = 1;
constexpr int kMV = 8;
template <bool kInt4> constexpr int kNR = 4;
#endif
constexpr int kMT = kLanes * kMV;  // rows of x per tile

static_assert(kMV == 2 || kLanes == 1, "the step helpers below take two vectors of x");

// The int8 weights' offset to unsigned: 128 where vpdpbusd takes them as unsigned bytes.
#if defined(CGQ_ISA_AVX512)
constexpr int kInt8Offset = 128;
#else
constexpr int kInt8Offset = 0;
#endif

// Whether a call takes this path: asked for, and whole chunks of K. Any number of rows, fewer than
// a tile too (the tile is padded with zero rows): a row's result must not depend on how many rows
// came with it, or a prompt's output would change with the other requests it is batched with.
inline bool applies(const QLinearArgs& a) { return a.int8_activations && a.K % kChunk == 0; }

// The workspace qlinear_prepare fills: per tile of kMT rows (the last one padded with zero rows),
// the quantized rows [K/4][kMT][4], then sx [K/kChunk][kMT] and the sums of q per weight group
// [K/G][kMT], both float32 (the sums are integers below 2^24, so exact).
struct Layout {
  int64_t K, G, tiles;
  int64_t q_bytes() const { return K * kMT; }
  int64_t sx_floats() const { return K / kChunk * kMT; }
  int64_t qsum_floats() const { return K / G * kMT; }
  int64_t tile_bytes() const {
    const int64_t b = q_bytes() + 4 * (sx_floats() + qsum_floats());
    return (b + 63) / 64 * 64;
  }
  const int8_t* q(const uint8_t* ws, int64_t t) const { return reinterpret_cast<const int8_t*>(ws + t * tile_bytes()); }
  const float* sx(const uint8_t* ws, int64_t t) const {
    return reinterpret_cast<const float*>(ws + t * tile_bytes() + q_bytes());
  }
  const float* qsum(const uint8_t* ws, int64_t t) const { return sx(ws, t) + sx_floats(); }
};

inline Layout layout(const QLinearArgs& a, bool int4) {
  return {a.K, int4 ? a.group_size : kChunk, (a.M + kMT - 1) / kMT};
}

inline int64_t workspace_bytes(const QLinearArgs& a, bool int4) {
  const Layout L = layout(a, int4);
  return L.tiles * L.tile_bytes();
}

// Largest |x| of a chunk, or NaN when the chunk holds NaN or inf.
inline float chunk_amax(const float* x) {
#if defined(CGQ_ISA_AVX512)
  __m512 m = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512i exp = _mm512_set1_epi32(0x7f800000);
  for (int64_t k = 0; k < kChunk; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exp), exp);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  return bad ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m);
#elif defined(CGQ_ISA_AVX2)
  __m256 m = _mm256_setzero_ps();
  __m256i bad = _mm256_setzero_si256();
  const __m256i exp = _mm256_set1_epi32(0x7f800000);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t k = 0; k < kChunk; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp), exp));
    m = _mm256_max_ps(m, _mm256_and_ps(v, abs_mask));
  }
  return _mm256_testz_si256(bad, bad) ? Vec::reduce_max(m) : std::numeric_limits<float>::quiet_NaN();
#else
  float amax = 0.0f;
  for (int64_t k = 0; k < kChunk; ++k) {
    if (!std::isfinite(x[k])) return std::numeric_limits<float>::quiet_NaN();
    amax = std::fmax(amax, std::fabs(x[k]));
  }
  return amax;
#endif
}

// q[k] = round half even (x[k] * inv) for one chunk (the vector conversions round in the default
// MXCSR mode, round-to-nearest-even, as std::nearbyint does).
inline void chunk_quantize(const float* x, float inv, int8_t* q) {
#if defined(CGQ_ISA_AVX512)
  const __m512 s = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < kChunk; k += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), s))));
#elif defined(CGQ_ISA_AVX2)
  const __m256 s = _mm256_set1_ps(inv);
  for (int64_t k = 0; k < kChunk; k += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), s));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), pack_i32x16_to_i8(a, b));
  }
#else
  for (int64_t k = 0; k < kChunk; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
#endif
}

// The sum of n int8 values (n a multiple of 16; exact in int32).
inline int32_t byte_sum(const int8_t* q, int64_t n) {
#if defined(CGQ_ISA_AVX512)
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 16)
    acc = _mm512_add_epi32(acc, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
  return _mm512_reduce_add_epi32(acc);
#elif defined(CGQ_ISA_AVX2)
  __m256i acc = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < n; k += 16)
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))), ones));
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
#else
  int32_t sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += q[k];
  return sum;
#endif
}

// One chunk of x by the contract above: its codes into q, its scale sx returned.
inline float quantize_chunk(const float* x, int8_t* q) {
  const float amax = chunk_amax(x);
  const float inv = 127.0f / amax;
  if (amax > 0.0f && inv <= std::numeric_limits<float>::max()) {
    chunk_quantize(x, inv, q);
    return amax / 127.0f;
  }
  // Zero or below ~4e-37 (no finite inverse): zeros; NaN / inf: sx = NaN, NaN outputs.
  std::memset(q, 0, kChunk);
  return amax == amax ? 0.0f : std::numeric_limits<float>::quiet_NaN();
}

// Quantizes the tiles [t_begin, t_end) of x into the workspace; tiles are independent, so the
// dispatcher spreads them over threads. Every |x * inv| <= 127 up to rounding, so the values fit
// int8 without clamping.
inline void prepare(const QLinearArgs& a, bool int4, uint8_t* ws, int64_t t_begin, int64_t t_end) {
  const Layout L = layout(a, int4);
  const int64_t K = a.K;
  alignas(64) int8_t row[kChunk];
  for (int64_t t = t_begin; t < t_end; ++t) {
    int8_t* q = reinterpret_cast<int8_t*>(ws + t * L.tile_bytes());
    float* sx = reinterpret_cast<float*>(ws + t * L.tile_bytes() + L.q_bytes());
    float* qsum = sx + L.sx_floats();
    for (int i = 0; i < kMT; ++i) {
      const int64_t m = t * kMT + i;
      const float* x = a.x + m * K;
      for (int64_t c = 0; c < K / kChunk; ++c) {
        if (m < a.M) {
          sx[c * kMT + i] = quantize_chunk(x + c * kChunk, row);
        } else {  // rows past M: zeros
          std::memset(row, 0, kChunk);
          sx[c * kMT + i] = 0.0f;
        }
        for (int64_t g = 0; g < kChunk / L.G; ++g)
          qsum[(c * kChunk / L.G + g) * kMT + i] = static_cast<float>(byte_sum(row + g * L.G, L.G));
        int8_t* dst = q + (c * kChunk / 4 * kMT + i) * 4;
        for (int64_t k = 0; k < kChunk; k += 4) std::memcpy(dst + k / 4 * kMT * 4, row + k, 4);
      }
    }
  }
}

// One chunk of NR output columns as unsigned bytes (see "Operand signs"), with each weight
// group's zero point and scale.
template <bool kInt4, int NR>
struct Panel {
  alignas(64) uint8_t w[NR][kChunk];
  float z[NR][kChunk / 32];
  float s[NR][kChunk / 32];
};

template <bool kInt4, int NR>
inline void fill_panel(const QLinearArgs& a, int64_t n0, int64_t c, Panel<kInt4, NR>& p) {
  const int64_t k0 = c * kChunk;
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r;
    if constexpr (kInt4) {
      const int64_t G = a.group_size, groups = a.K / G;
      const uint8_t* src = static_cast<const uint8_t*>(a.qweight) + n * (a.K / 2) + k0 / 2;
      for (int64_t b = 0; b < kChunk / kInt4BlockElems; ++b) {
        for (int j = 0; j < kInt4BlockBytes; ++j) {
          const uint8_t byte = src[b * kInt4BlockBytes + j];
          p.w[r][b * kInt4BlockElems + j] = byte & 0x0F;
          p.w[r][b * kInt4BlockElems + kInt4BlockBytes + j] = byte >> 4;
        }
      }
      for (int64_t j = 0; j < kChunk / G; ++j) {
        const int64_t g = k0 / G + j;
        p.z[r][j] = a.zeros ? static_cast<float>(a.zeros[n * groups + g]) : static_cast<float>(kInt4SymmetricZero);
        p.s[r][j] = Vec::half(a.scales[n * groups + g]);
      }
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(a.qweight) + n * a.K + k0;
      for (int64_t k = 0; k < kChunk; ++k) p.w[r][k] = static_cast<uint8_t>(src[k] + kInt8Offset);
      p.z[r][0] = static_cast<float>(kInt8Offset);
      p.s[r][0] = 1.0f;
    }
  }
}

#if defined(CGQ_ISA_AVX512)
using Acc = __m512i;
// acc += per lane, the 4 products of unsigned bytes of w and signed bytes of x. In asm because
// GCC's builtin for it copied every accumulator to a second register and to the stack each step
// (the tied accumulator operand defeats its register coalescing).
inline void dpbusd(Acc& acc, __m512i w, __m512i x) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x)); }
inline Acc acc_zero() { return _mm512_setzero_si512(); }
inline Acc load_x(const int8_t* p) { return _mm512_load_si512(p); }
inline __m512 acc_to_float(Acc v) { return _mm512_cvtepi32_ps(v); }
#elif defined(CGQ_ISA_AVX2)
using Acc = __m256i;
// One weight's step against both vectors of x, in asm for the same reason as dpbusd above: left
// to itself GCC broadcast all NR weights and ran all products first, and with 16 registers it
// spilled the accumulators every step. Here each product is added as soon as it is made.
// int4: sums[v] += int16 pair sums of (w bytes, unsigned) x (x bytes, signed).
inline void maddubs_add16(__m256i& a0, __m256i& a1, const uint8_t* w4, __m256i x0, __m256i x1) {
  __m256i w, t;
  asm("vpbroadcastd %[m], %[w]\n\t"
      "vpmaddubsw %[x0], %[w], %[t]\n\t"
      "vpaddw %[t], %[a0], %[a0]\n\t"
      "vpmaddubsw %[x1], %[w], %[t]\n\t"
      "vpaddw %[t], %[a1], %[a1]"
      : [a0] "+x"(a0), [a1] "+x"(a1), [w] "=&x"(w), [t] "=&x"(t)
      : [m] "m"(*reinterpret_cast<const int32_t*>(w4)), [x0] "x"(x0), [x1] "x"(x1));
}
// int8: acc[v] += int32 sums of w x, as |w| (unsigned) x (x with w's sign): exact for w = -128.
inline void sign_madd_add32(__m256i& a0, __m256i& a1, const uint8_t* w4, __m256i x0, __m256i x1, __m256i ones) {
  __m256i w, wabs, t;
  asm("vpbroadcastd %[m], %[w]\n\t"
      "vpabsb %[w], %[wabs]\n\t"
      "vpsignb %[w], %[x0], %[t]\n\t"
      "vpmaddubsw %[t], %[wabs], %[t]\n\t"
      "vpmaddwd %[ones], %[t], %[t]\n\t"
      "vpaddd %[t], %[a0], %[a0]\n\t"
      "vpsignb %[w], %[x1], %[t]\n\t"
      "vpmaddubsw %[t], %[wabs], %[t]\n\t"
      "vpmaddwd %[ones], %[t], %[t]\n\t"
      "vpaddd %[t], %[a1], %[a1]"
      : [a0] "+x"(a0), [a1] "+x"(a1), [w] "=&x"(w), [wabs] "=&x"(wabs), [t] "=&x"(t)
      : [m] "m"(*reinterpret_cast<const int32_t*>(w4)), [x0] "x"(x0), [x1] "x"(x1), [ones] "x"(ones));
}
inline Acc acc_zero() { return _mm256_setzero_si256(); }
inline Acc load_x(const int8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256 acc_to_float(Acc v) { return _mm256_cvtepi32_ps(v); }
#else
using Acc = int32_t;
inline Acc acc_zero() { return 0; }
#endif

// Integer sums of one weight group (G elements from k_in_chunk) of NR columns against one tile of
// x, then the group's float epilogue into `total` ([NR][kMT]).
// G is a template argument so that every loop here has a constant trip count: with a run-time G,
// GCC kept the accumulators on the stack.
template <bool kInt4, int NR, int G>
inline void group(const Panel<kInt4, NR>& p, int64_t k_in_chunk, int j, const int8_t* xq, const float* sx,
                  const float* qsum, float* total) {
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
  Acc acc[NR][kMV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kMV; ++v) acc[r][v] = acc_zero();
#if defined(CGQ_ISA_AVX2)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  auto x_step = [&](int64_t s, Acc* xv) {
#pragma GCC unroll 4
    for (int v = 0; v < kMV; ++v) xv[v] = load_x(xq + s * kMT * 4 + v * kLanes * 4);
  };
#if defined(CGQ_ISA_AVX2)
  if constexpr (kInt4) {
    // vpmaddubsw's int16 pair sums are at most 2 x 15 x 127 = 3810 here, so 8 steps add up in
    // int16 (30480 < 32767) before one vpmaddwd widens them: half the multiplies of widening
    // every step.
    for (int64_t s0 = 0; s0 < G / 4; s0 += 8) {
      __m256i sum16[NR][kMV];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < kMV; ++v) sum16[r][v] = _mm256_setzero_si256();
      for (int64_t s = s0; s < s0 + 8; ++s) {
        Acc xv[kMV];
        x_step(s, xv);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) maddubs_add16(sum16[r][0], sum16[r][1], &p.w[r][k_in_chunk + s * 4], xv[0], xv[1]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < kMV; ++v) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(sum16[r][v], ones));
    }
  } else
#endif
  {
    for (int64_t s = 0; s < G / 4; ++s) {
      Acc xv[kMV];
      x_step(s, xv);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
#if defined(CGQ_ISA_AVX512)
        int32_t w4;
        std::memcpy(&w4, &p.w[r][k_in_chunk + s * 4], 4);
        const __m512i wb = _mm512_set1_epi32(w4);
#pragma GCC unroll 4
        for (int v = 0; v < kMV; ++v) dpbusd(acc[r][v], wb, xv[v]);
#else
        sign_madd_add32(acc[r][0], acc[r][1], &p.w[r][k_in_chunk + s * 4], xv[0], xv[1], ones);
#endif
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < kMV; ++v) {
    const Vec::R sxv = Vec::load(sx + v * kLanes);
    const Vec::R qsv = Vec::load(qsum + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      // (sum q*w - z * sum q) is exact in fp32: both are integers below 2^24.
      const Vec::R dot = Vec::fma(Vec::set1(-p.z[r][j]), qsv, acc_to_float(acc[r][v]));
      float* tv = total + r * kMT + v * kLanes;
      Vec::store(tv, Vec::fma(dot, Vec::mul(sxv, Vec::set1(p.s[r][j])), Vec::load(tv)));
    }
  }
#else
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < kMT; ++i) {
      int32_t sum = 0;
      for (int64_t s = 0; s < G / 4; ++s)
        for (int b = 0; b < 4; ++b) {
          const int32_t w = kInt4 ? p.w[r][k_in_chunk + s * 4 + b] : static_cast<int8_t>(p.w[r][k_in_chunk + s * 4 + b]);
          sum += w * xq[(s * kMT + i) * 4 + b];
        }
      const float dot = static_cast<float>(sum) - p.z[r][j] * qsum[i];
      total[r * kMT + i] += dot * (sx[i] * p.s[r][j]);
    }
  }
#endif
}

// Output columns [n0, n0 + NR) for every row of x.
template <bool kInt4, int NR, int G>
void columns(const QLinearArgs& a, const uint8_t* ws, int64_t n0, float* totals) {
  const Layout L = layout(a, kInt4);
  std::memset(totals, 0, sizeof(float) * static_cast<size_t>(L.tiles * NR * kMT));
  Panel<kInt4, NR> p;
  // The panel reads its NR weight rows as NR streams of one line per chunk, a few lines long on
  // short rows: too short for the hardware prefetchers, so with few tiles of x (decode batches) the
  // panel waited on memory most of its time. Prefetch as the GEMVs do (prefetch.h), two column
  // blocks ahead.
  constexpr int64_t kChunkBytes = kInt4 ? kChunk / 2 : kChunk;
  const int64_t row_bytes = kInt4 ? a.K / 2 : a.K;
  const char* ahead = static_cast<const char*>(a.qweight) + (n0 + kLimbTilesAhead * NR) * row_bytes;
  for (int64_t c = 0; c < a.K / kChunk; ++c) {
    prefetch_next_tile<NR, kChunkBytes>(ahead, row_bytes, c * kChunkBytes);
    fill_panel<kInt4, NR>(a, n0, c, p);
    for (int64_t t = 0; t < L.tiles; ++t) {
      const int8_t* xq = L.q(ws, t) + c * kChunk * kMT;
      const float* sx = L.sx(ws, t) + c * kMT;
      const float* qsum = L.qsum(ws, t) + c * (kChunk / G) * kMT;
      float* total = totals + t * NR * kMT;
      for (int j = 0; j < kChunk / G; ++j)
        group<kInt4, NR, G>(p, j * G, j, xq + j * G * kMT, sx, qsum + j * kMT, total);
    }
  }
  // Epilogue on the totals while they are in cache: the int8 weights' row scale, the bias and
  // gelu, kMT rows of one column at a time; then the copy into y's rows.
  float scale[NR], bias[NR];
  for (int r = 0; r < NR; ++r) {
    scale[r] = kInt4 ? 1.0f : Vec::half(a.scales[n0 + r]);
    bias[r] = a.bias ? a.bias[n0 + r] : 0.0f;
  }
  for (int64_t t = 0; t < L.tiles; ++t) {
    for (int r = 0; r < NR; ++r) {
      float* tv = totals + (t * NR + r) * kMT;
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
      for (int64_t i = 0; i < kMT; i += kLanes) {
        const Vec::R v = Vec::fma(Vec::load(tv + i), Vec::set1(scale[r]), Vec::set1(bias[r]));
        Vec::store(tv + i, a.gelu ? gelu_vec(v) : v);
      }
#else
      for (int64_t i = 0; i < kMT; ++i) tv[i] = tv[i] * scale[r] + bias[r];
      if (a.gelu) gelu_inplace(tv, kMT);
#endif
    }
  }
  for (int64_t m = 0; m < a.M; ++m) {
    const float* total = totals + (m / kMT) * NR * kMT + m % kMT;
    float* y = a.y + m * a.N + n0;
    for (int r = 0; r < NR; ++r) y[r] = total[r * kMT];
  }
}

// Output columns [n_begin, n_end): tiles of kNR columns, then 4, then 1.
template <bool kInt4, int G>
void run_group(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  constexpr int NR = kNR<kInt4>;
  const auto* ws = static_cast<const uint8_t*>(a.workspace);
  thread_local std::vector<float> totals;
  totals.resize(static_cast<size_t>(layout(a, kInt4).tiles * NR * kMT));
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) columns<kInt4, NR, G>(a, ws, n, totals.data());
  for (; n + 4 <= n_end; n += 4) columns<kInt4, 4, G>(a, ws, n, totals.data());
  for (; n < n_end; ++n) columns<kInt4, 1, G>(a, ws, n, totals.data());
}

// f(std::integral_constant<int, G>{}) for an int4 weight's group size (32, 64 or 128), so the
// kernels can take G as a template argument.
template <class F>
void with_group_size(int64_t group_size, F&& f) {
  switch (group_size) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}

template <bool kInt4>
void run(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  if constexpr (!kInt4) return run_group<false, kChunk>(a, n_begin, n_end);
  with_group_size(a.group_size, [&](auto g) { run_group<true, decltype(g)::value>(a, n_begin, n_end); });
}

}  // namespace cgq::cpu::CGQ_ISA::i8gemm
