// The int8-activation GEMV: qlinear_i8gemm.h's contract, word for word, for few rows of x (a
// decode step, a short prompt continuing a cached prefix). AVX2 only, included by
// qlinear_kernels.cpp in that translation unit; the AVX-512 build keeps the GEMM at every M until
// a twin of this kernel there has run on an AVX-512 machine (kernel_constants.h).
//
// Why a second kernel. The GEMM's vector lanes run along the rows of x, so one row fills 1 of 8
// lanes and its padded tile costs what 16 rows would. Here lanes run along K, as in every GEMV: a
// weight vector's bytes meet the same row's activations, and each (row, column, group) integer sum
// is finished by a transposing reduction of 8 columns at once (hadd, then 128-bit lane permutes),
// which leaves the sums with one column per lane for the epilogue.
//
// Why the results are bit for bit the GEMM's. The activations are quantized by the GEMM's own
// helpers (i8gemm::quantize_chunk, byte_sum), so q, sx and the group sums of q are the same
// numbers. Each group's integer sum is exact in either kernel, whatever order it is added in.
// The fp32 steps after it are the GEMM's, one element at a time, in the same order:
//   dot = fma(-z, qsum, float(sum)), total = fma(dot, sx * sw, total) over the groups in order,
//   y = fma(total, rowscale, bias), then gelu_vec.
// So a row's output does not depend on which kernel took it, or on how many rows came with it:
// a decode step batched with other requests gives each the logits it would get alone.
//
// Activation layout. int4 rows are stored in the weights' nibble order (common/qformat.h): a
// 32-byte weight vector holds two blocks of 32 elements, byte j of a block holding element j (low
// nibble) and j + 16 (high). So each weight vector's 64 activations are kept as two vectors: the
// blocks' first halves (against the low nibbles) and their second halves (high nibbles). int8
// rows keep their natural order. A 128-bit lane of a dot-product vector then covers one
// 32-element block, which is what lets the reduction separate groups of 32, 64 and 128.
//
// Signs: as in the GEMM. int4 codes are unsigned bytes; int8 codes put their sign on x (vpsignb)
// and enter vpmaddubsw as |w|, so no pair sum can saturate.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/prefetch.h"
#include "cpu/qlinear_i8gemm.h"

