// Blocked fp32 GEMM over quantized weights, for many rows of x at once (prefill, batches): included
// by qlinear_kernels.cpp in the AVX2 and AVX-512 translation units.
//
// Why a second layout: the GEMV tiles (qlinear_kernels.cpp) put K along the vector lanes, so each
// FMA needs a vector of x and a vector of converted weights, and every row of x costs a load per
// FMA: at M = 32 they ran at about half the FMA peak (docs/cpu-kernels.md, "The blocked GEMM").
// Here the lanes run along the rows of x instead:
//   - qlinear_prepare transposes x once per call into tiles of kMT rows, [K][kMT];
//   - a tile of NR weight rows is dequantized kKC elements at a time into a small fp32 panel on
//     the stack (L1), scales and zero points applied as in dequantize_int4;
//   - for each k, kMV vectors of x^T feed NR x kMV FMAs, the weight taken as a broadcast scalar.
// So each weight is converted once per kMT rows of x, and the loads per FMA are (kMV + NR) /
// (NR * kMV) instead of ~1. Accumulation stays fp32 FMA over the same products as the GEMV
// tiles: no activation rounding, the same error bound.
#pragma once

#include <cstdint>

#include "common/qformat.h"
#include "cpu/dequant_int4.h"
#include "cpu/kernel_constants.h"
#include "cpu/prefetch.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA::gemm {

// NR weight rows x kMV vectors of x rows of accumulators, within the register file with room for
// the x vectors and the broadcast: 24 of 32 zmm, 10 of 16 ymm (with 12, GCC kept one accumulator
// on the stack in AVX2's int4 loop, at half the speed).
#if defined(CGQ_ISA_AVX512)
constexpr kernel_constants::Isa kTile = kernel_constants::kAvx512;
#else
constexpr kernel_constants::Isa kTile = kernel_constants::kAvx2;
#endif
constexpr int kNR = static_cast<int>(kTile.gemm_tile_n);
constexpr int kMV = 2;
constexpr int kMT = kMV * Vec::W;  // rows of x per tile: the lanes of kMV vectors
static_assert(kMT == kTile.gemm_tile_m, "kernel_constants.h states this ISA's GEMM tile");
constexpr int kKC = 128;           // k per dequantized panel: a multiple of every int4 group size

// The rows of x this GEMM takes: whole tiles only. qlinear_kernels.cpp runs the last M % kMT rows
// through the GEMV tiles, which cost per row what they touch instead of a whole tile.
inline int64_t tiled_rows(int64_t M) { return M / kMT * kMT; }

inline int64_t workspace_bytes(int64_t M, int64_t K) {
  return tiled_rows(M) * K * static_cast<int64_t>(sizeof(float));
}

// x [M, K] -> per tile of kMT rows, [K][kMT], 16 columns of x at a time: each row's 16 values
// are one cache line read once, and the 16 x kMT block written is 2-4 KB in L1. (Row by row,
// every row rewrote the whole K x kMT tile: 1.8 % of a 32-token prefill's time, on one thread.)
inline void prepare(const float* x, int64_t M, int64_t K, float* xt) {
  constexpr int64_t kCols = 16;
  for (int64_t m0 = 0; m0 < tiled_rows(M); m0 += kMT) {
    float* dst = xt + m0 * K;
    for (int64_t k0 = 0; k0 < K; k0 += kCols) {
      const int64_t cols = K - k0 < kCols ? K - k0 : kCols;
      for (int i = 0; i < kMT; ++i) {
        const float* src = x + (m0 + i) * K + k0;
        for (int64_t j = 0; j < cols; ++j) dst[(k0 + j) * kMT + i] = src[j];
      }
    }
  }
}

