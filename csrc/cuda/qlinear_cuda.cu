// The CUDA qlinear entry point: checks the arguments, asks choose_qlinear_kernel (qlinear_plan.h)
// which kernel serves the call, and launches it: the small-M GEMV (qlinear_gemv.cu), the
// tensor-core GEMM (qlinear_mma.cu), or the plain kernel below (one warp per output element, lanes stride over K, fp32
// products) serves the rest and stays as the obviously-correct version.
#include "cuda/activation_types.cuh"
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/int4_unpack.cuh"
#include "cuda/qlinear_gemv.cuh"
#include "cuda/qlinear_mma.cuh"

namespace cgq::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void qlinear_int8_kernel(const T* __restrict__ x, const int8_t* __restrict__ w,
                                    const uint16_t* __restrict__ scales, const float* __restrict__ bias,
                                    T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t m = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (n >= N || m >= M) return;
  const int8_t* row = w + n * K;
  const T* xr = x + m * K;
  float acc = 0.0f;
  for (int64_t k = lane; k < K; k += 32) acc += to_float(xr[k]) * static_cast<float>(row[k]);
  acc = warp_sum(acc);
  if (lane == 0) y[m * N + n] = from_float<T>(acc * fp16_bits_to_float(scales[n]) + (bias ? bias[n] : 0.0f));
}

template <typename T>
__global__ void qlinear_int4_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                    const uint16_t* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                    int64_t group_size, const float* __restrict__ bias, T* __restrict__ y,
                                    int64_t M, int64_t N, int64_t K) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t m = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (n >= N || m >= M) return;
  const int64_t groups = K / group_size;
  const uint8_t* row = w + n * (K / 2);
  const T* xr = x + m * K;
  float acc = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t g = n * groups + k / group_size;
    const int zero = zeros ? zeros[g] : kInt4SymmetricZero;
    acc += to_float(xr[k]) * static_cast<float>(int4_at(row, k) - zero) * fp16_bits_to_float(scales[g]);
  }
  acc = warp_sum(acc);
  if (lane == 0) y[m * N + n] = from_float<T>(acc + (bias ? bias[n] : 0.0f));
}

void launch_plain(const LinearArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.N + kWarpsPerBlock - 1) / kWarpsPerBlock), static_cast<unsigned>(a.M));
  with_act_type(a.act, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    if (a.bits == 8) {
      qlinear_int8_kernel<T><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          x, static_cast<const int8_t*>(a.qweight), a.scales, a.bias, y, a.M, a.N, a.K);
    } else {
      qlinear_int4_kernel<T><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          x, static_cast<const uint8_t*>(a.qweight), a.scales, a.zeros, a.group_size, a.bias, y, a.M, a.N, a.K);
    }
  });
  throw_if_error(cudaGetLastError(), "qlinear (plain kernel) launch");
}

}  // namespace

void qlinear(const LinearArgs& a, uintptr_t stream) {
  if (a.bits != 8 && a.bits != 4) throw std::invalid_argument("bits must be 8 or 4");
  check_linear_shapes(a.N, a.K, a.qweight, a.scales, a.y, a.bits == 4, a.group_size);
  if (!a.x) throw std::invalid_argument("null x pointer");
  if (a.M < 0) throw std::invalid_argument("M must be >= 0");
  if (a.M == 0 || a.N == 0) return;
  switch (choose_qlinear_kernel(a.M, a.K, a.bits, a.act, a.arch, a.x, a.qweight)) {
    case QLinearKernel::kGemv: gemv(a, as_stream(stream)); return;
    case QLinearKernel::kPlain: launch_plain(a, as_stream(stream)); return;
    case QLinearKernel::kMma: mma_gemm(a, as_stream(stream)); return;
    case QLinearKernel::kDequantGemm: break;
  }
  throw std::invalid_argument("more rows of x than the CUDA GEMV takes (qlinear_kernel names the caller's GEMM path)");
}

}  // namespace cgq::cuda
