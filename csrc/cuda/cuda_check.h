#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/qformat.h"

namespace cgq::cuda {

inline void throw_if_error(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline void check_linear_shapes(int64_t N, int64_t K, const void* qweight, const void* scales, const void* out,
                                bool int4, int64_t group_size) {
  if (N < 0 || K <= 0) throw std::invalid_argument("N must be >= 0 and K > 0");
  if (!qweight || !scales || !out) throw std::invalid_argument("null weight, scale or output pointer");
  if (int4 && (!is_supported_group_size(group_size) || K % group_size != 0))
    throw std::invalid_argument("group_size must be 32, 64 or 128 and divide K");
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace cgq::cuda
