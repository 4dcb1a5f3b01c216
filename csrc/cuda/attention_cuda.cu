// CUDA twins of the CPU attention-side ops (csrc/cpu/attention_kernels.cpp, rotary_kernels.cpp),
// with the same argument structs and meaning (common/qformat.h): fp32 activations, a paged KV
// cache of fp32, fp16 or int8 (symmetric codes, one fp16 scale per token and head, stored by the
// rule of cpu/kv_int8.h, bit for bit). Sizes are checked on the host; what lives in device
// memory (positions, slots, block tables, lengths) cannot be checked there without a sync, so a
// kernel that meets an out-of-range entry writes NaN to that query's output (or that token's q)
// instead of reading or writing out of bounds.
//
// rotary_kv_append: one warp per (token, head): the interleaved rotary pairs of q and k in
//   place, then k and v into the token's cache slot (int8: a warp-wide max, then the codes).
// paged_attention: one block of 4 warps per (query, head, partition of kAttentionPartition
//   positions), each warp walking every 4th position of its partition with an online softmax in
//   fp32 (the score's dot product spread over the lanes, one element in 32 each), the 4 partial
//   results merged at the end. Where the table allows one partition only, that is the output;
//   otherwise (flash-decoding) each block writes its partial (max, sum, weighted values) to a
//   workspace and a second kernel merges a query's partitions, so a long context keeps many
//   blocks busy instead of one per head.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>

#include "common/arg_checks.h"
#include "common/qformat.h"
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"

namespace cgq::cuda {
namespace {

constexpr int kAttentionWarps = 4;
constexpr int kMaxPerLane = kMaxAttentionHeadDim / 32;  // head elements each lane keeps
constexpr uint16_t kKVScaleNaN = 0x7E00;                // as cpu/kv_int8.h

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Element `index` of a cache of type kKV (int8: code times its row's scale). The type is a template
// parameter so the attention loop holds no per-element branch on it.
template <KVType kKV>
__device__ __forceinline__ float kv_at(const void* cache, int64_t index, float row_scale) {
  if constexpr (kKV == KVType::kFloat32) {
    return static_cast<const float*>(cache)[index];
  } else if constexpr (kKV == KVType::kFloat16) {
    return __half2float(static_cast<const __half*>(cache)[index]);
  } else {
    return static_cast<float>(static_cast<const int8_t*>(cache)[index]) * row_scale;
  }
}

// One head's row x[0, D) of one token into an int8 cache, by cpu/kv_int8.h's rule; the whole warp calls it.
__device__ void quantize_head(const float* x, int64_t D, int8_t* codes, uint16_t* scale, int lane) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t d = lane; d < D; d += 32) {
    const float a = fabsf(x[d]);
    if (!(a <= 3.402823466e38f)) finite = false;  // NaN or inf
    amax = fmaxf(amax, a);
  }
  amax = warp_max(amax);
  finite = __all_sync(0xffffffffu, finite);
  if (!finite || amax == 0.0f) {
    for (int64_t d = lane; d < D; d += 32) codes[d] = 0;
    if (lane == 0) *scale = finite ? 0 : kKVScaleNaN;
    return;
  }
  // Nearest fp16 to amax / 127, one fp16 step up if it fell below (s * 127 is exact in fp32).
  uint16_t h = __half_as_ushort(__float2half_rn(amax / 127.0f));
  if (__half2float(__ushort_as_half(h)) * 127.0f < amax) ++h;
  const float s = __half2float(__ushort_as_half(h));
  if (lane == 0) *scale = h;
  for (int64_t d = lane; d < D; d += 32) codes[d] = static_cast<int8_t>(fminf(127.0f, fmaxf(-127.0f, rintf(x[d] / s))));
}

__global__ void rotary_kv_append_kernel(RotaryAppendArgs a) {
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x;
  const int64_t H = a.n_head, D = a.head_dim, half = a.rotary_dim / 2, row = H * D;
  float* q = a.qkv + t * 3 * row + h * D;
  float* k = q + row;
  const float* v = k + row;
  const int32_t pos = a.positions[t], block = a.slot_blocks[t], offset = a.slot_offsets[t];
  if (pos < 0 || pos >= a.n_positions || block < 0 || block >= a.num_blocks || offset < 0 || offset >= a.block_size) {
    for (int64_t d = lane; d < D; d += 32) q[d] = NAN;  // nothing stored: the query shows the error
    return;
  }
  const float* sin = a.sin + static_cast<int64_t>(pos) * half;
  const float* cos = a.cos + static_cast<int64_t>(pos) * half;
  for (int64_t j = lane; j < half; j += 32) {  // GPT-J pairs (2j, 2j + 1), as cpu/rotary.h
    const float qe = q[2 * j], qo = q[2 * j + 1], ke = k[2 * j], ko = k[2 * j + 1];
    q[2 * j] = qe * cos[j] - qo * sin[j];
    q[2 * j + 1] = qo * cos[j] + qe * sin[j];
    k[2 * j] = ke * cos[j] - ko * sin[j];
    k[2 * j + 1] = ko * cos[j] + ke * sin[j];
  }
  __syncwarp();
  const int64_t token = static_cast<int64_t>(block) * a.block_size + offset;
  const int64_t at = token * row + h * D;
  if (a.kv_type == KVType::kInt8) {
    quantize_head(k, D, static_cast<int8_t*>(a.k_cache) + at, a.k_scales + token * H + h, lane);
    quantize_head(v, D, static_cast<int8_t*>(a.v_cache) + at, a.v_scales + token * H + h, lane);
  } else if (a.kv_type == KVType::kFloat16) {
    for (int64_t d = lane; d < D; d += 32) {
      static_cast<__half*>(a.k_cache)[at + d] = __float2half_rn(k[d]);
      static_cast<__half*>(a.v_cache)[at + d] = __float2half_rn(v[d]);
    }
  } else {
    for (int64_t d = lane; d < D; d += 32) {
      static_cast<float*>(a.k_cache)[at + d] = k[d];
      static_cast<float*>(a.v_cache)[at + d] = v[d];
    }
  }
}

// One (query, head, partition). With workspace == nullptr (one partition) it writes the output;
// otherwise its partial: workspace row (i * H + h) * parts + part = [max, sum, values[D]].
template <KVType kKV>
__global__ void paged_attention_kernel(AttentionArgs a, float* workspace) {
  const int64_t i = blockIdx.x, h = blockIdx.y, part = blockIdx.z, parts = gridDim.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t H = a.n_head, D = a.head_dim, row = H * D;
  const int64_t q_stride = a.q_stride ? a.q_stride : row;
  float* out = a.out + i * row + h * D;
  __shared__ float qs[kMaxAttentionHeadDim];
  __shared__ float part_m[kAttentionWarps], part_l[kAttentionWarps];
  __shared__ float part_acc[kAttentionWarps][kMaxAttentionHeadDim];
  __shared__ int bad;

  float* partial = workspace ? workspace + ((i * H + h) * parts + part) * (D + 2) : nullptr;
  const int64_t seq = a.query_rows ? a.query_rows[i] : i;
  const int64_t length = a.lengths[i];
  if (seq < 0 || seq >= a.n_table_rows || length < 1 || length > a.max_blocks * a.block_size) {
    float* dst = partial ? partial + 2 : out;  // a partial of NaN values makes the merged output NaN
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = NAN;
    if (partial && threadIdx.x == 0) partial[0] = 0.0f, partial[1] = 1.0f;
    return;
  }
  const int64_t first = part * kAttentionPartition;
  const int64_t last = length < first + kAttentionPartition ? length : first + kAttentionPartition;
  if (first >= last) {  // past this query's length: an empty partial (weight 0 in the merge)
    if (partial && threadIdx.x == 0) partial[0] = -INFINITY, partial[1] = 0.0f;
    return;
  }
  if (threadIdx.x == 0) bad = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) qs[d] = a.q[i * q_stride + h * D + d];
  __syncthreads();

