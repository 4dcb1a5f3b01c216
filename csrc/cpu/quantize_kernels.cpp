// The per-element pass of round-to-nearest quantization, given the scales (and zero points) that
// codegen_q/quantize.py computes: q = clamp(round(w / scale) + zero, lo, hi), packed as in
// common/qformat.h. Written as plain loops that the compiler vectorizes per ISA (the file is
// compiled once per ISA like qlinear_kernels.cpp). The operations and their order are those of
// the torch reference in quantize.py, so both give bit-identical weights (tested).
#include <cmath>
#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace cgq::cpu::CGQ_ISA {

void quantize_int8_rows(const float* w, int64_t K, const uint16_t* scales, int8_t* q, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    float s = Vec::half(scales[n]);
    if (!(s > 0.0f)) s = 1.0f;  // an all-zero row: divide by 1, as the reference does
    const float* row = w + n * K;
    int8_t* out = q + n * K;
    for (int64_t k = 0; k < K; ++k) {
      float v = ::nearbyintf(row[k] / s);
      v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
      out[k] = static_cast<int8_t>(v);
    }
  }
}

void quantize_int4_rows(const float* w, int64_t K, int64_t group_size, const uint16_t* scales, const uint8_t* zeros,
                        uint8_t* packed, int64_t n_begin, int64_t n_end) {
  const int64_t groups = K / group_size;
  alignas(64) uint8_t block[kInt4BlockElems];
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      float s = Vec::half(scales[n * groups + g]);
      if (!(s > 0.0f)) s = 1.0f;
      const float z = zeros ? static_cast<float>(zeros[n * groups + g]) : static_cast<float>(kInt4SymmetricZero);
      for (int64_t k0 = g * group_size; k0 < (g + 1) * group_size; k0 += kInt4BlockElems) {
        const float* src = w + n * K + k0;
        for (int j = 0; j < kInt4BlockElems; ++j) {
          float v = ::nearbyintf(src[j] / s) + z;
          v = v < 0.0f ? 0.0f : (v > 15.0f ? 15.0f : v);
          block[j] = static_cast<uint8_t>(v);
        }
        uint8_t* dst = packed + n * (K / 2) + k0 / 2;
        for (int j = 0; j < kInt4BlockBytes; ++j) dst[j] = static_cast<uint8_t>(block[j] | (block[j + 16] << 4));
      }
    }
  }
}

// Per (row, group of `group` elements) minimum and maximum, for the scales; returns false if the
// rows hold NaN or inf. Lane-wise running min/max over 16-element chunks (which vectorizes
// without -ffast-math), then a 16-way reduction per group; v * 0 is NaN exactly for NaN and inf.
bool minmax_rows(const float* w, int64_t K, int64_t group, float* lo, float* hi, int64_t n_begin, int64_t n_end) {
  constexpr int kLanes = 16;
  const int64_t groups = K / group;
  float finite = 0.0f;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* src = w + n * K + g * group;
      float l[kLanes], h[kLanes], z[kLanes];
      for (int j = 0; j < kLanes; ++j) l[j] = h[j] = src[0], z[j] = 0.0f;
      int64_t k = 0;
      for (; k + kLanes <= group; k += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const float v = src[k + j];
          l[j] = v < l[j] ? v : l[j];
          h[j] = v > h[j] ? v : h[j];
          z[j] += v * 0.0f;
        }
      for (; k < group; ++k) {
        const float v = src[k];
        l[0] = v < l[0] ? v : l[0];
        h[0] = v > h[0] ? v : h[0];
        z[0] += v * 0.0f;
      }
      float lmin = l[0], hmax = h[0];
      for (int j = 1; j < kLanes; ++j) {
        lmin = l[j] < lmin ? l[j] : lmin;
        hmax = h[j] > hmax ? h[j] : hmax;
        finite += z[j];
      }
      finite += z[0];
      lo[n * groups + g] = lmin;
      hi[n * groups + g] = hmax;
    }
  }
  return finite == 0.0f;
}

}  // namespace cgq::cpu::CGQ_ISA
