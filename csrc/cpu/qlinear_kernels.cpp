// Weight-only quantized GEMV/GEMM for small M (decode and small batches), written once over the
// vector vocabulary of simd.h and compiled once per ISA. Activations are float32 and accumulation
// is float32 FMA: no activation quantization, so results match a float64 reference to fp32
// rounding. From a few dozen rows of x the AVX2/AVX-512 builds switch to a blocked GEMM
// (qlinear_gemm.h); the scalar build leaves larger M to dequantize_* + torch (codegen_q/kernels/ops.py).
//
// Register tiling: MR activation rows x NR weight rows of vector accumulators. At M = 1 the NR
// independent FMA chains hide FMA latency; at M > 1 each weight vector, once converted, feeds
// MR FMAs, so the conversion cost is shared by the batch.
#include "cpu/dequant_int4.h"
#include "cpu/kernel_constants.h"
#include "cpu/kernels.h"
#include "cpu/prefetch.h"
#include "cpu/simd.h"
#if defined(CGQ_ISA_AVX512)
#include <type_traits>

#include "cpu/qlinear_vnni.h"
#elif defined(CGQ_ISA_AVX2)
#include "cpu/qlinear_limbs_avx2.h"
#endif
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
#include "cpu/qlinear_gemm.h"
#endif
#include "cpu/gelu.h"
#include "cpu/qlinear_i8gemm.h"
#if defined(CGQ_ISA_AVX2)
#include "cpu/qlinear_i8gemv.h"
#endif