// Weight row n, elements [k0, k0 + kc), as float32 into out. int8 (G = 0) leaves the row's scale
// to the tile's store (one multiply per output, as the GEMV tile does); int4 applies each group's
// scale and zero point as dequantize_int4 does (the same helper). For int4, k0 and kc are
// multiples of the group size G (kKC is, and so is K); G is a template argument so that finding a
// group is a shift, not a division.
template <int G>
inline void dequantize_chunk(const QLinearArgs& a, int64_t n, int64_t k0, int64_t kc, float* out) {
  constexpr int W = Vec::W;
  if constexpr (G > 0) {
    dequantize_int4_part(static_cast<const uint8_t*>(a.qweight), a.scales, a.zeros, a.K, G, n, k0, kc, out);
  } else {
    const int8_t* row = static_cast<const int8_t*>(a.qweight) + n * a.K + k0;
    int64_t k = 0;
    for (; k + W <= kc; k += W) Vec::store(out + k, Vec::from_i8(row + k));
    for (; k < kc; ++k) out[k] = static_cast<float>(row[k]);
  }
}

// Which part of K a tile call covers, and what it does with y: the first part stores its sums,
// later parts add theirs, and the last one applies the int8 row scale and the bias.
struct KRange {
  int64_t begin, end;
  bool first, last;
};

// y[m0 : m0 + kMT, n0 : n0 + NR] from the x^T tile `xt` ([K][kMT]) and NR weight rows, over the
// elements ks.begin .. ks.end of K.
template <int G, int NR>
void tile(const QLinearArgs& a, const float* xt, int64_t m0, int64_t n0, const KRange& ks) {
  constexpr int W = Vec::W;
  using R = Vec::R;
  // Two panels: while the FMAs run over one chunk, the next chunk's rows are dequantized into the
  // other, one row after each kSeg steps of k, so the conversions (shuffle and convert pipes)
  // overlap the FMAs instead of waiting between chunks.
  constexpr int64_t kSeg = 8;
  static_assert(kKC / kSeg >= kNR, "a chunk's steps must cover every row of the next panel");
  alignas(64) float panel[2][NR][kKC];
  // Each chunk's sums start from zero and are added to `total` in memory: sums of kKC products
  // and then of K / kKC chunks, not one running sum of K products (7x the rounding error).
  alignas(64) float total[NR][kMT];
  R acc[NR][kMV];
  auto chunk_len = [&](int64_t k0) { return ks.end - k0 < kKC ? ks.end - k0 : kKC; };
  for (int r = 0; r < NR; ++r) dequantize_chunk<G>(a, n0 + r, ks.begin, chunk_len(ks.begin), panel[0][r]);
  // The NR weight rows are NR short streams, which the hardware prefetchers follow badly: with one
  // tile of x (a decode batch, the lm_head's rows) the tile waited on memory. Prefetch as the GEMVs
  // do (prefetch.h), two tiles of weight rows ahead.
  constexpr int64_t kChunkBytes = G > 0 ? kKC / 2 : kKC;
  const int64_t row_bytes = G > 0 ? a.K / 2 : a.K;
  const char* ahead = static_cast<const char*>(a.qweight) + (n0 + kLimbTilesAhead * NR) * row_bytes;
  int cur = 0;
  for (int64_t k0 = ks.begin; k0 < ks.end; k0 += kKC, cur ^= 1) {
    prefetch_next_tile<NR, kChunkBytes>(ahead, row_bytes, G > 0 ? k0 / 2 : k0);
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < kMV; ++v) acc[r][v] = Vec::zero();
    const int64_t kc = chunk_len(k0);
    const int64_t next_k0 = k0 + kKC;
    const int64_t next_kc = next_k0 < ks.end ? chunk_len(next_k0) : 0;
    const float* xk = xt + k0 * kMT;
    int next_row = 0;
    for (int64_t k_seg = 0; k_seg < kc; k_seg += kSeg) {
      const int64_t k_end = kc - k_seg < kSeg ? kc : k_seg + kSeg;
      for (int64_t k = k_seg; k < k_end; ++k) {
        R xv[kMV];
        for (int v = 0; v < kMV; ++v) xv[v] = Vec::load(xk + k * kMT + v * W);
        for (int r = 0; r < NR; ++r) {
          const R w = Vec::set1(panel[cur][r][k]);
          for (int v = 0; v < kMV; ++v) acc[r][v] = Vec::fma(w, xv[v], acc[r][v]);
        }
      }
      if (next_kc > 0 && next_row < NR) {
        dequantize_chunk<G>(a, n0 + next_row, next_k0, next_kc, panel[cur ^ 1][next_row]);
        ++next_row;
      }
    }
    // A short last chunk (K not a multiple of kKC) has fewer steps than rows.
    for (; next_kc > 0 && next_row < NR; ++next_row)
      dequantize_chunk<G>(a, n0 + next_row, next_k0, next_kc, panel[cur ^ 1][next_row]);
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < kMV; ++v)
        Vec::store(&total[r][v * W], k0 == ks.begin ? acc[r][v] : Vec::add(Vec::load(&total[r][v * W]), acc[r][v]));
  }
  // y row by row, each row's NR outputs adjacent. Column by column, the kMT rows of y N floats
  // apart share one L1 set whenever 4N is a multiple of 4 KB: 12 % of the tile's time at N = 4096.
  float scale[NR], bias[NR];
  for (int r = 0; r < NR; ++r) {
    scale[r] = G > 0 || !ks.last ? 1.0f : Vec::half(a.scales[n0 + r]);
    bias[r] = a.bias && ks.last ? a.bias[n0 + r] : 0.0f;
  }
  for (int i = 0; i < kMT; ++i) {
    float* y_row = a.y + (m0 + i) * a.N + n0;
    for (int r = 0; r < NR; ++r) {
      const float sum = ks.first ? total[r][i] : y_row[r] + total[r][i];
      y_row[r] = sum * scale[r] + bias[r];
    }
  }
}