namespace cgq::cpu::CGQ_ISA::i8gemv {

using i8gemm::kChunk;

constexpr int kVecBytes = 32;  // bytes of a weight vector
constexpr int kCols = 8;       // output columns per tile: one per fp32 lane of the epilogue
using Vi = __m256i;

// The workspace qlinear_prepare fills, per row of x: q [K] (int4: nibble order, see above), then
// sx [K / kChunk] and the sums of q per weight group [K / G], float32 (integers below 2^24).
struct Layout {
  int64_t K, G;
  int64_t row_bytes() const { return (K + 4 * (K / kChunk + K / G) + 63) / 64 * 64; }
  const int8_t* q(const uint8_t* ws, int64_t m) const { return reinterpret_cast<const int8_t*>(ws + m * row_bytes()); }
  const float* sx(const uint8_t* ws, int64_t m) const { return reinterpret_cast<const float*>(ws + m * row_bytes() + K); }
  const float* qsum(const uint8_t* ws, int64_t m) const { return sx(ws, m) + K / kChunk; }
};

inline Layout layout(const QLinearArgs& a, bool int4) { return {a.K, int4 ? a.group_size : kChunk}; }

inline int64_t workspace_bytes(const QLinearArgs& a, bool int4) { return a.M * layout(a, int4).row_bytes(); }

// Quantizes the rows [m_begin, m_end) of x as i8gemm::prepare does, in this kernel's order.
inline void prepare(const QLinearArgs& a, bool int4, uint8_t* ws, int64_t m_begin, int64_t m_end) {
  const Layout L = layout(a, int4);
  alignas(64) int8_t row[kChunk];
  for (int64_t m = m_begin; m < m_end; ++m) {
    int8_t* q = const_cast<int8_t*>(L.q(ws, m));
    float* sx = const_cast<float*>(L.sx(ws, m));
    float* qsum = const_cast<float*>(L.qsum(ws, m));
    for (int64_t c = 0; c < a.K / kChunk; ++c) {
      sx[c] = i8gemm::quantize_chunk(a.x + m * a.K + c * kChunk, row);
      for (int64_t g = 0; g < kChunk / L.G; ++g)
        qsum[c * kChunk / L.G + g] = static_cast<float>(i8gemm::byte_sum(row + g * L.G, L.G));
      int8_t* dst = q + c * kChunk;
      if (!int4) {
        std::memcpy(dst, row, kChunk);
        continue;
      }
      // Per weight vector (2 * kVecBytes elements): the blocks' first halves, then their second.
      for (int64_t v = 0; v < kChunk; v += 2 * kVecBytes)
        for (int64_t b = 0; b < kVecBytes / 16; ++b) {
          std::memcpy(dst + v + b * 16, row + v + b * 32, 16);
          std::memcpy(dst + v + kVecBytes + b * 16, row + v + b * 32 + 16, 16);
        }
    }
  }
}

// Rows of 8 floats transposed in place: v[j][i] becomes v[i][j].
inline void transpose8(__m256* v) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// The weight groups' zero points (negated) and scales of one tile of columns, transposed to
// [group][kCols] so the epilogue loads them as vectors; columns past N repeat the last one. Eight
// groups at a time by an 8 x 8 transpose: done with scalar loads, the transpose cost about as many
// instructions as the dot products of a g128 tile at one row of x.
struct TileScales {
  std::vector<float> neg_z, s;
  void fill(const QLinearArgs& a, int64_t n0, int valid) {
    static_assert(kCols == 8, "one 8 x 8 transpose per 8 groups");
    const int64_t groups = a.K / a.group_size;
    neg_z.resize(static_cast<size_t>(groups * kCols));
    s.resize(static_cast<size_t>(groups * kCols));
    int64_t row[kCols];
    for (int r = 0; r < kCols; ++r) row[r] = (n0 + std::min(r, valid - 1)) * groups;
    const __m256 symmetric = _mm256_set1_ps(-static_cast<float>(kInt4SymmetricZero));
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      __m256 sv[kCols], zv[kCols];
      for (int r = 0; r < kCols; ++r) {
        sv[r] = Vec::load_half(a.scales + row[r] + g);
        zv[r] = a.zeros ? _mm256_xor_ps(_mm256_set1_ps(-0.0f), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zeros + row[r] + g)))))
                        : symmetric;
      }
      transpose8(sv);
      if (a.zeros) transpose8(zv);
      for (int j = 0; j < 8; ++j) {
        _mm256_storeu_ps(s.data() + (g + j) * kCols, sv[j]);
        _mm256_storeu_ps(neg_z.data() + (g + j) * kCols, zv[j]);
      }
    }
    for (; g < groups; ++g)
      for (int r = 0; r < kCols; ++r) {
        neg_z[g * kCols + r] = -(a.zeros ? static_cast<float>(a.zeros[row[r] + g]) : static_cast<float>(kInt4SymmetricZero));
        s[g * kCols + r] = Vec::half(a.scales[row[r] + g]);
      }
  }
};

inline Vi load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline Vi nibbles_lo(Vi raw) { return _mm256_and_si256(raw, _mm256_set1_epi8(0x0F)); }
inline Vi nibbles_hi(Vi raw) { return _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F)); }

// Four columns' int32 vectors (128-bit lane h: 4 partial sums of the vector's block h) to one
// vector whose 128-bit lane h holds the four columns' sums over that block.
inline Vi quad_sums(const Vi* v) {
  return _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
}

// u[j][v]: columns 4j..4j+3 over the blocks 2v (low lane) and 2v + 1 (high lane) of the chunk;
// to one vector per group of the chunk, lane = column.
template <int G>
inline void group_sums(const Vi (*u)[2], Vi* out) {
  Vi block[4];
  for (int v = 0; v < 2; ++v) {
    block[2 * v] = _mm256_permute2x128_si256(u[0][v], u[1][v], 0x20);
    block[2 * v + 1] = _mm256_permute2x128_si256(u[0][v], u[1][v], 0x31);
  }
  if constexpr (G == 32) {
    for (int b = 0; b < 4; ++b) out[b] = block[b];
  } else if constexpr (G == 64) {
    out[0] = _mm256_add_epi32(block[0], block[1]);
    out[1] = _mm256_add_epi32(block[2], block[3]);
  } else {
    out[0] = _mm256_add_epi32(_mm256_add_epi32(block[0], block[1]), _mm256_add_epi32(block[2], block[3]));
  }
}
inline __m256 to_float(Vi v) { return _mm256_cvtepi32_ps(v); }
inline void store_cols(float* y, __m256 v, int valid) {
  if (valid == kCols) return _mm256_storeu_ps(y, v);
  alignas(32) float tmp[kCols];
  _mm256_store_ps(tmp, v);
  std::memcpy(y, tmp, sizeof(float) * static_cast<size_t>(valid));
}