namespace cgq::cpu::CGQ_ISA {
namespace {

using R = Vec::R;
constexpr int W = Vec::W;

template <int MR, int NR>
void int8_tile(const QLinearArgs& a, int64_t m0, int64_t n0) {
  const int64_t K = a.K;
  const int8_t* w = static_cast<const int8_t*>(a.qweight) + n0 * K;
  const float* x = a.x + m0 * K;
  R acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = Vec::zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    prefetch_next_tile<NR, W>(w + NR * K, K, k);
    R xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = Vec::load(x + m * K + k);
    for (int r = 0; r < NR; ++r) {
      const R wv = Vec::from_i8(w + r * K + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = Vec::fma(xv[m], wv, acc[m][r]);
    }
  }
  float tail[MR][NR] = {};
  for (; k < K; ++k)
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) tail[m][r] += x[m * K + k] * static_cast<float>(w[r * K + k]);
  for (int r = 0; r < NR; ++r) {
    const float scale = Vec::half(a.scales[n0 + r]);
    const float bias = a.bias ? a.bias[n0 + r] : 0.0f;
    for (int m = 0; m < MR; ++m)
      a.y[(m0 + m) * a.N + n0 + r] = (Vec::sum(acc[m][r]) + tail[m][r]) * scale + bias;
  }
}

template <int MR, int NR>
void int4_tile(const QLinearArgs& a, int64_t m0, int64_t n0) {
  constexpr int kRegsPerBlock = kInt4BlockElems / W;
  const int64_t K = a.K;
  const int64_t G = a.group_size;
  const int64_t groups = K / G;
  const int64_t row_bytes = K / 2;
  const uint8_t* w = static_cast<const uint8_t*>(a.qweight) + n0 * row_bytes;
  const float* x = a.x + m0 * K;
  R acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = Vec::zero();
  for (int64_t g = 0; g < groups; ++g) {
    R scale[NR], offset[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t idx = (n0 + r) * groups + g;
      const float s = Vec::half(a.scales[idx]);
      const float z = a.zeros ? static_cast<float>(a.zeros[idx]) : static_cast<float>(kInt4SymmetricZero);
      scale[r] = Vec::set1(s);
      offset[r] = Vec::set1(-z * s);
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += kInt4BlockElems) {
      prefetch_next_tile<NR, kInt4BlockBytes>(w + NR * row_bytes, row_bytes, k / 2);
      for (int r = 0; r < NR; ++r) {
        R wv[kRegsPerBlock];
        Vec::from_u4_block(w + r * row_bytes + k / 2, wv);
        for (int j = 0; j < kRegsPerBlock; ++j) {
          const R wj = Vec::fma(wv[j], scale[r], offset[r]);
          for (int m = 0; m < MR; ++m) acc[m][r] = Vec::fma(Vec::load(x + m * K + k + j * W), wj, acc[m][r]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const float bias = a.bias ? a.bias[n0 + r] : 0.0f;
    for (int m = 0; m < MR; ++m) a.y[(m0 + m) * a.N + n0 + r] = Vec::sum(acc[m][r]) + bias;
  }
}

// A tile of NR weight rows is split into NR / NRsub sub-tiles when MR grows, keeping
// MR * NRsub accumulators within the register budget.
#define CGQ_DEFINE_TILE(Name, fn, int4)                                     \
  template <int MR, int NRsub>                                              \
  struct Name {                                                             \
    static constexpr bool kInt4 = int4;                                     \
    static void run(const QLinearArgs& a, int64_t m0, int64_t n0) {         \
      fn<MR, NRsub>(a, m0, n0);                                             \
    }                                                                       \
  };
CGQ_DEFINE_TILE(Int8TileImpl, int8_tile, false)
CGQ_DEFINE_TILE(Int4TileImpl, int4_tile, true)
#undef CGQ_DEFINE_TILE

// Rows of x in groups of 4, then one group of the 3, 2 or 1 left: every group converts each weight
// once more, so M = 3 as 2 + 1 paid two conversions where 3 pays one (M = 3 was slower than M = 4
// before the 3-row tile: docs/cpu-kernels.md, "Which kernel takes a call").
template <template <int, int> class Impl>
void run_rows(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  constexpr int NR = 8;  // MR x NRsub <= 8 accumulators: 1 x 8, 2 x 4, 3 x 2, 4 x 2
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4)
      for (int sub = 0; sub < NR; sub += 2) Impl<4, 2>::run(a, m, n + sub);
    if (a.M - m == 3)
      for (int sub = 0; sub < NR; sub += 2) Impl<3, 2>::run(a, m, n + sub);
    else if (a.M - m == 2)
      for (int sub = 0; sub < NR; sub += 4) Impl<2, 4>::run(a, m, n + sub);
    else if (a.M - m == 1)
      Impl<1, NR>::run(a, m, n);
  }
  for (; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) Impl<4, 1>::run(a, m, n);
    if (a.M - m == 3) Impl<3, 1>::run(a, m, n);
    else if (a.M - m == 2) Impl<2, 1>::run(a, m, n);
    else if (a.M - m == 1) Impl<1, 1>::run(a, m, n);
  }
}

#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
// The limb mode all M rows share (the tiles of several rows read them alike): kMixedLimbs unless
// every row is all two-limb or all three-limb chunks.
limbs::LimbMode call_limb_mode(const limbs::Layout& L, const uint8_t* ws, int64_t M) {
  const limbs::LimbMode first = L.limb_mode(ws, 0);
  for (int64_t m = 1; m < M; ++m)
    if (L.limb_mode(ws, m) != first) return limbs::kMixedLimbs;
  return first;
}
#endif

#if defined(CGQ_ISA_AVX512)
// The VNNI kernels pay three vpdpbusd (one per activation limb) for every 64 products of each row
// of x; the fp32 kernels convert each weight once and pay one FMA per 16 products per row. So the
// integer path wins at M = 1 and loses as rows are added: int8 from M = 2, int4 from M = 4
// (docs/cpu-kernels.md, "Which kernel takes a call").
constexpr int64_t kVnniMaxMInt8 = kernel_constants::kAvx512.limb_max_m_int8;
constexpr int64_t kVnniMaxMInt4 = kernel_constants::kAvx512.limb_max_m_int4;

bool uses_vnni(const QLinearArgs& a, bool int4) { return a.M <= (int4 ? kVnniMaxMInt4 : kVnniMaxMInt8); }

// VNNI tiles keep 3 integer accumulators per (row of x, row of W) plus a float one, so 4 pairs
// (16 of the 32 zmm registers) per tile: MR x NR in {1x4, 2x2, 4x1}.
vnni::Layout vnni_layout(const QLinearArgs& a, bool int4) {
  return vnni::Layout(a.K, int4 ? a.group_size : vnni::kInt8Block, int4);
}

template <int MR, int NR, limbs::LimbMode kMode>
void int4_tile_for_group(const QLinearArgs& a, const vnni::Layout& L, const uint8_t* ws, int64_t m, int64_t n) {
  switch (a.group_size) {
    case 32: vnni::int4_tile<32, MR, NR, kMode>(a, L, ws, m, n); break;
    case 64: vnni::int4_tile<64, MR, NR, kMode>(a, L, ws, m, n); break;
    default: vnni::int4_tile<128, MR, NR, kMode>(a, L, ws, m, n); break;
  }
}

template <bool kInt4>
void run_rows_vnni(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  const vnni::Layout L = vnni_layout(a, kInt4);
  const uint8_t* ws = static_cast<const uint8_t*>(a.workspace);
  const limbs::LimbMode mode = call_limb_mode(L, ws, a.M);
  auto tile = [&](auto mr, auto nr, int64_t m, int64_t n) {
    if constexpr (kInt4) {
      constexpr int MR = decltype(mr)::value, NR = decltype(nr)::value;
      switch (mode) {
        case limbs::kTwoLimbs: int4_tile_for_group<MR, NR, limbs::kTwoLimbs>(a, L, ws, m, n); break;
        case limbs::kThreeLimbs: int4_tile_for_group<MR, NR, limbs::kThreeLimbs>(a, L, ws, m, n); break;
        default: int4_tile_for_group<MR, NR, limbs::kMixedLimbs>(a, L, ws, m, n); break;
      }
    }
    else vnni::int8_tile<decltype(mr)::value, decltype(nr)::value>(a, L, ws, m, n);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4)
      for (int r = 0; r < 4; ++r) tile(I4{}, I1{}, m, n + r);
    for (; m + 2 <= a.M; m += 2) {
      tile(I2{}, I2{}, m, n);
      tile(I2{}, I2{}, m, n + 2);
    }
    for (; m < a.M; ++m) tile(I1{}, I4{}, m, n);
  }
  for (; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) tile(I4{}, I1{}, m, n);
    for (; m < a.M; ++m) tile(I1{}, I1{}, m, n);
  }
}
#elif defined(CGQ_ISA_AVX2)
// int4 at M = 1 runs on activation limbs and vpmaddubsw (qlinear_limbs_avx2.h); larger M, where
// each converted weight feeds several rows of x, and int8 keep the fp32 kernels.
static_assert(kernel_constants::kAvx2.limb_max_m_int4 == 1, "uses_limbs: M = 1 (run_rows_limbs computes row 0 only)");
bool uses_limbs(const QLinearArgs& a, bool int4) { return int4 && a.M == 1; }