// K in parts of at most kMaxKPart (whole chunks): a tile's x^T rows for one part, kMT x 4 bytes
// each, are read again by every tile of weight rows, so they must stay in L2 (1 MB on the machine
// it was tuned on): 512 KB at most. With all of 6B fc_out's K = 16384 (2 MB of x^T per tile) the
// GEMM was a third slower; in parts, as fast as at K <= 4096. Parts of 2048 were no better at
// K = 16384 and slower at 4096 (docs/cpu-kernels.md, "The blocked GEMM").
constexpr int64_t kMaxKPart = 4096;

// Elements per part: K split evenly into as few parts as kMaxKPart allows, rounded up to whole
// chunks (so the last part is the shorter one, and never empty).
inline int64_t k_part_len(int64_t K) {
  const int64_t parts = (K + kMaxKPart - 1) / kMaxKPart;
  return ((K + parts - 1) / parts + kKC - 1) / kKC * kKC;
}

inline int64_t k_parts(int64_t K) { return (K + k_part_len(K) - 1) / k_part_len(K); }

inline KRange k_part(int64_t K, int64_t i) {
  const int64_t len = k_part_len(K);
  const int64_t begin = i * len, end = begin + len < K ? begin + len : K;
  return {begin, end, i == 0, end == K};
}

// Output rows [n_begin, n_end) for the first tiled_rows(M) rows of x: tiles of kNR weight rows,
// then of 4 (a thread's range is a multiple of 8 rows, so it often ends in 8 more; one-row tiles
// have two accumulators, too few chains to hide the FMA latency), then of 1. G: the int4 group
// size, or 0 for int8.
template <int G>
void run_rows(const QLinearArgs& a, const float* xt, int64_t n_begin, int64_t n_end) {
  for (int64_t m0 = 0; m0 < tiled_rows(a.M); m0 += kMT) {
    const float* tile_x = xt + m0 * a.K;
    for (int64_t part = 0; part < k_parts(a.K); ++part) {
      const KRange ks = k_part(a.K, part);
      int64_t n = n_begin;
      for (; n + kNR <= n_end; n += kNR) tile<G, kNR>(a, tile_x, m0, n, ks);
      for (; n + 4 <= n_end; n += 4) tile<G, 4>(a, tile_x, m0, n, ks);
      for (; n < n_end; ++n) tile<G, 1>(a, tile_x, m0, n, ks);
    }
  }
}

}  // namespace cgq::cpu::CGQ_ISA::gemm
