// The activation dtypes of the CUDA ops (ActType in qlinear_plan.h) as device types: conversions
// to and from float32, and the host-side switch from an ActType to its type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "cuda/qlinear_plan.h"

namespace cgq::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounded to nearest even, as torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the device type T of `act`.
template <typename Fn>
void with_act_type(ActType act, Fn&& fn) {
  switch (act) {
    case ActType::kFloat32: fn(TypeTag<float>{}); return;
    case ActType::kFloat16: fn(TypeTag<__half>{}); return;
    case ActType::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); return;
  }
  throw std::invalid_argument("activation type must be float32 (0), float16 (1) or bfloat16 (2)");
}

}  // namespace cgq::cuda
