// The constants that decide which path a qlinear call takes and how its work is tiled, defined
// once: the per-ISA kernels read them from here, and bindings_cpu.cpp exports them
// (codegen_q._C_cpu.kernel_constants()) so the tests aim at the boundaries the build has instead
// of restating them. Plain values in a namespace of their own, so every ISA's translation unit and
// the binding see the same definitions.
#pragma once

#include <cstdint>

namespace cgq::cpu::kernel_constants {

// limb_layout.h, keeps_two_limbs: a chunk takes two activation limbs when each of its blocks has
// amax * len * kTwoLimbFactor <= (K + 2) * sum|x| (520 keeps the two-limb error within half the
// fp32-accumulation bound; the rest is margin).
inline constexpr double kTwoLimbFactor = 544.0;
// The limb GEMVs' unit of work along K: one 128-element chunk, 64 bytes of int4 weights.
inline constexpr int64_t kLimbChunk = 128;

// Rows of x up to which qlinear runs the native kernels on the scalar build; more take
// dequantize + torch's GEMM there (its FMA kernels are compute-bound sooner). The AVX2 and AVX-512
// builds have no limit (Isa::native_max_m): their blocked GEMM beats torch's fp32 GEMM on
// dequantized weights at every M measured (docs/cpu-kernels.md, "Which kernel takes a call").
inline constexpr int64_t kNativeMaxMScalar = 16;
// With gemm_dtype=bfloat16, rows beyond this take torch's bf16 GEMM, faster there than the native
// fp32 kernels where the CPU multiplies bf16 natively (AVX-512 BF16).
inline constexpr int64_t kNativeMaxMBf16 = 64;
inline constexpr int64_t kNoLimit = INT64_MAX;

struct Isa {
  // Rows of x up to which qlinear runs the native kernels (kNoLimit: every M).
  int64_t native_max_m;
  // Rows of x (M) up to which the integer limb GEMVs run instead of the fp32 kernels; 0: never.
  int64_t limb_max_m_int8, limb_max_m_int4;
  // The blocked GEMM's tile (qlinear_gemm.h): rows of x per tile (its lanes) and weight rows.
  int64_t gemm_tile_m, gemm_tile_n;
  // Rows of x up to which int8 activations take the GEMV (qlinear_i8gemv.h) instead of the GEMM
  // (qlinear_i8gemm.h). Both give the same bits; this is only about speed. 0: no GEMV (AVX-512,
  // until its twin of the AVX2 GEMV has run on an AVX-512 machine).
  int64_t int8_gemv_max_m;
};

// AVX-512: the VNNI GEMVs pay one vpdpbusd per limb for every 64 products of a row of x, the fp32
// ones one FMA per 16, so integer wins for few rows only (docs/cpu-kernels.md has the figures).
inline constexpr Isa kAvx512{kNoLimit, 1, 3, 32, 12, 0};
// AVX2: int4 at M = 1 runs on limbs and vpmaddubsw; int8 keeps the fp32 kernels. With int8
// activations, a row on the GEMV costs a tenth to an eleventh of the GEMM's padded 16-row tile, so
// the two cost the same near 10 rows; 8 keeps the GEMV where it is clearly cheaper
// (docs/cpu-kernels.md, "int8 activations for few rows").
inline constexpr Isa kAvx2{kNoLimit, 0, 1, 16, 5, 8};

}  // namespace cgq::cpu::kernel_constants
