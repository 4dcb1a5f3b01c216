// One decode step of every transformer block of a quantized CodeGen model, in one native call:
// S sequences, one new token each (docs/design.md §1 per block: ln_1; qkv and fc_in from the
// same x; rotary + KV append; paged attention; h += out_proj(attn) + fc_out(gelu_new(fc_in(x)))),
// then, when the model has a head, logits = lm_head(ln_f(h)).
//
// Why one call: at decode a 350M block is ~12 MB of weights, a few hundred microseconds, and the
// per-op Python dispatch and per-GEMV thread wake-ups (tens of microseconds each) of the op-by-op
// path cost about as much as the weights' reading. Here the pool is woken once per step; the threads split
// each stage's rows and meet at spinning barriers (3 per block); tiny per-token work (layer norm,
// activation limbs) is done redundantly by every thread instead of being waited for.
#pragma once

#include <cstdint>
#include <vector>

#include "common/qformat.h"

namespace cgq::cpu {

// A quantized Linear as the qlinear kernels take it (QLinearArgs without x / y / M).
struct DecodeLinear {
  const void* qweight = nullptr;
  const uint16_t* scales = nullptr;
  const uint8_t* zeros = nullptr;  // int4 asymmetric only
  const float* bias = nullptr;     // fp32 or nullptr
  int64_t N = 0, K = 0;
};

struct DecodeBlock {
  const float* ln_w = nullptr;  // [d] fp32
  const float* ln_b = nullptr;
  DecodeLinear qkv, out, fc_in, fc_out;  // qkv rows in the [q | k | v] head-major layout
};

// The model's head, optional: logits = lm_head(ln_f(h)) of each sequence in the same call (its
// quantization may differ from the blocks': the format's default is an int8 lm_head).
struct DecodeHead {
  const float* ln_w = nullptr;  // ln_f, [d] fp32
  const float* ln_b = nullptr;
  DecodeLinear lm_head;  // [vocab rows, d]
  bool int4 = false;
  int64_t group_size = 0;
};

struct DecodeModel {
  std::vector<DecodeBlock> blocks;
  bool has_head = false;
  DecodeHead head;
  int64_t d = 0, n_head = 0, head_dim = 0, rotary_dim = 0, n_positions = 0;
  bool int4 = false;
  int64_t group_size = 0;
  float eps = 1e-5f;
  const float* sin = nullptr;  // [n_positions, rotary_dim / 2]
  const float* cos = nullptr;
  // One job (thread) per this many bytes of a block's weights x rows of x, at most the pool's threads.
  int64_t min_block_bytes_per_job = int64_t(1) << 20;
  // The blocks' Linears on int8 activations (QLinearArgs::int8_activations, the prompt GEMM's
  // contract), so a decode row computes what the same row computes in a prompt or in any batch.
  // The head stays fp32, as the prompt pass's lm_head does.
  bool int8_activations = false;
};

struct DecodeStepArgs {
  float* h = nullptr;  // [S, d] fp32: the embeddings in, the last block's output out
  int64_t S = 0;
  void* k_cache = nullptr;  // [n_layer, num_blocks, block_size, n_head, head_dim] of kv_type
  void* v_cache = nullptr;
  KVType kv_type = KVType::kFloat32;
  uint16_t* k_scales = nullptr;  // kInt8 only: fp16 bits [n_layer, num_blocks, block_size, n_head]
  uint16_t* v_scales = nullptr;
  int64_t num_blocks = 0, block_size = 0;
  const int32_t* positions = nullptr;     // [S]: the new token's position (= cached length)
  const int32_t* slot_blocks = nullptr;   // [S]: cache slot of the new token
  const int32_t* slot_offsets = nullptr;
  const int32_t* block_tables = nullptr;  // [S, max_blocks]
  int64_t max_blocks = 0;
  float* logits = nullptr;  // [S, vocab rows] fp32, written when the model has a head (else ignored)
  // Optional: the new tokens' ids [S]. The step then gathers their rows of the embedding `wte`
  // ([wte_rows, d], fp16 with wte_half, else fp32) into h itself, instead of the caller's torch ops.
  const int32_t* token_ids = nullptr;
  const void* wte = nullptr;
  bool wte_half = false;
  int64_t wte_rows = 0;
  // Optional, with a head: greedy picks. argmax[s] = the first index of the largest of sequence s's
  // first argmax_rows logits (a NaN counting as the largest, as in torch.argmax), found by each
  // thread over the logits it has just written, while they are still in its cache.
  int32_t* argmax = nullptr;
  int64_t argmax_rows = 0;
};

// Validates sizes and indices (std::invalid_argument), then runs the step; on an error nothing
// has been written.
void decode_step(const DecodeModel& model, const DecodeStepArgs& a);

}  // namespace cgq::cpu