limbs::Layout limbs_layout(const QLinearArgs& a) { return limbs::Layout(a.K, a.group_size, true); }

template <int G>
void run_rows_limbs(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  const limbs::Layout L = limbs_layout(a);
  const uint8_t* ws = static_cast<const uint8_t*>(a.workspace);
  constexpr int NR = 4;
  int64_t n = n_begin;
  auto rows = [&](auto mode) {
    constexpr limbs::LimbMode kMode = decltype(mode)::value;
    for (; n + NR <= n_end; n += NR) limbs_avx2::int4_tile<G, NR, kMode>(a, L, ws, 0, n);
    for (; n < n_end; ++n) limbs_avx2::int4_tile<G, 1, kMode>(a, L, ws, 0, n);
  };
  switch (call_limb_mode(L, ws, a.M)) {
    case limbs::kTwoLimbs: rows(std::integral_constant<limbs::LimbMode, limbs::kTwoLimbs>{}); break;
    case limbs::kThreeLimbs: rows(std::integral_constant<limbs::LimbMode, limbs::kThreeLimbs>{}); break;
    default: rows(std::integral_constant<limbs::LimbMode, limbs::kMixedLimbs>{}); break;
  }
}
#endif

#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
// From one whole tile of rows of x (qlinear_gemm.h: 32 on AVX-512, 16 on AVX2) the blocked GEMM
// takes the whole tiles, faster there than the GEMV tiles (docs/cpu-kernels.md, "Which kernel
// takes a call").
bool uses_gemm(const QLinearArgs& a) { return a.M >= gemm::kMT; }

// The GEMM's tiles, then the rows of x past its last whole tile through the fp32 GEMV tiles (not
// the VNNI/limb ones, whose workspace the GEMM's replaces).
template <template <int, int> class Impl>
void run_gemm(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  const float* xt = static_cast<const float*>(a.workspace);
  switch (Impl<1, 1>::kInt4 ? a.group_size : 0) {
    case 0: gemm::run_rows<0>(a, xt, n_begin, n_end); break;
    case 32: gemm::run_rows<32>(a, xt, n_begin, n_end); break;
    case 64: gemm::run_rows<64>(a, xt, n_begin, n_end); break;
    default: gemm::run_rows<128>(a, xt, n_begin, n_end); break;
  }
  const int64_t done = gemm::tiled_rows(a.M);
  if (done == a.M) return;
  QLinearArgs rest = a;
  rest.x = a.x + done * a.K;
  rest.y = a.y + done * a.N;
  rest.M = a.M - done;
  rest.workspace = nullptr;
  run_rows<Impl>(rest, n_begin, n_end);
}
#endif

