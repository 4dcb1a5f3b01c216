// Software prefetch of the next tile for the GEMV kernels (qlinear_kernels.cpp, qlinear_vnni.h,
// qlinear_limbs_avx2.h). Included by per-ISA translation units only, so it lives in the ISA's
// namespace like everything they define.
//
// A tile reads its NR weight rows as NR interleaved streams. On the 2-core dev VM (Zen 4) the
// hardware prefetchers serve several interleaved streams far worse than one sequential one, so
// every tile prefetches the next tile (the next NR rows, contiguous in memory) front to back,
// spread evenly over its own steps: one tile ahead, in memory order. Tiles of up to
// kL1PrefetchTileBytes go to L1; larger ones to L2, as 8-32 KB would flush L1.
// Measured single-threaded, GB/s of weights read from DRAM at M = 1 (read bandwidth 20-22 GB/s),
// before -> after, on the VNNI kernels:
//   int4 g128  2 KB rows (6B qkv/fc_in, prefetched before into L1) 17.2 -> 17.4-17.9,
//              3 KB rows (16B fc_in, prefetched into L1) 10.8-11.8 -> 18.7-19.3,
//              8 KB rows (6B fc_out, not prefetched)      10.6-13.1 -> 18.4-19.0;
//   int8       4 KB rows (not prefetched)                 11.5-13.8 -> 15.2-16.7 (20.6-24.8 with
//              int8_tile's per-block accumulators).
// AVX2's fp32 int8 kernel at M = 1, 2 threads: 24-27 -> 28-41 GB/s.
// The limb kernels (VNNI int8 and int4, AVX2 int4) prefetch two tiles ahead instead
// (kLimbTilesAhead): once the VNNI int4 kernel took two limbs (qlinear_vnni.h), one tile ahead no
// longer hid the latency. Single-threaded, M = 1, builds taking turns: VNNI int4 2 KB rows (6B
// qkv/fc_in) 19.8-22.4 -> 24.1-25.8 GB/s, 3 KB rows (16B fc_in) 20.8-22.5 -> 22.8-23.8, 8 KB rows
// (6B fc_out) 21.4-22.3 -> 22.4-22.8; AVX2 int4 12.2-14.6 -> 14.7-15.6 (read bandwidth 24-28
// GB/s). VNNI int8, two threads, three runs each taking turns: 74-98 -> 81-103 % of the bandwidth.
// Short rows (CodeGen-350M: int4 K = 1024, 2 KB tiles) gain from L1: two threads, int4 1024 x
// 3072 100 us to L1 against 163-179 us to L2, int8 lm_head 1024 x 51200 1.09-1.31 ms against
// 1.25-1.44 ms. Prefetching a few lines ahead within each row instead (the textbook form)
// measured 30 % slower for 2 KB rows and gained half as much for long ones. Prefetches past the
// buffer's end are harmless hints.
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
