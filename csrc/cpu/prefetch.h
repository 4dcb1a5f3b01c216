// Software prefetch of the next tile of weight rows for the GEMV kernels (qlinear_kernels.cpp,
// qlinear_vnni.h, qlinear_limbs_avx2.h, qlinear_i8gemv.h) and the GEMMs (qlinear_gemm.h,
// qlinear_i8gemm.h), which read weights the same way when x has few tiles of rows. Included by
// per-ISA translation units only, so it lives in the ISA's namespace like everything they define.
//
// A tile reads its NR weight rows as NR interleaved streams. The hardware prefetchers serve
// several interleaved streams far worse than one sequential one, so every tile prefetches the
// next tile (the next NR rows, contiguous in memory) front to back, spread evenly over its own
// steps: one tile ahead, in memory order. Tiles of up to kL1PrefetchTileBytes go to L1 (short
// rows, as CodeGen-350M's, gain from it); larger ones to L2, as 8-32 KB would flush L1.
// The limb kernels (VNNI int8 and int4, AVX2 int4) prefetch two tiles ahead instead
// (kLimbTilesAhead): once the VNNI int4 kernel took two limbs (qlinear_vnni.h), one tile ahead no
// longer hid the latency. Prefetching a few lines ahead within each row instead (the textbook
// form) was slower for short rows and gained less for long ones. Prefetches past the buffer's
// end are harmless hints. What each choice gained: docs/cpu-kernels.md, "Prefetching".
#pragma once

#include <cstdint>

namespace cgq::cpu::CGQ_ISA {

constexpr int64_t kL1PrefetchTileBytes = 4096;
constexpr int64_t kLimbTilesAhead = 2;

// Prefetches the part of the next tile that matches one step of this tile: kStepBytes of each of
// its NR rows (of row_bytes each) starting at byte `offset`. Steps under a cache line prefetch
// their line more than once.
template <int NR, int kStepBytes>
inline void prefetch_next_tile(const void* next_tile, int64_t row_bytes, int64_t offset) {
  constexpr int kLines = NR * kStepBytes >= 64 ? NR * kStepBytes / 64 : 1;
  const char* p = static_cast<const char*>(next_tile) + offset * NR;
  if (NR * row_bytes <= kL1PrefetchTileBytes)
    for (int j = 0; j < kLines; ++j) __builtin_prefetch(p + j * 64, 0, 3);  // to L1
  else
    for (int j = 0; j < kLines; ++j) __builtin_prefetch(p + j * 64, 0, 2);  // to L2
}

}  // namespace cgq::cpu::CGQ_ISA
