// Weight-only qlinear entry points. The small-M GEMV (qlinear_gemv.cu) serves every aligned
// call; the plain kernel below (one warp per output element, lanes stride over K) serves the rest
// (int8 with K not a multiple of 16, unaligned views), and stays as the obviously-correct version.
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/int4_unpack.cuh"
#include "cuda/qlinear_gemv.cuh"

namespace cgq::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__global__ void qlinear_int8_kernel(const float* __restrict__ x, const int8_t* __restrict__ w,
                                    const uint16_t* __restrict__ scales, const float* __restrict__ bias,
                                    float* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t m = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (n >= N || m >= M) return;
  const int8_t* row = w + n * K;
  const float* xr = x + m * K;
  float acc = 0.0f;
  for (int64_t k = lane; k < K; k += 32) acc += xr[k] * static_cast<float>(row[k]);
  acc = warp_sum(acc);
  if (lane == 0) y[m * N + n] = acc * fp16_bits_to_float(scales[n]) + (bias ? bias[n] : 0.0f);
}

__global__ void qlinear_int4_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w,
                                    const uint16_t* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                    int64_t group_size, const float* __restrict__ bias, float* __restrict__ y,
                                    int64_t M, int64_t N, int64_t K) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t m = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (n >= N || m >= M) return;
  const int64_t groups = K / group_size;
  const uint8_t* row = w + n * (K / 2);
  const float* xr = x + m * K;
  float acc = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t g = n * groups + k / group_size;
    const int zero = zeros ? zeros[g] : kInt4SymmetricZero;
    acc += xr[k] * static_cast<float>(int4_at(row, k) - zero) * fp16_bits_to_float(scales[g]);
  }
  acc = warp_sum(acc);
  if (lane == 0) y[m * N + n] = acc + (bias ? bias[n] : 0.0f);
}

dim3 grid_for(int64_t M, int64_t N) {
  if (M > 65535) throw std::invalid_argument("the CUDA qlinear handles at most 65535 rows of x per call");
  return dim3(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock), static_cast<unsigned>(M));
}

}  // namespace

void qlinear_int8(const QLinearArgs& a, uintptr_t stream) {
  check_linear_shapes(a.N, a.K, a.qweight, a.scales, a.y, false, 0);
  if (a.M == 0 || a.N == 0) return;
  if (gemv_int8(a.x, a.M, a.K, static_cast<const int8_t*>(a.qweight), a.scales, a.bias, a.y, a.N,
                as_stream(stream)))
    return;
  qlinear_int8_kernel<<<grid_for(a.M, a.N), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
      a.x, static_cast<const int8_t*>(a.qweight), a.scales, a.bias, a.y, a.M, a.N, a.K);
  throw_if_error(cudaGetLastError(), "qlinear_int8 launch");
}

void qlinear_int4(const QLinearArgs& a, uintptr_t stream) {
  check_linear_shapes(a.N, a.K, a.qweight, a.scales, a.y, true, a.group_size);
  if (a.M == 0 || a.N == 0) return;
  if (gemv_int4(a.x, a.M, a.K, static_cast<const uint8_t*>(a.qweight), a.scales, a.zeros, a.group_size, a.bias,
                a.y, a.N, as_stream(stream)))
    return;
  qlinear_int4_kernel<<<grid_for(a.M, a.N), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
      a.x, static_cast<const uint8_t*>(a.qweight), a.scales, a.zeros, a.group_size, a.bias, a.y, a.M, a.N, a.K);
  throw_if_error(cudaGetLastError(), "qlinear_int4 launch");
}

}  // namespace cgq::cuda
