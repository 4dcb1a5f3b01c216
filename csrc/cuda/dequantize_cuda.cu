// Dequantize a whole weight to float32, one thread per element (grid-stride).
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/int4_unpack.cuh"

namespace cgq::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void dequantize_int8_kernel(const int8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                                       float* __restrict__ out, int64_t N, int64_t K) {
  const int64_t total = N * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<float>(w[i]) * fp16_bits_to_float(scales[i / K]);
}

__global__ void dequantize_int4_kernel(const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                                       const uint8_t* __restrict__ zeros, int64_t group_size,
                                       float* __restrict__ out, int64_t N, int64_t K) {
  const int64_t total = N * K;
  const int64_t groups = K / group_size;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K;
    const int64_t g = n * groups + k / group_size;
    const int zero = zeros ? zeros[g] : kInt4SymmetricZero;
    out[i] = static_cast<float>(int4_at(w + n * (K / 2), k) - zero) * fp16_bits_to_float(scales[g]);
  }
}

unsigned blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(wanted < 65535 * 8 ? wanted : 65535 * 8);
}

}  // namespace

void dequantize_int8(const DequantArgs& a, uintptr_t stream) {
  check_linear_shapes(a.N, a.K, a.qweight, a.scales, a.out, false, 0);
  if (a.N == 0) return;
  dequantize_int8_kernel<<<blocks_for(a.N * a.K), kThreads, 0, as_stream(stream)>>>(
      static_cast<const int8_t*>(a.qweight), a.scales, a.out, a.N, a.K);
  throw_if_error(cudaGetLastError(), "dequantize_int8 launch");
}

void dequantize_int4(const DequantArgs& a, uintptr_t stream) {
  check_linear_shapes(a.N, a.K, a.qweight, a.scales, a.out, true, a.group_size);
  if (a.N == 0) return;
  dequantize_int4_kernel<<<blocks_for(a.N * a.K), kThreads, 0, as_stream(stream)>>>(
      static_cast<const uint8_t*>(a.qweight), a.scales, a.zeros, a.group_size, a.out, a.N, a.K);
  throw_if_error(cudaGetLastError(), "dequantize_int4 launch");
}

}  // namespace cgq::cuda
