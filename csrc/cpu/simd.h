// One small vector vocabulary per instruction set, so the kernels in qlinear_kernels.cpp are
// written once. Exactly one of CGQ_ISA_SCALAR / CGQ_ISA_AVX2 / CGQ_ISA_AVX512 is defined per
// translation unit (see CMakeLists.txt); everything here lives in that ISA's own namespace.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "cpu/fast_exp.h"

#if defined(CGQ_ISA_AVX2) || defined(CGQ_ISA_AVX512)
#include <immintrin.h>
#endif

namespace cgq::cpu::CGQ_ISA {

#if defined(CGQ_ISA_AVX512)

struct Vec {
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  // min(v, m) / max(v, m) lane-wise as `v < m ? v : m` / `v > m ? v : m`: m wins ties and NaN.
  static R min(R v, R m) { return _mm512_min_ps(v, m); }
  static R max(R v, R m) { return _mm512_max_ps(v, m); }
  static float reduce_min(R v) { return _mm512_reduce_min_ps(v); }
  static float reduce_max(R v) { return _mm512_reduce_max_ps(v); }
  static float sum(R v) { return _mm512_reduce_add_ps(v); }
  static R from_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // The 32 unsigned nibbles of one int4 block (see common/qformat.h) as 32 / W registers.
  static void from_u4_block(const uint8_t* p, R* out) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
  }
  static float half(uint16_t h) { return _cvtsh_ss(h); }
  static R load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R round(R v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-126, 127], built in the exponent bits.
  static R pow2(R n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
};

#elif defined(CGQ_ISA_AVX2)

struct Vec {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R min(R v, R m) { return _mm256_min_ps(v, m); }
  static R max(R v, R m) { return _mm256_max_ps(v, m); }
  static float reduce_min(R v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_min_ss(m, _mm_movehdup_ps(m)));
  }
  static float reduce_max(R v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static R from_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void from_u4_block(const uint8_t* p, R* out) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
  static float half(uint16_t h) { return _cvtsh_ss(h); }
  static R load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R round(R v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R pow2(R n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
};

// 16 int32 values (two vectors, in order), each within int8 range, as 16 bytes in order. The packs
// work within 128-bit lanes; the permute puts the lanes back in order between them.
inline __m128i pack_i32x16_to_i8(__m256i a, __m256i b) {
  const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  return _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
}

// The same for values within uint8 range (0..255), as unsigned bytes.
inline __m128i pack_u32x16_to_u8(__m256i a, __m256i b) {
  const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  return _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
}

#else  // scalar reference: the plainest possible code, also the fallback on non-x86 machines

struct Vec {
  using R = float;
  static constexpr int W = 1;
  static R zero() { return 0.0f; }
  static R set1(float v) { return v; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R v) { *p = v; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R div(R a, R b) { return a / b; }
  static R mul(R a, R b) { return a * b; }
  static R min(R v, R m) { return v < m ? v : m; }
  static R max(R v, R m) { return v > m ? v : m; }
  static float reduce_min(R v) { return v; }
  static float reduce_max(R v) { return v; }
  static float sum(R v) { return v; }
  static R from_i8(const int8_t* p) { return static_cast<float>(*p); }
  static void from_u4_block(const uint8_t* p, R* out) {
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(p[j] & 0x0F);
      out[j + 16] = static_cast<float>(p[j] >> 4);
    }
  }
  static float half(uint16_t h) { return half_bits_to_float(h); }
  static R load_half(const uint16_t* p) { return half_bits_to_float(*p); }
};

#endif

#if defined(CGQ_ISA_AVX512)
// Lane i = the sum of v[i]'s lanes, for W vectors at once: a tree of in-lane unpacks, shuffles and
// 128-bit lane shuffles, 45 instructions for 16 sums where 16 separate reductions take ~130.
inline __m512 lane_sums(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v0 + v2, w0 + w2, v1 + v3, w1 + w3] of v, w
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: one partial sum of each of 4 vectors
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: vectors 0-3 twice, then 4-7 twice (of 8)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}
#elif defined(CGQ_ISA_AVX2)
// Lane i = the sum of v[i]'s lanes, for W vectors at once (21 instructions for 8 sums).
inline __m256 lane_sums(const __m256* v) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}
#else
inline float lane_sums(const float* v) { return v[0]; }
#endif

// exp(x) lane-wise, for the loops libm's expf would make scalar: fast_exp.h's method (the same
// polynomial, the same clamp to [-87, 87]) with 2^n from the exponent bits. n is rounded to
// nearest even where exp_approx rounds half away from zero, which moves f by one at exact ties
// and keeps |f| <= 1/2: errors stay ~2e-7 relative. NaN stays NaN (Vec::min / max pass it on).
inline Vec::R exp_vec(Vec::R x) {
#if defined(CGQ_ISA_AVX2) || defined(CGQ_ISA_AVX512)
  x = Vec::max(Vec::set1(-kExpClamp), Vec::min(Vec::set1(kExpClamp), x));
  const Vec::R t = Vec::mul(x, Vec::set1(kLog2e));
  const Vec::R n = Vec::round(t);
  const Vec::R f = Vec::sub(t, n);
  Vec::R p = Vec::set1(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = Vec::fma(p, f, Vec::set1(kExpPoly[i]));
  return Vec::mul(p, Vec::pow2(n));
#else
  return exp_approx(x);
#endif
}

// fp32 -> fp16 for the KV cache (which may hold fp16 to halve what attention reads; it reads with
// Vec::load_half), rounded to nearest even: on every ISA the same bits.
inline void floats_to_halves(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(CGQ_ISA_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(CGQ_ISA_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = float_to_half_bits(src[i]);
}

}  // namespace cgq::cpu::CGQ_ISA
