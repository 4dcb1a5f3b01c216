// Tensor-core GEMM for quantized weights; the design is described in qlinear_mma.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

#include "common/qformat.h"
#include "cuda/activation_types.cuh"
#include "cuda/cuda_check.h"
#include "cuda/int4_unpack.cuh"
#include "cuda/qlinear_mma.cuh"

namespace cgq::cuda {
namespace {

constexpr int kThreads = 128;            // 4 warps, 2 x 2 over the block's tile
constexpr int kTileM = kMmaTileM;        // rows of x per block
constexpr int kTileN = 64;               // output features per block
constexpr int kTileK = kMmaTileK;        // K per step: two int4 blocks
constexpr int kPad = 8;                  // row padding of the shared tiles: conflict-free fragment reads
constexpr int kStride = kTileK + kPad;   // elements per shared row
constexpr int kWarpM = 32, kWarpN = 32;  // each warp's sub-tile: 2 x 4 mma tiles of 16 x 8

template <typename T>
__device__ __forceinline__ uint32_t pair_at(const T* p) {  // two consecutive 16-bit elements
  uint32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

// d += a (16 x 16, row) * b (16 x 8, col), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float* d, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)d, (void)a, (void)b;
  __trap();  // choose_qlinear_kernel never picks this kernel before sm_80
#endif
}

// Stage rows [m0, m0 + kTileM) x columns [k0, k0 + kTileK) of x; rows past M are zeros.
template <typename T>
__device__ __forceinline__ void stage_x(const T* __restrict__ x, int64_t M, int64_t K, int64_t m0, int64_t k0,
                                        T (*xs)[kStride]) {
  constexpr int kVectors = kTileM * kTileK / 8;  // 16-byte vectors of 8 elements
#pragma unroll
  for (int i = threadIdx.x; i < kVectors; i += kThreads) {
    const int row = i / (kTileK / 8), col = (i % (kTileK / 8)) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (m0 + row < M) v = __ldg(reinterpret_cast<const uint4*>(x + (m0 + row) * K + k0 + col));
    memcpy(&xs[row][col], &v, sizeof v);
  }
}

// Dequantize rows [n0, n0 + kTileN) x columns [k0, k0 + kTileK) of W into ws; rows past N are zeros.
template <typename T, bool kInt4>
__device__ __forceinline__ void stage_w(const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                                        const uint8_t* __restrict__ zeros, int64_t group_size, int64_t N, int64_t K,
                                        int64_t n0, int64_t k0, T (*ws)[kStride]) {
  constexpr int kChunkElems = kInt4 ? kInt4BlockElems : 16;  // elements per 16 stored bytes
  constexpr int kChunks = kTileN * kTileK / kChunkElems;
#pragma unroll
  for (int i = threadIdx.x; i < kChunks; i += kThreads) {
    const int row = i / (kTileK / kChunkElems), col = (i % (kTileK / kChunkElems)) * kChunkElems;
    const int64_t n = n0 + row;
    T* out = &ws[row][col];
    if (n >= N) {
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) out[e] = from_float<T>(0.0f);
      continue;
    }
    const int64_t k = k0 + col;
    if constexpr (kInt4) {
      const uint4 packed = __ldg(reinterpret_cast<const uint4*>(w + n * (K / 2) + k / 2));
      const int64_t g = n * (K / group_size) + k / group_size;
      const float scale = fp16_bits_to_float(scales[g]);
      const int zero = zeros ? zeros[g] : kInt4SymmetricZero;
      uint8_t bytes[16];
      memcpy(bytes, &packed, sizeof bytes);
#pragma unroll
      for (int j = 0; j < 16; ++j) {  // byte j: element j (low nibble) and j + 16 (high nibble)
        out[j] = from_float<T>(static_cast<float>((bytes[j] & 0x0F) - zero) * scale);
        out[j + 16] = from_float<T>(static_cast<float>((bytes[j] >> 4) - zero) * scale);
      }
    } else {
      const uint4 packed = __ldg(reinterpret_cast<const uint4*>(w + n * K + k));
      const float scale = fp16_bits_to_float(scales[n]);
      int8_t q[16];
      memcpy(q, &packed, sizeof q);
#pragma unroll
      for (int j = 0; j < 16; ++j) out[j] = from_float<T>(static_cast<float>(q[j]) * scale);
    }
  }
}

template <typename T, bool kInt4>
__global__ void mma_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                           const uint8_t* __restrict__ zeros, int64_t group_size, const float* __restrict__ bias,
                           T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  __shared__ __align__(16) T xs[kTileM][kStride];
  __shared__ __align__(16) T ws[kTileN][kStride];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int group = lane / 4, member = lane % 4;  // the PTX fragment layout's groupID, threadID_in_group
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int wm = (warp / 2) * kWarpM, wn = (warp % 2) * kWarpN;  // the warp's sub-tile in the block's

