// Small-M weight-only GEMV kernels; the design is described in qlinear_gemv.cuh.
#include <cuda_runtime.h>

#include "common/qformat.h"
#include "cuda/cuda_check.h"
#include "cuda/int4_unpack.cuh"
#include "cuda/qlinear_gemv.cuh"

namespace cgq::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;  // up to four K slices per row group (see split_for)
constexpr float kTwo23 = 8388608.0f;

// Shape of the work per M (rows of x): rows of W per block (x reused across them) and 16-byte
// loads per row issued ahead of the math, as many as the registers allow without spilling.
template <bool kInt4, int M>
struct GemvTile {
  static constexpr int kRows = kInt4 && M > 2 ? 2 : 4;
  static constexpr int kUnroll = M == 1 ? 2 : 1;
};

// The float 2^23 + (byte `i` of `word`), exactly.
template <int i>
__device__ __forceinline__ float byte_plus_two23(uint32_t word) {
  // Selector: result byte 0 = byte i of `word`; bytes 1, 2 = zero bytes of 0x4B000000; byte 3 = 0x4B.
  return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540 | i));
}

// Four consecutive elements held one per byte of `word`, as floats minus `offset` (exact).
__device__ __forceinline__ void bytes_to_floats(uint32_t word, float offset_plus_two23, float* out) {
  out[0] = byte_plus_two23<0>(word) - offset_plus_two23;
  out[1] = byte_plus_two23<1>(word) - offset_plus_two23;
  out[2] = byte_plus_two23<2>(word) - offset_plus_two23;
  out[3] = byte_plus_two23<3>(word) - offset_plus_two23;
}

// The elements of one 16-byte chunk of a row as exact floats (q - offset): 16 int8 values, or
// one int4 block of 32 (byte j holds element j in its low nibble and element j + 16 in its high).
template <bool kInt4>
__device__ __forceinline__ void decode_chunk(uint4 packed, float offset, float* out) {
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
  if constexpr (kInt4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      bytes_to_floats(words[i] & 0x0F0F0F0Fu, kTwo23 + offset, out + 4 * i);
      bytes_to_floats((words[i] >> 4) & 0x0F0F0F0Fu, kTwo23 + offset, out + 16 + 4 * i);
    }
  } else {
    // Stored int8 q; q ^ 0x80 is q + 128 as an unsigned byte.
#pragma unroll
    for (int i = 0; i < 4; ++i) bytes_to_floats(words[i] ^ 0x80808080u, kTwo23 + 128.0f, out + 4 * i);
  }
}

template <bool kInt4, int M>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                const uint8_t* __restrict__ zeros, int group_shift, const float* __restrict__ bias,
                float* __restrict__ y, int64_t N, int64_t K, int split) {
  constexpr int R = GemvTile<kInt4, M>::kRows;
  constexpr int U = GemvTile<kInt4, M>::kUnroll;
  constexpr int E = kInt4 ? kInt4BlockElems : 16;  // elements per 16-byte chunk
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  // The block's warps form (kWarpsPerBlock / split) groups of R rows; the `split` warps of a
  // group take interleaved slices of K.
  const int groups_per_block = kWarpsPerBlock / split;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * groups_per_block + warp / split) * R;
  const int slice = warp % split;
  const int64_t chunks = K / E;
  const int64_t row_bytes = kInt4 ? K / 2 : K;
  const int64_t groups = kInt4 ? K >> (group_shift + 5) : 1;
  const uint4* wrow[R];
  const uint16_t* srow[R];
  const uint8_t* zrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r < N ? n0 + r : N - 1;  // past-the-end rows: read, never written
    wrow[r] = reinterpret_cast<const uint4*>(w + n * row_bytes);
    srow[r] = scales + n * groups;
    zrow[r] = zeros ? zeros + n * groups : nullptr;
  }

  float acc[R][M] = {};
  const int64_t stride = static_cast<int64_t>(split) * 32;
  for (int64_t base = slice * 32 + lane; base < chunks; base += stride * U) {
    uint4 packed[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = base + u * stride;
#pragma unroll
      for (int r = 0; r < R; ++r) packed[u][r] = c < chunks ? __ldg(wrow[r] + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = base + u * stride;
      if (c >= chunks) break;
      float scale[R], zero[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (kInt4) {
          const int64_t g = c >> group_shift;  // chunks per group is a power of two
          scale[r] = fp16_bits_to_float(__ldg(srow[r] + g));
          zero[r] = zrow[r] ? static_cast<float>(__ldg(zrow[r] + g)) : static_cast<float>(kInt4SymmetricZero);
        } else {
          scale[r] = 1.0f, zero[r] = 0.0f;  // int8: the row scale is applied once, at the end
        }
      }
      // One row of x: decode each row of W as it is used. Several: decode all R rows once and
      // keep them in registers, so each x row costs only its loads and FMAs.
      constexpr bool kDecodeOnce = M > 1;
      float wf[kDecodeOnce ? R : 1][E];
      if constexpr (kDecodeOnce) {
#pragma unroll
        for (int r = 0; r < R; ++r) decode_chunk<kInt4>(packed[u][r], zero[r], wf[r]);
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        // x once per chunk and row of x, shared by the R rows of W (fp32 x is the larger read).
        float xr[E];
        const float4* x4 = reinterpret_cast<const float4*>(x + m * K + c * E);
#pragma unroll
        for (int i = 0; i < E / 4; ++i) {
          const float4 v = __ldg(x4 + i);
          xr[4 * i] = v.x, xr[4 * i + 1] = v.y, xr[4 * i + 2] = v.z, xr[4 * i + 3] = v.w;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float* wr = wf[kDecodeOnce ? r : 0];
          if constexpr (!kDecodeOnce) decode_chunk<kInt4>(packed[u][r], zero[r], wr);
          float s = 0.0f;
#pragma unroll
          for (int e = 0; e < E; ++e) s = fmaf(xr[e], wr[e], s);
          acc[r][m] = kInt4 ? fmaf(s, scale[r], acc[r][m]) : acc[r][m] + s;
        }
      }
    }
  }

  // Reduce over the lanes of each warp, then over the K slices of each row group.
  __shared__ float partial[kWarpsPerBlock][R * M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][r * M + m] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < groups_per_block * R * M; i += blockDim.x) {
    const int group = i / (R * M), j = i % (R * M);
    const int64_t n = (static_cast<int64_t>(blockIdx.x) * groups_per_block + group) * R + j / M;
    if (n >= N) continue;
    float v = 0.0f;
    for (int sl = 0; sl < split; ++sl) v += partial[group * split + sl][j];
    if constexpr (!kInt4) v *= fp16_bits_to_float(scales[n]);
    y[(j % M) * N + n] = v + (bias ? bias[n] : 0.0f);
  }
}