#if defined(CGQ_ISA_AVX2)
// int8 activations for few rows: the GEMV, whose lanes run along K (the GEMM's run along the rows
// of x and pad them to a tile). AVX2 only for now (kernel_constants.h says why).
bool uses_i8gemv(const QLinearArgs& a) {
  return i8gemm::applies(a) && a.M <= kernel_constants::kAvx2.int8_gemv_max_m;
}
#endif

}  // namespace

int64_t qlinear_workspace_bytes(const QLinearArgs& a, bool int4) {
#if defined(CGQ_ISA_AVX2)
  if (uses_i8gemv(a)) return i8gemv::workspace_bytes(a, int4);
#endif
  if (i8gemm::applies(a)) return i8gemm::workspace_bytes(a, int4);
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
  if (uses_gemm(a)) return gemm::workspace_bytes(a.M, a.K);
#endif
#if defined(CGQ_ISA_AVX512)
  return uses_vnni(a, int4) ? a.M * vnni_layout(a, int4).row_bytes : 0;
#elif defined(CGQ_ISA_AVX2)
  return uses_limbs(a, int4) ? a.M * limbs_layout(a).row_bytes : 0;
#else
  (void)a;
  (void)int4;
  return 0;
#endif
}

void qlinear_prepare(const QLinearArgs& a, bool int4, void* workspace) {
#if defined(CGQ_ISA_AVX2)
  if (uses_i8gemv(a)) return i8gemv::prepare(a, int4, static_cast<uint8_t*>(workspace), 0, a.M);
#endif
  if (i8gemm::applies(a)) return i8gemm::prepare(a, int4, static_cast<uint8_t*>(workspace), 0, i8gemm::layout(a, int4).tiles);
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
  if (uses_gemm(a)) return gemm::prepare(a.x, a.M, a.K, static_cast<float*>(workspace));
#endif
#if defined(CGQ_ISA_AVX512)
  if (uses_vnni(a, int4)) vnni::prepare(a.x, a.M, vnni_layout(a, int4), static_cast<uint8_t*>(workspace));
#elif defined(CGQ_ISA_AVX2)
  if (uses_limbs(a, int4)) limbs_avx2::prepare(a.x, a.M, limbs_layout(a), static_cast<uint8_t*>(workspace));
#else
  (void)a;
  (void)int4;
  (void)workspace;
#endif
}

static void qlinear_int8_columns(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
  if (uses_gemm(a)) return run_gemm<Int8TileImpl>(a, n_begin, n_end);
#endif
#if defined(CGQ_ISA_AVX512)
  if (!uses_vnni(a, false)) return run_rows<Int8TileImpl>(a, n_begin, n_end);
  run_rows_vnni<false>(a, n_begin, n_end);
#else
  run_rows<Int8TileImpl>(a, n_begin, n_end);
#endif
}

int64_t int8_activation_min_rows() { return i8gemm::kMT; }

// The GEMM's workspace is prepared a tile of rows per part, on the pool; the GEMV's few rows by
// the calling thread (qlinear_prepare).
int64_t qlinear_prepare_parts(const QLinearArgs& a, bool int4) {
#if defined(CGQ_ISA_AVX2)
  if (uses_i8gemv(a)) return 0;
#endif
  return i8gemm::applies(a) ? i8gemm::layout(a, int4).tiles : 0;
}

void qlinear_prepare_part(const QLinearArgs& a, bool int4, void* workspace, int64_t begin, int64_t end) {
  i8gemm::prepare(a, int4, static_cast<uint8_t*>(workspace), begin, end);
}

static void qlinear_int4_columns(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
  if (uses_gemm(a)) return run_gemm<Int4TileImpl>(a, n_begin, n_end);
#endif
#if defined(CGQ_ISA_AVX512)
  if (!uses_vnni(a, true)) return run_rows<Int4TileImpl>(a, n_begin, n_end);
  run_rows_vnni<true>(a, n_begin, n_end);
#elif defined(CGQ_ISA_AVX2)
  if (!uses_limbs(a, true)) return run_rows<Int4TileImpl>(a, n_begin, n_end);
  switch (a.group_size) {
    case 32: return run_rows_limbs<32>(a, n_begin, n_end);
    case 64: return run_rows_limbs<64>(a, n_begin, n_end);
    default: return run_rows_limbs<128>(a, n_begin, n_end);
  }
#else
  run_rows<Int4TileImpl>(a, n_begin, n_end);
#endif
}

