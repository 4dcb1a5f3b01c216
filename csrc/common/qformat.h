// The quantized weight layouts shared by every kernel (CPU and CUDA) and by codegen_q/format/weight.py.
//
// int8: weight [N, K] int8, symmetric, one fp16 scale per output row:  w = q * scale[n].
// int4: weight [N, K/2] uint8; K is cut into blocks of 32 and each block is 16 bytes where
//       byte j holds element j in its low nibble and element j + 16 in its high nibble
//       (ggml's Q4 order: one 16-byte load and two masks give 32 consecutive elements).
//       One fp16 scale and one uint8 zero point per (row, group of group_size elements):
//       w = (q - zero[n, g]) * scale[n, g]; symmetric weights have no zero tensor and use 8.
#pragma once

#include <cstdint>

namespace cgq {

constexpr int kInt4BlockElems = 32;
constexpr int kInt4BlockBytes = 16;
constexpr int kInt4SymmetricZero = 8;
static_assert(kInt4BlockBytes * 2 == kInt4BlockElems, "two int4 values per byte");

static inline bool is_supported_group_size(int64_t g) { return g == 32 || g == 64 || g == 128; }

// y[M, N] = x[M, K] @ dequant(W)^T + bias. x, y and bias are float32; y rows are ldy apart.
struct QLinearArgs {
  const float* x = nullptr;
  int64_t M = 0;
  int64_t K = 0;
  int64_t N = 0;
  const void* qweight = nullptr;   // int8 [N, K] or packed uint8 [N, K/2]
  const uint16_t* scales = nullptr;  // fp16 bits, [N] (int8) or [N, K/group_size] (int4)
  const uint8_t* zeros = nullptr;    // int4 only, [N, K/group_size]; nullptr means symmetric
  int64_t group_size = 0;            // int4 only
  const float* bias = nullptr;       // [N] or nullptr
  float* y = nullptr;
  const void* workspace = nullptr;   // CPU: per-call activation workspace (see cpu/kernels.h)
  // CPU, prompts: quantize x to int8 (per row and 128 elements of K) and multiply with integer
  // dot products (cpu/qlinear_i8gemm.h) at any M, fewer rows than a tile padded to one, so a row's
  // result does not depend on the rows that come with it; ignored where K is not a multiple of 128.
  bool int8_activations = false;
  // CPU: y = gelu_new(x W^T + bias) (cpu/gelu.h) instead of x W^T + bias. The int8-activation GEMM
  // applies it in its epilogue, while the outputs are in cache; the other kernels in a pass over
  // their columns of y.
  bool gelu = false;
};

// out[N, K] float32 = dequant(W) for the rows [0, N) of the same layout.
struct DequantArgs {
  int64_t N = 0;
  int64_t K = 0;
  const void* qweight = nullptr;
  const uint16_t* scales = nullptr;
  const uint8_t* zeros = nullptr;
  int64_t group_size = 0;
  float* out = nullptr;
};

// What a paged KV cache holds per element (docs/design.md §4, "KV dtype"). kInt8: symmetric int8
// codes, and one fp16 scale per (token, head) in a parallel array [num_blocks, block_size, n_head]
// beside each of K and V: x = code * scale, scale >= max|x| / 127 of that head's row (rounded up
// to fp16), code = round(x / scale), ties to even (cpu/kv_int8.h is the one place that says so).
enum class KVType : int32_t { kFloat32 = 0, kFloat16 = 1, kInt8 = 2 };

static inline int64_t kv_element_bytes(KVType t) { return t == KVType::kFloat32 ? 4 : (t == KVType::kFloat16 ? 2 : 1); }

// Attention of query rows over the paged KV cache (one layer's pool [num_blocks, block_size,
// n_head, head_dim]). Query i uses block table row query_rows[i] (nullptr: row i) and attends
// to the first lengths[i] positions of that sequence: decode has one query per sequence; causal
// prefill has one query per new token, with lengths = its position + 1.
struct AttentionArgs {
  const float* q = nullptr;           // [n_query, n_head, head_dim], query rows q_stride floats apart
  const void* k_cache = nullptr;      // [num_blocks, block_size, n_head, head_dim], of kv_type
  const void* v_cache = nullptr;
  KVType kv_type = KVType::kFloat32;
  const uint16_t* k_scales = nullptr;  // kInt8 only: fp16 bits [num_blocks, block_size, n_head]
  const uint16_t* v_scales = nullptr;
  const int32_t* block_tables = nullptr;  // [n_table_rows, max_blocks]
  const int32_t* query_rows = nullptr;    // [n_query] or nullptr
  const int32_t* lengths = nullptr;       // [n_query]
  float* out = nullptr;                   // [n_query, n_head, head_dim] contiguous
  int64_t n_query = 0, n_head = 0, head_dim = 0, block_size = 0, max_blocks = 0, num_blocks = 0;
  int64_t n_table_rows = 0;
  int64_t q_stride = 0;  // 0 means n_head * head_dim
  float scale = 1.0f;
};

// Rotary embedding + KV-cache append in one pass over a fused projection qkv [T, 3, n_head,
// head_dim] fp32 (q | k | v heads): rotates q in place (GPT-J interleaved pairs on the first
// rotary_dim dims of each head, angle table row positions[t]), rotates k, and writes k and v of
// token t to cache slot (slot_blocks[t], slot_offsets[t]).
struct RotaryAppendArgs {
  float* qkv = nullptr;
  const int32_t* positions = nullptr;     // [T]
  const float* sin = nullptr;             // [n_positions, rotary_dim / 2]
  const float* cos = nullptr;
  const int32_t* slot_blocks = nullptr;   // [T]
  const int32_t* slot_offsets = nullptr;  // [T]
  void* k_cache = nullptr;                // one layer: [num_blocks, block_size, n_head, head_dim]
  void* v_cache = nullptr;
  KVType kv_type = KVType::kFloat32;      // fp16 is rounded to nearest even; int8 as KVType says
  uint16_t* k_scales = nullptr;           // kInt8 only: [num_blocks, block_size, n_head] fp16 bits
  uint16_t* v_scales = nullptr;
  int64_t T = 0, n_head = 0, head_dim = 0, rotary_dim = 0, n_positions = 0, block_size = 0, num_blocks = 0;
};

}  // namespace cgq