// Per row of x: total = fma(fma(-z, qsum, float(sum)), sx * sw, total) for each group of a chunk.
// neg_z and s: the chunk's groups' columns, [kChunk / G][kCols].
template <int G, int MR>
inline void epilogue_chunk(const Vi (*sums)[kChunk / G], const Layout& L, const uint8_t* ws, int64_t m0,
                           int64_t c, const float* neg_z, const float* s, Vec::R* total) {
  for (int m = 0; m < MR; ++m) {
    const float* qsum = L.qsum(ws, m0 + m) + c * (kChunk / G);
    const Vec::R sx = Vec::set1(L.sx(ws, m0 + m)[c]);
    for (int j = 0; j < kChunk / G; ++j) {
      const Vec::R dot = Vec::fma(Vec::load(neg_z + j * kCols), Vec::set1(qsum[j]), to_float(sums[m][j]));
      total[m] = Vec::fma(dot, Vec::mul(sx, Vec::load(s + j * kCols)), total[m]);
    }
  }
}

// y = fma(total, rowscale, bias), gelu_vec, for the tile's valid columns.
template <int MR>
inline void finish(const QLinearArgs& a, bool int4, int64_t m0, int64_t n0, int valid, const Vec::R* total) {
  alignas(64) float scale[kCols], bias[kCols];
  for (int r = 0; r < kCols; ++r) {
    const int64_t n = n0 + std::min(r, valid - 1);
    scale[r] = int4 ? 1.0f : Vec::half(a.scales[n]);
    bias[r] = a.bias ? a.bias[n] : 0.0f;
  }
  for (int m = 0; m < MR; ++m) {
    Vec::R v = Vec::fma(total[m], Vec::load(scale), Vec::load(bias));
    if (a.gelu) v = gelu_vec(v);
    store_cols(a.y + (m0 + m) * a.N + n0, v, valid);
  }
}

// Columns [n0, n0 + valid) of the rows [m0, m0 + MR), int4 weights in groups of G.
template <int G, int MR>
void int4_tile(const QLinearArgs& a, const Layout& L, const uint8_t* ws, int64_t m0, int64_t n0, int valid,
               const TileScales& ts) {
  const int64_t row_bytes = a.K / 2;
  const uint8_t* w[kCols];
  for (int r = 0; r < kCols; ++r) w[r] = static_cast<const uint8_t*>(a.qweight) + (n0 + std::min(r, valid - 1)) * row_bytes;
  const int8_t* xq[MR];
  for (int m = 0; m < MR; ++m) xq[m] = L.q(ws, m0 + m);
  Vec::R total[MR];
  for (int m = 0; m < MR; ++m) total[m] = Vec::zero();
  // Two tiles ahead, as the limb GEMVs (prefetch.h): 8 rows read side by side are 8 streams.
  const uint8_t* ahead = static_cast<const uint8_t*>(a.qweight) + (n0 + kLimbTilesAhead * kCols) * row_bytes;
  for (int64_t c = 0; c < a.K / kChunk; ++c) {
    prefetch_next_tile<kCols, kChunk / 2>(ahead, row_bytes, c * (kChunk / 2));
    Vi sums[MR][kChunk / G];
    const Vi ones = _mm256_set1_epi16(1);
    Vi u[MR][2][2];
    for (int j = 0; j < 2; ++j)
      for (int v = 0; v < 2; ++v) {
        Vi d[MR][4];
        for (int r = 0; r < 4; ++r) {
          const Vi raw = load(w[4 * j + r] + c * (kChunk / 2) + v * kVecBytes);
          const Vi lo = nibbles_lo(raw), hi = nibbles_hi(raw);
          for (int m = 0; m < MR; ++m) {
            const int8_t* x = xq[m] + c * kChunk + v * 2 * kVecBytes;
            // Pair sums of at most 2 x 15 x 127 each, two of them: far inside int16.
            const Vi s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load(x)), _mm256_maddubs_epi16(hi, load(x + kVecBytes)));
            d[m][r] = _mm256_madd_epi16(s16, ones);
          }
        }
        for (int m = 0; m < MR; ++m) u[m][j][v] = quad_sums(d[m]);
      }
    for (int m = 0; m < MR; ++m) group_sums<G>(u[m], sums[m]);
    const int64_t first = c * (kChunk / G) * kCols;  // the chunk's first group in the tile's tables
    epilogue_chunk<G, MR>(sums, L, ws, m0, c, ts.neg_z.data() + first, ts.s.data() + first, total);
  }
  finish<MR>(a, true, m0, n0, valid, total);
}

