// Small-M weight-only GEMV kernels; the design is described in qlinear_gemv.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

#include "common/qformat.h"
#include "cuda/activation_types.cuh"
#include "cuda/cuda_check.h"
#include "cuda/int4_unpack.cuh"
#include "cuda/qlinear_gemv.cuh"

namespace cgq::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;  // up to four K slices per row group (see split_for)
constexpr float kTwo23 = 8388608.0f;

// Shape of the work per activation type and M (rows of x): rows of W per warp (x reused across
// them) and 16-byte loads per row issued ahead of the math, as many as the registers allow
// without spilling (tools/check_cuda_build.py checks every architecture). The fp32 shapes were
// measured on an H100; the fp16 and bf16 ones are set from ptxas's register counts alone.
template <typename T, bool kInt4, int M>
struct GemvTile {
  static constexpr bool kFloat = std::is_same_v<T, float>;
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  static constexpr int kRows = kFloat ? (kInt4 && M > 2 ? 2 : 4)
                               : kHalf ? (M == 1 || (!kInt4 && M == 2) ? 4 : 2)
                                       : (M == 1 ? 4 : (kInt4 && M > 3 ? 1 : 2));
  static constexpr int kUnroll = M == 1 ? 2 : 1;
};

// ---------------------------------------------------------------- fp32 arithmetic (fp32, bf16 x)

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

// E consecutive activations as floats (exact: fp32 as is, bf16 by a shift into the high half).
template <int E>
__device__ __forceinline__ void load_x_floats(const float* x, float* out) {
  const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll
  for (int i = 0; i < E / 4; ++i) {
    const float4 v = __ldg(x4 + i);
    out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
  }
}

template <int E>
__device__ __forceinline__ void load_x_floats(const __nv_bfloat16* x, float* out) {
  const uint4* x16 = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < E / 8; ++i) {
    const uint4 v = __ldg(x16 + i);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[8 * i + 2 * j] = __uint_as_float(words[j] << 16);
      out[8 * i + 2 * j + 1] = __uint_as_float(words[j] & 0xFFFF0000u);
    }
  }
}

// ---------------------------------------------------------------- half2 arithmetic (fp16 x)

__device__ __forceinline__ __half2 half2_bits(uint32_t bits) {
  __half2 h;
  memcpy(&h, &bits, sizeof h);
  return h;
}

// The 32 elements of one int4 block as 16 half2 of exact (q - zero), in the pair order the masks
// give: for word i, (4i, 4i+2), (4i+1, 4i+3), (4i+16, 4i+18), (4i+17, 4i+19).
__device__ __forceinline__ void decode_int4_half(uint4 packed, int zero, __half2* out) {
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
  const __half2 low_offset = half2_bits((0x6400u + static_cast<uint32_t>(zero)) * 0x00010001u);  // 1024 + zero
  const __half2 sixteenth = half2_bits(0x2C002C00u);
  const __half2 high_offset = __float2half2_rn(-(64.0f + static_cast<float>(zero)));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t w = words[i];
#pragma unroll
    for (int odd = 0; odd < 2; ++odd) {
      out[4 * i + odd] = __hsub2(half2_bits((w & 0x000F000Fu) | 0x64006400u), low_offset);
      // 1024 + 16 q, times 1/16, minus 64 + zero: q - zero, fused into one exact rounding.
      out[4 * i + 2 + odd] = __hfma2(half2_bits((w & 0x00F000F0u) | 0x64006400u), sixteenth, high_offset);
      w >>= 8;
    }
  }
}

// The 16 elements of an int8 chunk as 8 half2 of q * scale rounded to fp16, in the pair order
// (4i, 4i+2), (4i+1, 4i+3) for word i.
__device__ __forceinline__ void decode_int8_half(uint4 packed, __half2 scale, __half2* out) {
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
  const __half2 offset = half2_bits(0x64806480u);  // 1152 = 1024 + 128
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = words[i] ^ 0x80808080u;  // q + 128 as unsigned bytes
    // Bytes 0 and 2 (then 1 and 3) under 0x64: the fp16 pair 1024 + q + 128.
    out[2 * i] = __hmul2(__hsub2(half2_bits(__byte_perm(w, 0x64646464u, 0x4240)), offset), scale);
    out[2 * i + 1] = __hmul2(__hsub2(half2_bits(__byte_perm(w, 0x64646464u, 0x4341)), offset), scale);
  }
}

