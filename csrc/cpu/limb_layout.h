// The activation "limbs" workspace shared by the integer-dot-product GEMV kernels (AVX-512 VNNI in
// qlinear_vnni.h, AVX2 in qlinear_limbs_avx2.h). Each activation block is split on a power-of-two
// scale into three int8 limbs, x ~= 2^e (h + l / 128 + ll / 128^2), |h| <= 127, |l|, |ll| <= 64:
// power-of-two scaling and the limb splits are exact in fp32, so the only representation error is
// the last limb's rounding, <= 2^e / 2^15 ~ max|x_block| * 2^-21. Integer partial sums of limb x
// weight products are exact; blocks are combined in fp32.
//
// Included by per-ISA translation units only: everything here lives in the ISA's namespace, so no
// inline function compiled for one ISA can stand in for another's at link time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/kernel_constants.h"
#include "cpu/limb_policy.h"

namespace cgq::cpu::CGQ_ISA::limbs {

constexpr int kLimbs = 3;
constexpr int kInt8Block = 128;  // activation block for int8 weights (int4 uses its group size)
constexpr int64_t kAlign = 128;  // one int4 chunk: 64 bytes of weights, 128 elements

inline int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Workspace layout for M activation rows: per row, kLimbs int8 arrays of Kp (K padded to 128, zero
// filled) then, per block, the block scale and the block's zero-point sum 2^e * sum(x_hat), then
// the per-block fp32 flags, two bytes for the whole row and one per 128-element chunk.
//
// int4 chunks (the int4 limb GEMVs' unit of work) whose blocks all pass keeps_two_limbs take two
// limbs instead: x ~= s (h + l / 256) with s = amax / 127 (not a power of two), h = q >> 8 as
// int8 and l = q & 255 as *uint8*, where q = round(256 x / s); limb 2 is unused there and the
// block's sum is s * sum(q) / 256. For int4 the stored block scale includes the kernels' limb
// fold, 2^e * 2^-14 or s * 2^-8, so a chunk of either kind costs the kernel the same scaling.
//
// With `nibble_order` (int4 weights) each 128-element chunk of limbs is stored in the order one
// 64-byte load of packed weights yields after masking: first the low nibbles of its four 32-blocks
// (elements 0-15 of each), then the high nibbles (elements 16-31 of each). The weights then need
// no shuffles at all: `w & 0xF` and `(w >> 4) & 0xF` line up with the two halves of the limbs.
enum LimbMode : uint8_t { kThreeLimbs = 0, kTwoLimbs = 1, kMixedLimbs = 2 };

struct Layout {
  int64_t K, Kp, block, n_blocks, n_chunks, row_bytes;
  bool nibble_order;
  Layout(int64_t K_, int64_t block_, bool nibble_order_)
      : K(K_), Kp(round_up(K_, kAlign)), block(block_), nibble_order(nibble_order_) {
    n_blocks = (K + block - 1) / block;
    n_chunks = Kp / kAlign;
    row_bytes = round_up(kLimbs * Kp + 2 * n_blocks * static_cast<int64_t>(sizeof(float)) + n_blocks + 2 + n_chunks,
                         kAlign);
  }
  const int8_t* limb(const uint8_t* ws, int64_t m, int j) const {
    return reinterpret_cast<const int8_t*>(ws + m * row_bytes + j * Kp);
  }
  const float* block_scale(const uint8_t* ws, int64_t m) const {
    return reinterpret_cast<const float*>(ws + m * row_bytes + kLimbs * Kp);
  }
  const float* block_sum(const uint8_t* ws, int64_t m) const { return block_scale(ws, m) + n_blocks; }
  // 1 for blocks the kernels must compute in fp32 instead (see keeps_limbs), else 0; entry
  // n_blocks says whether the row has any, so the common case costs one byte read.
  const uint8_t* fp32_block(const uint8_t* ws, int64_t m) const {
    return reinterpret_cast<const uint8_t*>(block_sum(ws, m) + n_blocks);
  }
  // Row m's chunks: all three limbs, all two, or some of each (two_limb_chunk says which).
  LimbMode limb_mode(const uint8_t* ws, int64_t m) const { return LimbMode(fp32_block(ws, m)[n_blocks + 1]); }
  // 1 for the 128-element chunks of row m held as two limbs, else 0.
  const uint8_t* two_limb_chunk(const uint8_t* ws, int64_t m) const { return fp32_block(ws, m) + n_blocks + 2; }
  // Where the 16 elements starting at natural index k (a multiple of 16) are stored.
  int64_t position(int64_t k) const {
    if (!nibble_order) return k;
    const int64_t chunk = k & ~int64_t(127), in_chunk = k & 127;
    return chunk + ((in_chunk & 16) ? 64 : 0) + (in_chunk >> 5) * 16;
  }
};

// One activation row's part of the workspace, as prepare() fills it: limb arrays zero-padded past
// K, and no block marked fp32 yet.
struct RowOut {
  int8_t* limb[kLimbs];
  float* scales;
  float* sums;
  uint8_t* fp32_block;
  uint8_t* two_limb_chunk;
  RowOut(const Layout& L, uint8_t* ws, int64_t m) {
    uint8_t* row = ws + m * L.row_bytes;
    for (int j = 0; j < kLimbs; ++j) {
      limb[j] = reinterpret_cast<int8_t*>(row + j * L.Kp);
      std::memset(limb[j] + L.K, 0, static_cast<size_t>(L.Kp - L.K));
    }
    scales = reinterpret_cast<float*>(row + kLimbs * L.Kp);
    sums = scales + L.n_blocks;
    fp32_block = reinterpret_cast<uint8_t*>(sums + L.n_blocks);
    fp32_block[L.n_blocks] = 0;
    fp32_block[L.n_blocks + 1] = kThreeLimbs;
    two_limb_chunk = fp32_block + L.n_blocks + 2;
    std::memset(two_limb_chunk, 0, static_cast<size_t>(L.n_chunks));
  }
  // Marks the int4 chunks whose blocks all pass keeps_two_limbs and sets the row's LimbMode, from
  // each block's max |x| and sum |x|, which prepare()'s first pass leaves in scales[] and sums[].
  void choose_two_limb_chunks(const Layout& L);
  // Decides block b (elements k0 .. k0+len, max |x| = amax, sum |x| = abs_sum): marks it for the
  // fp32 pass if it fails keeps_limbs, and returns whether its limbs are to be computed. A block
  // in fp32 or all zeros contributes nothing through the limbs: its limbs and sums are zeroed.
  bool start_block(const Layout& L, int64_t b, int64_t k0, int64_t len, float amax, float abs_sum);
};

// Whether a block of `len` activations (max |x| = amax, sum |x| = abs_sum) of a row of K keeps
// limbs. The limb error is relative to the block maximum, so a block whose maximum towers over its
// other values (LLMs' "massive activations") would lose the small values' precision. Such blocks,
// and blocks holding NaN or inf, are computed in fp32 instead: a block keeps limbs only if
//   amax * len * 16 <= (K + 2) * sum|x_block|,
// i.e. if its limb error (< amax * 2^-21 per element) costs at most half of the fp32-accumulation
// error bound (K + 2) 2^-24 sum|x||w| that the float kernels meet (for weights of comparable
// size across the block). Small K therefore runs in fp32 entirely.
// Both criteria below: a block's limb error, at most amax * `per_element` per element in units
// of 2^-25, summed over `len` elements, within half the fp32 bound (K + 2) 2^-24 sum|x_block|
// (weights of comparable size across the block); never for NaN or inf.
inline bool within_half_fp32_bound(float amax, float abs_sum, int64_t len, int64_t K, double per_element) {
  return __builtin_isfinite(abs_sum) &&
         static_cast<double>(amax) * static_cast<double>(len) * per_element <=
             static_cast<double>(K + 2) * static_cast<double>(abs_sum);
}

inline bool keeps_limbs(float amax, float abs_sum, int64_t len, int64_t K) {
  return within_half_fp32_bound(amax, abs_sum, len, K, 16.0);
}

// Whether a block may take two limbs instead of three: the same budget as keeps_limbs (half the
// fp32-accumulation bound) for the two-limb error. With s = fl(amax / 127), t = fl(x fl(1 / s))
// and q = round(256 t): |x - s q / 256| <= s (254 u + 1/512) <= amax * 1.55e-5 (u = 2^-24), and
// len * amax * 1.55e-5 <= (K + 2) 2^-25 sum|x| is amax * len * 520 <= (K + 2) sum|x|;
// kTwoLimbFactor (544, kernel_constants.h) leaves a margin. Gaussian blocks of 128 have amax /
// mean|x| of about 3-4, so K >= ~2300 qualifies (CodeGen-2B's 2560 and up) and 350M's 1024
// keeps three limbs. amax below 2^-100 keeps three limbs too, so 1 / s stays far from overflow.
inline bool keeps_two_limbs(float amax, float abs_sum, int64_t len, int64_t K) {
  return (amax == 0.0f || amax >= 0x1p-100f) &&
         within_half_fp32_bound(amax, abs_sum, len, K, kernel_constants::kTwoLimbFactor);
}

inline void RowOut::choose_two_limb_chunks(const Layout& L) {
  if (!L.nibble_order || !two_limbs_allowed()) return;  // int8 weights keep three limbs
  const int64_t per_chunk = kAlign / L.block;  // int4 blocks (groups) divide a chunk
  int64_t twos = 0;
  for (int64_t c = 0; c < L.n_chunks; ++c) {
    bool two = true;
    for (int64_t b = c * per_chunk; b < (c + 1) * per_chunk && b < L.n_blocks; ++b)
      two = two && keeps_two_limbs(scales[b], sums[b], L.block, L.K);
    two_limb_chunk[c] = two ? 1 : 0;
    twos += two ? 1 : 0;
  }
  fp32_block[L.n_blocks + 1] = twos == 0 ? kThreeLimbs : twos == L.n_chunks ? kTwoLimbs : kMixedLimbs;
}

inline bool RowOut::start_block(const Layout& L, int64_t b, int64_t k0, int64_t len, float amax, float abs_sum) {
  const bool use_fp32 = !keeps_limbs(amax, abs_sum, len, L.K);
  fp32_block[b] = use_fp32 ? 1 : 0;
  fp32_block[L.n_blocks] |= fp32_block[b];
  if (!use_fp32 && amax > 0.0f) return true;
  for (int j = 0; j < kLimbs; ++j)
    for (int64_t k = 0; k < len; k += 16)
      std::memset(limb[j] + L.position(k0 + k), 0, static_cast<size_t>(len - k < 16 ? len - k : 16));
  scales[b] = 0.0f;
  sums[b] = 0.0f;
  return false;
}

// Fills the workspace rows of x [M, K] (prepare() of each ISA's limb kernels): each block's max
// |x| and sum |x| (stats(xb, len) -> {amax, abs_sum}), then which int4 chunks take two limbs,
// then each block that keeps limbs split by split_two or split_three (xb, len, amax, L, out, b,
// k0).
template <class Stats, class SplitTwo, class SplitThree>
void prepare_rows(const float* x, int64_t M, const Layout& L, uint8_t* ws, Stats stats, SplitTwo split_two,
                  SplitThree split_three) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * L.K;
    RowOut out(L, ws, m);
    // The blocks' statistics wait in scales[] and sums[] until their own split overwrites them.
    for (int64_t b = 0; b < L.n_blocks; ++b) {
      const int64_t k0 = b * L.block;
      const auto st = stats(xr + k0, (L.K - k0 < L.block) ? L.K - k0 : L.block);
      out.scales[b] = st.amax;
      out.sums[b] = st.abs_sum;
    }
    out.choose_two_limb_chunks(L);
    for (int64_t b = 0; b < L.n_blocks; ++b) {
      const int64_t k0 = b * L.block;
      const int64_t len = (L.K - k0 < L.block) ? L.K - k0 : L.block;
      const float amax = out.scales[b];
      if (!out.start_block(L, b, k0, len, amax, out.sums[b])) continue;
      if (out.two_limb_chunk[k0 / kAlign]) split_two(xr + k0, len, amax, L, out, b, k0);
      else split_three(xr + k0, len, amax, L, out, b, k0);
    }
  }
}

// Smallest e with amax / 2^e <= 127, so |h| <= 127 (amax > 0 and finite).
inline int block_exponent(float amax) {
  int e = std::ilogb(amax) - 6;
  while (std::ldexp(amax, -e) > 127.0f) ++e;
  while (std::ldexp(amax, -(e - 1)) <= 127.0f) --e;
  return e;
}

// The block's zero-point sum 2^e * sum(x_hat) from the integer sums of its three limbs.
inline float limb_sum(int64_t sum_h, int64_t sum_l, int64_t sum_ll, int e) {
  const double x_hat_sum = static_cast<double>(sum_h) + static_cast<double>(sum_l) / 128.0 +
                           static_cast<double>(sum_ll) / 16384.0;
  return static_cast<float>(std::ldexp(x_hat_sum, e));
}

}  // namespace cgq::cpu::CGQ_ISA::limbs
