// Dequantize a weight (or a tile of its rows) to float32, float16 or bfloat16, one thread per
// element (grid-stride). (q - zero) * scale is exact in fp32 (a <= 8-bit integer times an fp16
// scale), so the one rounding to a 16-bit type gives the same bits as rounding the CPU's fp32.
#include "cuda/activation_types.cuh"
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/int4_unpack.cuh"

namespace cgq::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                                       T* __restrict__ out, int64_t N, int64_t K) {
  const int64_t total = N * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(static_cast<float>(w[i]) * fp16_bits_to_float(scales[i / K]));
}

template <typename T>
__global__ void dequantize_int4_kernel(const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                                       const uint8_t* __restrict__ zeros, int64_t group_size,
                                       T* __restrict__ out, int64_t N, int64_t K) {
  const int64_t total = N * K;
  const int64_t groups = K / group_size;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K;
    const int64_t g = n * groups + k / group_size;
    const int zero = zeros ? zeros[g] : kInt4SymmetricZero;
    out[i] = from_float<T>(static_cast<float>(int4_at(w + n * (K / 2), k) - zero) * fp16_bits_to_float(scales[g]));
  }
}

unsigned blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(wanted < 65535 * 8 ? wanted : 65535 * 8);
}

}  // namespace

void dequantize(const DequantizeArgs& a, uintptr_t stream) {
  if (a.bits != 8 && a.bits != 4) throw std::invalid_argument("bits must be 8 or 4");
  check_linear_shapes(a.N, a.K, a.qweight, a.scales, a.out, a.bits == 4, a.group_size);
  if (a.N == 0) return;
  with_act_type(a.out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* out = static_cast<T*>(a.out);
    if (a.bits == 8) {
      dequantize_int8_kernel<T><<<blocks_for(a.N * a.K), kThreads, 0, as_stream(stream)>>>(
          static_cast<const int8_t*>(a.qweight), a.scales, out, a.N, a.K);
    } else {
      dequantize_int4_kernel<T><<<blocks_for(a.N * a.K), kThreads, 0, as_stream(stream)>>>(
          static_cast<const uint8_t*>(a.qweight), a.scales, a.zeros, a.group_size, out, a.N, a.K);
    }
  });
  throw_if_error(cudaGetLastError(), "dequantize launch");
}

}  // namespace cgq::cuda