// One chunk of x (32 elements for int4, 16 for int8) regrouped into the weights' pair order.
template <bool kInt4>
__device__ __forceinline__ void load_x_half_pairs(const __half* x, __half2* out) {
  constexpr int kPairs = kInt4 ? 16 : 8;
  __half2 natural[kPairs];  // (x[2j], x[2j + 1])
  const uint4* x16 = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < kPairs / 4; ++i) {
    const uint4 v = __ldg(x16 + i);
    natural[4 * i] = half2_bits(v.x), natural[4 * i + 1] = half2_bits(v.y);
    natural[4 * i + 2] = half2_bits(v.z), natural[4 * i + 3] = half2_bits(v.w);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 a = natural[2 * i], b = natural[2 * i + 1];  // elements 4i .. 4i+3
    if constexpr (kInt4) {
      const __half2 c = natural[8 + 2 * i], d = natural[9 + 2 * i];  // elements 4i+16 .. 4i+19
      out[4 * i] = __lows2half2(a, b), out[4 * i + 1] = __highs2half2(a, b);
      out[4 * i + 2] = __lows2half2(c, d), out[4 * i + 3] = __highs2half2(c, d);
    } else {
      out[2 * i] = __lows2half2(a, b), out[2 * i + 1] = __highs2half2(a, b);
    }
  }
}

// sum_j xs[j] . ws[j] over kPairs half2 pairs: half2 chains of kHalfChainProducts products per
// half, each chain converted and added in fp32.
template <int kPairs>
__device__ __forceinline__ float dot_half(const __half2* xs, const __half2* ws) {
  static_assert(kPairs % kHalfChainProducts == 0, "whole chains");
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < kPairs; c += kHalfChainProducts) {
    __half2 p = __hmul2(xs[c], ws[c]);
#pragma unroll
    for (int j = 1; j < kHalfChainProducts; ++j) p = __hfma2(xs[c + j], ws[c + j], p);
    const float2 f = __half22float2(p);
    s += f.x + f.y;
  }
  return s;
}

// ---------------------------------------------------------------- the kernel