// The same for int8 weights: one group per chunk, z = i8gemm::kInt8Offset (0: the sums are of the
// signed codes, as the AVX2 GEMM's) and sw = 1 in every chunk, the row scale applied by finish().
template <int MR>
void int8_tile(const QLinearArgs& a, const Layout& L, const uint8_t* ws, int64_t m0, int64_t n0, int valid) {
  static_assert(i8gemm::kInt8Offset == 0, "vpsignb sums the signed codes: no offset to fold out");
  const int8_t* w[kCols];
  for (int r = 0; r < kCols; ++r) w[r] = static_cast<const int8_t*>(a.qweight) + (n0 + std::min(r, valid - 1)) * a.K;
  const int8_t* xq[MR];
  for (int m = 0; m < MR; ++m) xq[m] = L.q(ws, m0 + m);
  alignas(64) float neg_z[kCols], one[kCols];
  for (int r = 0; r < kCols; ++r) neg_z[r] = -static_cast<float>(i8gemm::kInt8Offset), one[r] = 1.0f;
  Vec::R total[MR];
  for (int m = 0; m < MR; ++m) total[m] = Vec::zero();
  const int8_t* ahead = static_cast<const int8_t*>(a.qweight) + (n0 + kLimbTilesAhead * kCols) * a.K;
  for (int64_t c = 0; c < a.K / kChunk; ++c) {
    prefetch_next_tile<kCols, kChunk>(ahead, a.K, c * kChunk);
    Vi sums[MR][1];
    const Vi ones = _mm256_set1_epi16(1);
    Vi u[MR][2];
    for (int j = 0; j < 2; ++j) {
      Vi d[MR][4];
      for (int r = 0; r < 4; ++r) {
        for (int m = 0; m < MR; ++m) d[m][r] = _mm256_setzero_si256();
        for (int v = 0; v < kChunk / kVecBytes; ++v) {
          const Vi wv = load(w[4 * j + r] + c * kChunk + v * kVecBytes);
          const Vi wabs = _mm256_abs_epi8(wv);
          for (int m = 0; m < MR; ++m) {
            // |w| x (x with w's sign): pair sums at most 2 x 128 x 127, exact for w = -128.
            const Vi t = _mm256_sign_epi8(load(xq[m] + c * kChunk + v * kVecBytes), wv);
            d[m][r] = _mm256_add_epi32(d[m][r], _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, t), ones));
          }
        }
      }
      for (int m = 0; m < MR; ++m) u[m][j] = quad_sums(d[m]);
    }
    for (int m = 0; m < MR; ++m) {
      // Both lanes of u are the same columns' halves of the chunk: add them, one column per lane.
      const Vi lo = _mm256_permute2x128_si256(u[m][0], u[m][1], 0x20);
      const Vi hi = _mm256_permute2x128_si256(u[m][0], u[m][1], 0x31);
      sums[m][0] = _mm256_add_epi32(lo, hi);
    }
    epilogue_chunk<kChunk, MR>(sums, L, ws, m0, c, neg_z, one, total);  // every chunk: the same (z, sw)
  }
  finish<MR>(a, false, m0, n0, valid, total);
}

// Output columns [n_begin, n_end) of every row of x: tiles of kCols columns (the last one
// partial), rows in pairs, then the last one alone.
template <bool kInt4, int G>
void run_group(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  const Layout L = layout(a, kInt4);
  const auto* ws = static_cast<const uint8_t*>(a.workspace);
  thread_local TileScales ts;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kCols) {
    const int valid = static_cast<int>(std::min<int64_t>(kCols, n_end - n0));
    if constexpr (kInt4) ts.fill(a, n0, valid);
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) {
      if constexpr (kInt4) int4_tile<G, 2>(a, L, ws, m, n0, valid, ts);
      else int8_tile<2>(a, L, ws, m, n0, valid);
    }
    if (m < a.M) {
      if constexpr (kInt4) int4_tile<G, 1>(a, L, ws, m, n0, valid, ts);
      else int8_tile<1>(a, L, ws, m, n0, valid);
    }
  }
}

template <bool kInt4>
void run(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  if constexpr (!kInt4) return run_group<false, kChunk>(a, n_begin, n_end);
  i8gemm::with_group_size(a.group_size, [&](auto g) { run_group<true, decltype(g)::value>(a, n_begin, n_end); });
}

}  // namespace cgq::cpu::CGQ_ISA::i8gemv