  const int32_t* table = a.block_tables + seq * a.max_blocks;
  float m = -INFINITY, l = 0.0f, acc[kMaxPerLane] = {};
  for (int64_t p = first + warp; p < last; p += kAttentionWarps) {
    const int32_t block = table[p / a.block_size];
    if (block < 0 || block >= a.num_blocks) {
      bad = 1;  // the same value from any thread: a benign race
      break;
    }
    const int64_t token = static_cast<int64_t>(block) * a.block_size + p % a.block_size;
    const int64_t at = token * row + h * D;
    constexpr bool int8 = kKV == KVType::kInt8;
    const float k_scale = int8 ? __half2float(__ushort_as_half(a.k_scales[token * H + h])) : 1.0f;
    const float v_scale = int8 ? __half2float(__ushort_as_half(a.v_scales[token * H + h])) : 1.0f;
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) dot = fmaf(qs[d], kv_at<kKV>(a.k_cache, at + d, k_scale), dot);
    }
    const float s = warp_sum(dot) * a.scale;
    const float m_new = fmaxf(m, s);
    const float keep = expf(m - m_new), weight = expf(s - m_new);
    l = l * keep + weight;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) acc[c] = acc[c] * keep + weight * kv_at<kKV>(a.v_cache, at + d, v_scale);
    }
    m = m_new;
  }
  if (lane == 0) part_m[warp] = m, part_l[warp] = l;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) part_acc[warp][d] = acc[c];
  }
  __syncthreads();
  if (bad) {
    float* dst = partial ? partial + 2 : out;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = NAN;
    if (partial && threadIdx.x == 0) partial[0] = 0.0f, partial[1] = 1.0f;
    return;
  }
  // Merge the warps' partial softmaxes (a warp with no position has m = -inf and weighs 0).
  float m_all = part_m[0];
  for (int w = 1; w < kAttentionWarps; ++w) m_all = fmaxf(m_all, part_m[w]);
  float l_all = 0.0f, weights[kAttentionWarps];
  for (int w = 0; w < kAttentionWarps; ++w) {
    weights[w] = part_l[w] > 0.0f ? expf(part_m[w] - m_all) : 0.0f;
    l_all += part_l[w] * weights[w];
  }
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) o += part_acc[w][d] * weights[w];
    if (partial) {
      partial[2 + d] = o;  // unnormalised: the merge divides by the summed weights
    } else {
      out[d] = o / l_all;
    }
  }
  if (partial && threadIdx.x == 0) partial[0] = m_all, partial[1] = l_all;
}