// gelu over the columns [n_begin, n_end) of every row of y, for the kernels with no epilogue of
// their own (the int8-activation GEMM applies it there).
static void gelu_columns(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t m = 0; m < a.M; ++m) gelu_inplace(a.y + m * a.N + n_begin, n_end - n_begin);
}

void qlinear_int8(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
#if defined(CGQ_ISA_AVX2)
  if (uses_i8gemv(a)) return i8gemv::run<false>(a, n_begin, n_end);
#endif
  if (i8gemm::applies(a)) return i8gemm::run<false>(a, n_begin, n_end);
  qlinear_int8_columns(a, n_begin, n_end);
  if (a.gelu) gelu_columns(a, n_begin, n_end);
}

void qlinear_int4(const QLinearArgs& a, int64_t n_begin, int64_t n_end) {
#if defined(CGQ_ISA_AVX2)
  if (uses_i8gemv(a)) return i8gemv::run<true>(a, n_begin, n_end);
#endif
  if (i8gemm::applies(a)) return i8gemm::run<true>(a, n_begin, n_end);
  qlinear_int4_columns(a, n_begin, n_end);
  if (a.gelu) gelu_columns(a, n_begin, n_end);
}

void dequantize_int8(const DequantArgs& a, int64_t n_begin, int64_t n_end) {
  const int8_t* q = static_cast<const int8_t*>(a.qweight);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float s = Vec::half(a.scales[n]);
    const R sv = Vec::set1(s);
    const int8_t* row = q + n * a.K;
    float* out = a.out + n * a.K;
    int64_t k = 0;
    for (; k + W <= a.K; k += W) Vec::store(out + k, Vec::fma(Vec::from_i8(row + k), sv, Vec::zero()));
    for (; k < a.K; ++k) out[k] = static_cast<float>(row[k]) * s;
  }
}

void dequantize_int4(const DequantArgs& a, int64_t n_begin, int64_t n_end) {
  const uint8_t* q = static_cast<const uint8_t*>(a.qweight);
  for (int64_t n = n_begin; n < n_end; ++n)
    dequantize_int4_part(q, a.scales, a.zeros, a.K, a.group_size, n, 0, a.K, a.out + n * a.K);
}

#if defined(CGQ_ISA_AVX512) || defined(CGQ_ISA_AVX2)
// The bandwidth probe must be the best plain read we know, or kernels that prefetch would look
// better than the memory allows: a software prefetch 4 KB ahead into L2 reads faster than none
// (1, 2 and 8 KB ahead: no gain or less; docs/cpu-kernels.md, "Prefetching").
inline void prefetch_ahead(const uint8_t* p, int bytes) {
  for (int j = 0; j < bytes; j += 64) _mm_prefetch(reinterpret_cast<const char*>(p + 4096 + j), _MM_HINT_T1);
}
#endif

// Streams `bytes` of memory with the widest loads this ISA has; the checksum keeps the compiler
// from dropping the loads. Used to measure the machine's read bandwidth next to the kernels.
uint64_t read_checksum(const uint8_t* data, int64_t bytes) {
  int64_t i = 0;
  uint64_t total = 0;
#if defined(CGQ_ISA_AVX512)
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 256 <= bytes; i += 256) {
    prefetch_ahead(data + i, 256);
    s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(data + i));
    s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(data + i + 64));
    s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(data + i + 128));
    s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(data + i + 192));
  }
  total = static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3))));
#elif defined(CGQ_ISA_AVX2)
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 128 <= bytes; i += 128) {
    prefetch_ahead(data + i, 128);
    s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i)));
    s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i + 32)));
    s2 = _mm256_add_epi64(s2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i + 64)));
    s3 = _mm256_add_epi64(s3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i + 96)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
  total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; i + 8 <= bytes; i += 8) {
    uint64_t v;
    __builtin_memcpy(&v, data + i, 8);
    total += v;
  }
  for (; i < bytes; ++i) total += data[i];
  return total;
}

}  // namespace cgq::cpu::CGQ_ISA
