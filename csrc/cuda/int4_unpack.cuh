// Element k of a row in the int4 layout of common/qformat.h.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "common/qformat.h"

namespace cgq::cuda {

__device__ __forceinline__ int int4_at(const uint8_t* row, int64_t k) {
  const int64_t block = k / kInt4BlockElems;
  const int j = static_cast<int>(k % kInt4BlockElems);
  const uint8_t byte = row[block * kInt4BlockBytes + (j & 15)];
  return j < 16 ? (byte & 0x0F) : (byte >> 4);
}

__device__ __forceinline__ float fp16_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

}  // namespace cgq::cuda