// Merges the partitions of one (query, head): out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p.
__global__ void merge_partitions_kernel(AttentionArgs a, const float* __restrict__ workspace, int64_t parts) {
  const int64_t i = blockIdx.x, h = blockIdx.y, H = a.n_head, D = a.head_dim;
  const float* partial = workspace + (i * H + h) * parts * (D + 2);
  float m_all = -INFINITY;
  for (int64_t p = 0; p < parts; ++p) m_all = fmaxf(m_all, partial[p * (D + 2)]);
  float l_all = 0.0f;
  for (int64_t p = 0; p < parts; ++p) {
    const float l = partial[p * (D + 2) + 1];
    if (l > 0.0f) l_all += l * expf(partial[p * (D + 2)] - m_all);
  }
  float* out = a.out + i * H * D + h * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int64_t p = 0; p < parts; ++p) {
      const float l = partial[p * (D + 2) + 1];
      if (l > 0.0f) o += partial[p * (D + 2) + 2 + d] * expf(partial[p * (D + 2)] - m_all);
    }
    out[d] = o / l_all;
  }
}

}  // namespace

void rotary_kv_append(const RotaryAppendArgs& a, uintptr_t stream) {
  check_rotary_append_args(a);
  if (a.n_head > 65535) throw std::invalid_argument("rotary_kv_append: at most 65535 heads");
  if (a.T == 0) return;
  rotary_kv_append_kernel<<<dim3(static_cast<unsigned>(a.T), static_cast<unsigned>(a.n_head)), 32, 0,
                            as_stream(stream)>>>(a);
  throw_if_error(cudaGetLastError(), "rotary_kv_append launch");
}

static int64_t attention_partitions(const AttentionArgs& a) {
  const int64_t longest = a.max_blocks * a.block_size;
  return (longest + kAttentionPartition - 1) / kAttentionPartition;
}

int64_t attention_workspace_floats(const AttentionArgs& a) {
  const int64_t parts = attention_partitions(a);
  return parts > 1 ? a.n_query * a.n_head * parts * (a.head_dim + 2) : 0;
}

void paged_attention(const AttentionArgs& a, float* workspace, uintptr_t stream) {
  check_attention_args(a, "paged_attention");
  if (a.num_blocks <= 0) throw std::invalid_argument("paged_attention: sizes must be positive");
  if (a.head_dim > kMaxAttentionHeadDim)
    throw std::invalid_argument("paged_attention: head_dim above " + std::to_string(kMaxAttentionHeadDim) +
                                " is not supported on the GPU");
  if (a.n_head > 65535 || a.n_query > 2147483647) throw std::invalid_argument("paged_attention: too many heads or queries");
  if (a.n_query == 0) return;
  const int64_t parts = attention_partitions(a);
  if (parts > 1 && !workspace)
    throw std::invalid_argument("paged_attention: a table longer than one partition needs a workspace of "
                                "attention_workspace_floats floats");
  if (parts > 65535) throw std::invalid_argument("paged_attention: block table too long");
  const dim3 grid(static_cast<unsigned>(a.n_query), static_cast<unsigned>(a.n_head), static_cast<unsigned>(parts));
  float* partials = parts > 1 ? workspace : nullptr;
  switch (a.kv_type) {  // checked above: one of the three
    case KVType::kFloat32:
      paged_attention_kernel<KVType::kFloat32><<<grid, kAttentionWarps * 32, 0, as_stream(stream)>>>(a, partials);
      break;
    case KVType::kFloat16:
      paged_attention_kernel<KVType::kFloat16><<<grid, kAttentionWarps * 32, 0, as_stream(stream)>>>(a, partials);
      break;
    case KVType::kInt8:
      paged_attention_kernel<KVType::kInt8><<<grid, kAttentionWarps * 32, 0, as_stream(stream)>>>(a, partials);
      break;
  }
  throw_if_error(cudaGetLastError(), "paged_attention launch");
  if (parts > 1) {
    merge_partitions_kernel<<<dim3(static_cast<unsigned>(a.n_query), static_cast<unsigned>(a.n_head)), 128, 0,
                              as_stream(stream)>>>(a, workspace, parts);
    throw_if_error(cudaGetLastError(), "paged_attention (merge) launch");
  }
}

}  // namespace cgq::cuda