  float acc[kWarpM / 16][kWarpN / 8][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    stage_x(x, M, K, m0, k0, xs);
    stage_w<T, kInt4>(w, scales, zeros, group_size, N, K, n0, k0, ws);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      // A (16 x 16, row-major): a0 = (group, 2 member), a1 = (group + 8, 2 member),
      // a2 = (group, 2 member + 8), a3 = (group + 8, 2 member + 8), two elements each.
      uint32_t a[kWarpM / 16][4];
#pragma unroll
      for (int i = 0; i < kWarpM / 16; ++i) {
        const int r = wm + 16 * i + group, c = kk + 2 * member;
        a[i][0] = pair_at(&xs[r][c]), a[i][1] = pair_at(&xs[r + 8][c]);
        a[i][2] = pair_at(&xs[r][c + 8]), a[i][3] = pair_at(&xs[r + 8][c + 8]);
      }
      // B (16 x 8, column-major = W's rows): b0 = (k 2 member, n group), b1 = (k 2 member + 8, n group).
#pragma unroll
      for (int j = 0; j < kWarpN / 8; ++j) {
        const int n = wn + 8 * j + group, c = kk + 2 * member;
        const uint32_t b[2] = {pair_at(&ws[n][c]), pair_at(&ws[n][c + 8])};
#pragma unroll
        for (int i = 0; i < kWarpM / 16; ++i) mma_16x8x16<T>(acc[i][j], a[i], b);
      }
    }
    __syncthreads();
  }

  // D: d0, d1 = (row group, columns 2 member, 2 member + 1); d2, d3 = the same columns of row group + 8.
#pragma unroll
  for (int i = 0; i < kWarpM / 16; ++i)
#pragma unroll
    for (int j = 0; j < kWarpN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + wm + 16 * i + group + (e >= 2 ? 8 : 0);
        const int64_t n = n0 + wn + 8 * j + 2 * member + (e & 1);
        if (m < M && n < N) y[m * N + n] = from_float<T>(acc[i][j][e] + (bias ? bias[n] : 0.0f));
      }
}

}  // namespace

void mma_gemm(const LinearArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.N + kTileN - 1) / kTileN), static_cast<unsigned>((a.M + kTileM - 1) / kTileM));
  auto launch = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    const auto* w = static_cast<const uint8_t*>(a.qweight);
    if (a.bits == 4) {
      mma_kernel<T, true><<<grid, kThreads, 0, stream>>>(x, w, a.scales, a.zeros, a.group_size, a.bias, y, a.M, a.N, a.K);
    } else {
      mma_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, w, a.scales, nullptr, 0, a.bias, y, a.M, a.N, a.K);
    }
  };
  if (a.act == ActType::kFloat16) {
    launch(TypeTag<__half>{});
  } else if (a.act == ActType::kBFloat16) {
    launch(TypeTag<__nv_bfloat16>{});
  } else {
    throw std::invalid_argument("the tensor-core GEMM takes float16 or bfloat16 activations");
  }
  throw_if_error(cudaGetLastError(), "qlinear (tensor-core GEMM) launch");
}

}  // namespace cgq::cuda