// K slices per row group: enough that every warp gets at least one full unrolled step of loads,
// at most one per warp of the block. Small K: more row groups per block instead.
template <bool kInt4, int M>
int split_for(int64_t K) {
  constexpr int E = kInt4 ? kInt4BlockElems : 16;
  const int64_t chunks = K / E;
  int split = kWarpsPerBlock;
  while (split > 1 && chunks < static_cast<int64_t>(split) * 32 * GemvTile<kInt4, M>::kUnroll) split /= 2;
  return split;
}

template <bool kInt4, int M>
void launch_gemv(const float* x, int64_t K, const uint8_t* w, const uint16_t* scales, const uint8_t* zeros,
                 int group_shift, const float* bias, float* y, int64_t N, cudaStream_t stream) {
  const int split = split_for<kInt4, M>(K);
  const int64_t rows_per_block = static_cast<int64_t>(kWarpsPerBlock / split) * GemvTile<kInt4, M>::kRows;
  const auto blocks = static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block);
  gemv_kernel<kInt4, M><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(x, w, scales, zeros, group_shift, bias, y, N,
                                                                    K, split);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }


// Launch the kernel instantiated for M rows of x (1..kMaxGemvM): the row count is a template
// parameter so that the accumulators live in registers.
#define CGQ_GEMV_SWITCH_M(M, LAUNCH)                          \
  switch (M) {                                               \
    case 1: LAUNCH(1); break;                                \
    case 2: LAUNCH(2); break;                                \
    case 3: LAUNCH(3); break;                                \
    case 4: LAUNCH(4); break;                                \
    case 5: LAUNCH(5); break;                                \
    case 6: LAUNCH(6); break;                                \
    case 7: LAUNCH(7); break;                                \
    case 8: LAUNCH(8); break;                                \
    default: throw std::invalid_argument("gemv: M out of range"); \
  }

}  // namespace

bool gemv_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, const float* bias,
               float* y, int64_t N, cudaStream_t stream) {
  if (K % 16 != 0 || !aligned16(x) || !aligned16(w)) return false;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvM) {
    const int64_t rows = M - m0 < kMaxGemvM ? M - m0 : kMaxGemvM;
    const float* xs = x + m0 * K;
    float* ys = y + m0 * N;
#define CGQ_LAUNCH(m) \
  launch_gemv<false, m>(xs, K, reinterpret_cast<const uint8_t*>(w), scales, nullptr, 0, bias, ys, N, stream)
    CGQ_GEMV_SWITCH_M(rows, CGQ_LAUNCH)
#undef CGQ_LAUNCH
    throw_if_error(cudaGetLastError(), "qlinear_int8 (gemv) launch");
  }
  return true;
}

bool gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
               const uint8_t* zeros, int64_t group_size, const float* bias, float* y, int64_t N,
               cudaStream_t stream) {
  if (!aligned16(x) || !aligned16(w)) return false;
  const int group_shift = group_size == 128 ? 2 : (group_size == 64 ? 1 : 0);  // log2(chunks per group)
  for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvM) {
    const int64_t rows = M - m0 < kMaxGemvM ? M - m0 : kMaxGemvM;
    const float* xs = x + m0 * K;
    float* ys = y + m0 * N;
#define CGQ_LAUNCH(m) launch_gemv<true, m>(xs, K, w, scales, zeros, group_shift, bias, ys, N, stream)
    CGQ_GEMV_SWITCH_M(rows, CGQ_LAUNCH)
#undef CGQ_LAUNCH
    throw_if_error(cudaGetLastError(), "qlinear_int4 (gemv) launch");
  }
  return true;
}

}  // namespace cgq::cuda