// No __launch_bounds__: with it, ptxas trades a few bytes of spills for occupancy in many of these
// instantiations; without it, none spills on any architecture (tools/check_cuda_build.py).
template <typename T, bool kInt4, int M>
__global__ void gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                const uint8_t* __restrict__ zeros, int group_shift, const float* __restrict__ bias,
                T* __restrict__ y, int64_t N, int64_t K, int split) {
  constexpr bool kHalf = std::is_same_v<T, __half>;
  constexpr int R = GemvTile<T, kInt4, M>::kRows;
  constexpr int U = GemvTile<T, kInt4, M>::kUnroll;
  constexpr int E = kInt4 ? kInt4BlockElems : 16;  // elements per 16-byte chunk
  constexpr int P = E / 2;                         // half2 pairs per chunk
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
  // Row r of the warp's R, as an index from n0: past-the-end rows read the last row, never written.
  // (Indices rather than R pointers each for weights, scales and zeros: fewer live registers.)
  const int last_row = static_cast<int>(N - 1 - n0 < R - 1 ? N - 1 - n0 : R - 1);
  const uint4* wrows = reinterpret_cast<const uint4*>(w + n0 * row_bytes);
  const int64_t row_chunks = row_bytes / 16;
  const uint16_t* srows = scales + n0 * groups;
  const uint8_t* zrows = zeros ? zeros + n0 * groups : nullptr;
  [[maybe_unused]] __half2 row_scale[R];  // fp16 x, int8: the row's scale, applied per weight
  if constexpr (kHalf && !kInt4) {
#pragma unroll
    for (int r = 0; r < R; ++r) row_scale[r] = __half2half2(__ushort_as_half(__ldg(srows + min(r, last_row))));
  }

  float acc[R][M] = {};
  const int64_t stride = static_cast<int64_t>(split) * 32;
  for (int64_t base = slice * 32 + lane; base < chunks; base += stride * U) {
    uint4 packed[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = base + u * stride;
#pragma unroll
      for (int r = 0; r < R; ++r)
        packed[u][r] = c < chunks ? __ldg(wrows + min(r, last_row) * row_chunks + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = base + u * stride;
      if (c >= chunks) break;
      float scale[R];
      int zero[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (kInt4) {
          const int64_t g = min(r, last_row) * groups + (c >> group_shift);  // chunks per group: a power of two
          scale[r] = fp16_bits_to_float(__ldg(srows + g));
          zero[r] = zrows ? static_cast<int>(__ldg(zrows + g)) : kInt4SymmetricZero;
        } else {
          scale[r] = 1.0f, zero[r] = 0;  // int8: the row scale is applied at the end (fp32) or per weight (fp16)
        }
      }
      // One row of x: decode each row of W as it is used. Several: decode all R rows once and
      // keep them in registers, so each x row costs only its loads and products.
      constexpr bool kDecodeOnce = M > 1;
      if constexpr (kHalf) {
        __half2 wh[kDecodeOnce ? R : 1][P];
        auto decode = [&](int r, __half2* out) {
          if constexpr (kInt4) {
            decode_int4_half(packed[u][r], zero[r], out);
          } else {
            decode_int8_half(packed[u][r], row_scale[r], out);
          }
        };
        if constexpr (kDecodeOnce) {
#pragma unroll
          for (int r = 0; r < R; ++r) decode(r, wh[r]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          __half2 xh[P];
          load_x_half_pairs<kInt4>(x + m * K + c * E, xh);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            __half2* wr = wh[kDecodeOnce ? r : 0];
            if constexpr (!kDecodeOnce) decode(r, wr);
            const float s = dot_half<P>(xh, wr);
            acc[r][m] = kInt4 ? fmaf(s, scale[r], acc[r][m]) : acc[r][m] + s;
          }
        }
      } else {
        float wf[kDecodeOnce ? R : 1][E];
        if constexpr (kDecodeOnce) {
#pragma unroll
          for (int r = 0; r < R; ++r) decode_chunk<kInt4>(packed[u][r], static_cast<float>(zero[r]), wf[r]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          // x once per chunk and row of x, shared by the R rows of W.
          float xr[E];
          load_x_floats<E>(x + m * K + c * E, xr);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float* wr = wf[kDecodeOnce ? r : 0];
            if constexpr (!kDecodeOnce) decode_chunk<kInt4>(packed[u][r], static_cast<float>(zero[r]), wr);
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) s = fmaf(xr[e], wr[e], s);
            acc[r][m] = kInt4 ? fmaf(s, scale[r], acc[r][m]) : acc[r][m] + s;
          }
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
    if constexpr (!kInt4 && !kHalf) v *= fp16_bits_to_float(scales[n]);
    y[(j % M) * N + n] = from_float<T>(v + (bias ? bias[n] : 0.0f));
  }
}

// K slices per row group: enough that every warp gets at least one full unrolled step of loads,
// at most one per warp of the block. Small K: more row groups per block instead.
template <typename T, bool kInt4, int M>
int split_for(int64_t K) {
  constexpr int E = kInt4 ? kInt4BlockElems : 16;
  const int64_t chunks = K / E;
  int split = kWarpsPerBlock;
  while (split > 1 && chunks < static_cast<int64_t>(split) * 32 * GemvTile<T, kInt4, M>::kUnroll) split /= 2;
  return split;
}

template <typename T, bool kInt4, int M>
void launch_gemv(const LinearArgs& a, const T* x, T* y, int group_shift, cudaStream_t stream) {
  const int split = split_for<T, kInt4, M>(a.K);
  const int64_t rows_per_block = static_cast<int64_t>(kWarpsPerBlock / split) * GemvTile<T, kInt4, M>::kRows;
  const auto blocks = static_cast<unsigned>((a.N + rows_per_block - 1) / rows_per_block);
  gemv_kernel<T, kInt4, M><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      x, static_cast<const uint8_t*>(a.qweight), a.scales, a.zeros, group_shift, a.bias, y, a.N, a.K, split);
}

template <typename T, bool kInt4>
void launch_for_m(const LinearArgs& a, int group_shift, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  // The row count is a template parameter so that the accumulators live in registers.
  switch (a.M) {
    case 1: launch_gemv<T, kInt4, 1>(a, x, y, group_shift, stream); break;
    case 2: launch_gemv<T, kInt4, 2>(a, x, y, group_shift, stream); break;
    case 3: launch_gemv<T, kInt4, 3>(a, x, y, group_shift, stream); break;
    case 4: launch_gemv<T, kInt4, 4>(a, x, y, group_shift, stream); break;
    case 5: launch_gemv<T, kInt4, 5>(a, x, y, group_shift, stream); break;
    case 6: launch_gemv<T, kInt4, 6>(a, x, y, group_shift, stream); break;
    case 7: launch_gemv<T, kInt4, 7>(a, x, y, group_shift, stream); break;
    case 8: launch_gemv<T, kInt4, 8>(a, x, y, group_shift, stream); break;
    default: throw std::invalid_argument("gemv: M out of range");
  }
}
static_assert(kMaxGemvM == 8, "launch_for_m instantiates M = 1 .. kMaxGemvM");

}  // namespace

void gemv(const LinearArgs& a, cudaStream_t stream) {
  const int group_shift = a.group_size == 128 ? 2 : (a.group_size == 64 ? 1 : 0);  // log2(chunks per group)
  with_act_type(a.act, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.bits == 4) {
      launch_for_m<T, true>(a, group_shift, stream);
    } else {
      launch_for_m<T, false>(a, 0, stream);
    }
  });
  throw_if_error(cudaGetLastError(), "qlinear (gemv) launch");
}

}  // namespace cgq::cuda
