// Round-to-nearest quantization of a weight's rows in one pass per row: min/max per row (int8) or
// group (int4), the fp16 scale (and zero point), the codes q = clamp(round(w / scale) + zero, lo,
// hi) packed as in common/qformat.h, and optionally the error sums the quantizer reports. The
// operations and their order are those of the torch specification in codegen_q/quantization/rtn.py
// (_quantize_rows_reference), so both give bit-identical bytes (tested on every ISA). The file is
// compiled once per ISA like qlinear_kernels.cpp.
//
// The weight arrives in the checkpoint's dtype; each row is widened to float32 into a buffer that
// stays in L1/L2 (fp16 -> fp32 is exact, as is bf16 -> fp32) and every step reads it there.
// Before, a float32 copy of each chunk was made, read by a min/max pass, scales were computed by
// a dozen small torch ops, and a second pass read the chunk again for the codes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {
namespace {

// Row n of w as float32: the row itself for float32, else widened into buf (K floats).
const float* row_as_float(const WeightRows& w, int64_t n, float* buf) {
  const int64_t K = w.K;
  if (w.type == WeightType::kFloat32) return static_cast<const float*>(w.data) + n * K;
  const uint16_t* src = static_cast<const uint16_t*>(w.data) + n * K;
  if (w.type == WeightType::kFloat16) {
    int64_t k = 0;
    for (; k + Vec::W <= K; k += Vec::W) Vec::store(buf + k, Vec::load_half(src + k));
    for (; k < K; ++k) buf[k] = Vec::half(src[k]);
  } else {  // bfloat16: the high half of a float32
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t bits = static_cast<uint32_t>(src[k]) << 16;
      std::memcpy(buf + k, &bits, sizeof bits);
    }
  }
  return buf;
}

// One row's widening buffer per call (a call covers many rows of one thread).
struct RowBuffer {
  explicit RowBuffer(const WeightRows& w) : data(w.type == WeightType::kFloat32 ? 0 : w.K) {}
  float* get() { return data.data(); }
  std::vector<float> data;
};

}  // namespace

// Sums of squares for RowErrors, over x[0, n) against its dequantized values xhat, accumulated in
// float lanes (a reported statistic: fp32 sums of up to 24576 terms are ample) and added as double.
struct SquareSums {
  Vec::R err = Vec::zero(), sq = Vec::zero();
  float err_tail = 0.0f, sq_tail = 0.0f;
  void add(Vec::R x, Vec::R xhat) {
    const Vec::R d = Vec::add(x, Vec::mul(xhat, Vec::set1(-1.0f)));
    err = Vec::fma(d, d, err);
    sq = Vec::fma(x, x, sq);
  }
  void add_one(float x, float xhat) {
    err_tail += (x - xhat) * (x - xhat);
    sq_tail += x * x;
  }
  void store(const RowErrors& e, int64_t n) const {
    e.err2[n] = static_cast<double>(Vec::sum(err)) + err_tail;
    e.sq[n] = static_cast<double>(Vec::sum(sq)) + sq_tail;
  }
};

void int8_row_error(const float* x, const int8_t* q, int64_t K, float scale, const RowErrors& e, int64_t n) {
  SquareSums sums;
  const Vec::R s = Vec::set1(scale);
  int64_t k = 0;
  for (; k + Vec::W <= K; k += Vec::W) sums.add(Vec::load(x + k), Vec::mul(Vec::from_i8(q + k), s));
  for (; k < K; ++k) sums.add_one(x[k], static_cast<float>(q[k]) * scale);
  sums.store(e, n);
}

// 32 consecutive elements of one group -> 16 packed bytes (byte j = q[j] | q[j + 16] << 4), with
// q = clamp(round_half_even(x / s) + z, 0, 15): the reference's operations, in vector registers.
// The plain loop left this to the compiler, which packed byte by byte (vpextrb) and made the int4
// pass an order of magnitude slower than the int8 one.
inline void quantize_block32(const float* src, float s, float z, uint8_t* dst) {
#if defined(CGQ_ISA_AVX512)
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(15.0f);
  auto q16 = [&](const float* p) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), lo), hi);
    return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));
  };
  const __m128i a = q16(src), b = q16(src + 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_or_si128(a, _mm_slli_epi16(b, 4)));
#elif defined(CGQ_ISA_AVX2)
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(15.0f);
  auto q8 = [&](const float* p) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), lo), hi);
    return _mm256_cvttps_epi32(v);
  };
  auto q16 = [&](const float* p) { return pack_i32x16_to_i8(q8(p), q8(p + 8)); };
  const __m128i a = q16(src), b = q16(src + 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_or_si128(a, _mm_slli_epi16(b, 4)));
#else
  uint8_t q[kInt4BlockElems];
  for (int j = 0; j < kInt4BlockElems; ++j) {
    float v = ::nearbyintf(src[j] / s) + z;
    v = v < 0.0f ? 0.0f : (v > 15.0f ? 15.0f : v);
    q[j] = static_cast<uint8_t>(v);
  }
  for (int j = 0; j < kInt4BlockBytes; ++j) dst[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
#endif
}

// min and max of src[0, group); finite accumulates src * 0, which is NaN exactly when some element
// is NaN or inf. One running min/max per lane (Vec::min/max keep the scalar `v < l ? v : l`
// semantics), reduced once per group; the scalar tail covers groups that are not a multiple of W.
inline void group_minmax(const float* src, int64_t group, float* lo, float* hi, float& finite) {
  float lmin = src[0], hmax = src[0];
  int64_t k = 0;
  if (group >= Vec::W) {
    Vec::R l = Vec::set1(src[0]), h = l, z = Vec::zero();
    const Vec::R zero = Vec::zero();
    for (; k + Vec::W <= group; k += Vec::W) {
      const Vec::R v = Vec::load(src + k);
      l = Vec::min(v, l);
      h = Vec::max(v, h);
      z = Vec::add(z, Vec::mul(v, zero));
    }
    lmin = Vec::reduce_min(l);
    hmax = Vec::reduce_max(h);
    finite += Vec::sum(z);
  }
  for (; k < group; ++k) {
    const float v = src[k];
    lmin = v < lmin ? v : lmin;
    hmax = v > hmax ? v : hmax;
    finite += v * 0.0f;
  }
  *lo = lmin;
  *hi = hmax;
}

// The fp16 bits of the smallest fp16 >= v: codegen_q/quantization/rtn.py's _fp16_scale_at_least, so the grid covers
// every value (round to nearest even, then one step up if that fell below v).
inline uint16_t half_at_least(float v) {
  uint16_t h = float_to_half_bits(v);
  if (half_bits_to_float(h) < v) ++h;
  return h;
}

inline bool half_is_finite(uint16_t h) { return (h & 0x7C00) != 0x7C00; }

// One pass per row: widen it into cache, then per group its min/max, the fp16 scale (and zero
// point), the codes and the error sums, with codegen_q/quantization/rtn.py's reference operations in its order
// (_quantize_rows_reference): the same bytes, tested on every ISA.
int quantize_rows(const WeightRows& w, const QuantizeOut& o, int64_t n_begin, int64_t n_end) {
  const int64_t K = w.K;
  const bool int4 = o.bits == 4;
  const int64_t group = int4 ? o.group_size : K;
  const int64_t groups = K / group;
  RowBuffer buf(w);
  int status = 0;
  float finite = 0.0f;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* row = row_as_float(w, n, buf.get());
    SquareSums sums;
    for (int64_t g = 0; g < groups; ++g) {
      const float* src = row + g * group;
      float lo, hi;
      group_minmax(src, group, &lo, &hi, finite);
      uint16_t s16;
      float z = int4 ? static_cast<float>(kInt4SymmetricZero) : 0.0f;
      if (!int4 || o.symmetric) {
        const float m = -lo > hi ? -lo : hi;  // torch.maximum(-lo, hi)
        s16 = half_at_least(m / (int4 ? 7.0f : 127.0f));
      } else {
        lo = lo > 0.0f ? 0.0f : lo;  // keep 0 exactly representable
        hi = hi < 0.0f ? 0.0f : hi;
        s16 = half_at_least((hi - lo) / 15.0f);
        const float h = half_bits_to_float(s16);
        float zr = ::nearbyintf(-lo / (h > 0.0f ? h : 1.0f));
        zr = zr < 0.0f ? 0.0f : (zr > 15.0f ? 15.0f : zr);
        o.zeros[n * groups + g] = static_cast<uint8_t>(zr);
        z = zr;
      }
      if (!half_is_finite(s16)) status |= kQuantizeScaleOverflow;
      o.scales[n * groups + g] = s16;
      const float stored = half_bits_to_float(s16);
      const float s = stored > 0.0f ? stored : 1.0f;  // an all-zero group: divide by 1, as the reference does
      if (!int4) {
        int8_t* out = static_cast<int8_t*>(o.q) + n * K;
        for (int64_t k = 0; k < K; ++k) {
          float v = ::nearbyintf(row[k] / s);
          v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
          out[k] = static_cast<int8_t>(v);
        }
        if (o.err.err2) int8_row_error(row, out, K, stored, o.err, n);
        continue;
      }
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += kInt4BlockElems) {
        uint8_t* dst = static_cast<uint8_t*>(o.q) + n * (K / 2) + k0 / 2;
        quantize_block32(row + k0, s, z, dst);
        if (o.err.err2) {  // dequantize the block just written: (q - z) * scale, W lanes at a time
          Vec::R qv[kInt4BlockElems / Vec::W];
          Vec::from_u4_block(dst, qv);
          for (int r = 0; r < kInt4BlockElems / Vec::W; ++r)
            sums.add(Vec::load(row + k0 + r * Vec::W), Vec::mul(Vec::add(qv[r], Vec::set1(-z)), Vec::set1(stored)));
        }
      }
    }
    if (int4 && o.err.err2) sums.store(o.err, n);
  }
  if (finite != 0.0f) status |= kQuantizeNonFinite;
  return status;
}

}  // namespace cgq::cpu::CGQ_ISA
