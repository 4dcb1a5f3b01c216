// The fused decode step (see decode_step.h). Stages of one block, for the jobs j = 0 .. T-1 of one
// parallel_region:
//   1. every job: x = ln_1(h) and x's activation limbs, privately (a few microseconds);
//   2. qkv and fc_in rows, split across jobs as one list (same K, same cost per row); fc_in's
//      kernel applies gelu_new to the outputs it produced (QLinearArgs::gelu);      -- barrier
//   3. (sequence, head) tasks split across jobs: rotary on that head's q and k, its k and v into
//      the cache slot; then attention of the job's heads over their sequences' blocks (a job
//      wrote the only new rows it reads, so no barrier is needed in between);      -- barrier
//   4. output rows split across jobs: out_proj(attn) + fc_out(gelu) + bias added into h;
//                                                                                   -- barrier
// and after the last block, with a head: every job ln_f(h) privately, then its share of the
// lm_head rows into the logits (saving the separate ln_f op, qlinear call and pool wake-up).
#include "cpu/decode_step.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/qformat.h"
#include "common/thread_pool.h"
#include "cpu/dispatch.h"
#include "cpu/kernel_table.h"
#include "cpu/kernels.h"
#include "cpu/kv_int8.h"
#include "cpu/rotary.h"

namespace cgq::cpu {
namespace {

constexpr int64_t kRowGrain = 8;  // whole 8-row tiles per job, as the qlinear dispatcher does

struct Range {
  int64_t begin, end;
};

Range share(int64_t n, int64_t grain, int job, int n_jobs) {
  const int64_t units = (n + grain - 1) / grain;
  const int64_t b = units * job / n_jobs * grain;
  const int64_t e = units * (job + 1) / n_jobs * grain;
  return {b < n ? b : n, e < n ? e : n};
}

QLinearArgs linear_args(const DecodeLinear& l, const float* x, int64_t M, float* y, int64_t group_size,
                        bool int8_activations = false) {
  QLinearArgs a;
  a.x = x, a.M = M, a.K = l.K, a.N = l.N, a.qweight = l.qweight, a.scales = l.scales, a.zeros = l.zeros;
  a.group_size = group_size, a.bias = l.bias, a.y = y, a.int8_activations = int8_activations;
  return a;
}

void layer_norm_rows(const float* h, int64_t S, int64_t d, const float* w, const float* b, float eps, float* out) {
  for (int64_t s = 0; s < S; ++s) {
    const float* row = h + s * d;
    double sum = 0.0;
    for (int64_t i = 0; i < d; ++i) sum += row[i];
    const double mean = sum / static_cast<double>(d);
    double sq = 0.0;
    for (int64_t i = 0; i < d; ++i) sq += (row[i] - mean) * (row[i] - mean);
    const float inv = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(d) + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < d; ++i) out[s * d + i] = (row[i] - m) * inv * w[i] + b[i];
  }
}

void check_linear(const DecodeLinear& l, int64_t N, int64_t K, const char* name, bool int4, int64_t group_size) {
  if (!l.qweight || !l.scales) throw std::invalid_argument(std::string("decode_step: ") + name + " has no weight");
  if (l.N != N || l.K != K)
    throw std::invalid_argument(std::string("decode_step: ") + name + " is [" + std::to_string(l.N) + ", " +
                                std::to_string(l.K) + "], expected [" + std::to_string(N) + ", " + std::to_string(K) + "]");
  if (int4 && (!is_supported_group_size(group_size) || K % group_size != 0))
    throw std::invalid_argument("decode_step: group_size must be 32, 64 or 128 and divide K");
}

void validate(const DecodeModel& m, const DecodeStepArgs& a) {
  if (m.blocks.empty() || m.d <= 0 || m.n_head <= 0 || m.head_dim <= 0 || m.d != m.n_head * m.head_dim)
    throw std::invalid_argument("decode_step: model sizes are inconsistent");
  if (m.rotary_dim < 0 || m.rotary_dim % 2 || m.rotary_dim > m.head_dim || !m.sin || !m.cos || m.n_positions <= 0)
    throw std::invalid_argument("decode_step: bad rotary table");
  const int64_t inner = m.blocks[0].fc_in.N;
  for (const DecodeBlock& b : m.blocks) {
    if (!b.ln_w || !b.ln_b) throw std::invalid_argument("decode_step: missing layer norm");
    check_linear(b.qkv, 3 * m.d, m.d, "qkv_proj", m.int4, m.group_size);
    check_linear(b.out, m.d, m.d, "out_proj", m.int4, m.group_size);
    check_linear(b.fc_in, inner, m.d, "fc_in", m.int4, m.group_size);
    check_linear(b.fc_out, m.d, inner, "fc_out", m.int4, m.group_size);
  }
  if (m.has_head) {
    if (!m.head.ln_w || !m.head.ln_b) throw std::invalid_argument("decode_step: missing ln_f");
    if (m.head.lm_head.N < 1) throw std::invalid_argument("decode_step: lm_head has no rows");
    check_linear(m.head.lm_head, m.head.lm_head.N, m.d, "lm_head", m.head.int4, m.head.group_size);
    if (!a.logits) throw std::invalid_argument("decode_step: the model has a head but no logits buffer was given");
  }
  if (a.token_ids) {
    if (!a.wte || a.wte_rows < 1) throw std::invalid_argument("decode_step: token ids were given without an embedding");
    for (int64_t s = 0; s < a.S; ++s)
      if (a.token_ids[s] < 0 || a.token_ids[s] >= a.wte_rows)
        throw std::invalid_argument("decode_step: token id " + std::to_string(a.token_ids[s]) +
                                    " outside the embedding's " + std::to_string(a.wte_rows) + " rows");
  }
  if (a.argmax && (!m.has_head || a.argmax_rows < 1 || a.argmax_rows > m.head.lm_head.N))
    throw std::invalid_argument("decode_step: greedy picks need a head and 1 <= argmax_rows <= its vocab rows");
  if (a.S < 1 || !a.h || !a.k_cache || !a.v_cache || !a.positions || !a.slot_blocks || !a.slot_offsets ||
      !a.block_tables || a.num_blocks <= 0 || a.block_size <= 0 || a.max_blocks <= 0)
    throw std::invalid_argument("decode_step: bad step arguments");
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t pos = a.positions[s];
    if (pos < 0 || pos >= m.n_positions)
      throw std::invalid_argument("decode_step: position " + std::to_string(pos) + " outside the context of " +
                                  std::to_string(m.n_positions));
    if (a.slot_blocks[s] < 0 || a.slot_blocks[s] >= a.num_blocks || a.slot_offsets[s] < 0 ||
        a.slot_offsets[s] >= a.block_size)
      throw std::invalid_argument("decode_step: cache slot out of range");
  }
}

void gather_embeddings(const DecodeStepArgs& a, int64_t d) {
  for (int64_t s = 0; s < a.S; ++s) {
    float* row = a.h + s * d;
    const int64_t offset = static_cast<int64_t>(a.token_ids[s]) * d;
    if (a.wte_half) {
      const uint16_t* src = static_cast<const uint16_t*>(a.wte) + offset;
      for (int64_t i = 0; i < d; ++i) row[i] = half_bits_to_float(src[i]);
    } else {
      std::memcpy(row, static_cast<const float*>(a.wte) + offset, static_cast<size_t>(d) * sizeof(float));
    }
  }
}

// The first index of the largest of row[begin, end) (begin < end), NaN counting as the largest.
struct Pick {
  float value;
  int64_t index;
};
bool beats(float v, float best) { return v > best || (v != v && best == best); }
Pick pick_largest(const float* row, int64_t begin, int64_t end) {
  Pick p{row[begin], begin};
  for (int64_t i = begin + 1; i < end; ++i)
    if (beats(row[i], p.value)) p = {row[i], i};
  return p;
}

// After check_attention_tables has vouched for every table entry up to each position.
void check_slots_match_tables(const DecodeStepArgs& a) {
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t pos = a.positions[s];
    if (a.block_tables[s * a.max_blocks + pos / a.block_size] != a.slot_blocks[s] || a.slot_offsets[s] != pos % a.block_size)
      throw std::invalid_argument("decode_step: the new token's slot is not its position in the block table");
  }
}

// Threads for a step: one per model.min_block_bytes_per_job (default 1 MB, as for a lone GEMV) of
// a block's weight bytes times the rows of x, at most the pool's threads. Tiny blocks stay on one
// thread, where three barriers per block would cost more than they split; from 350M's blocks up,
// two jobs beat one (docs/cpu-kernels.md, "Waking threads").
int64_t linear_bytes(const DecodeLinear& l, bool int4) { return l.N * (int4 ? l.K / 2 : l.K); }

int jobs_for(const DecodeModel& m, int64_t S) {
  const DecodeBlock& b = m.blocks[0];
  const int64_t bytes = linear_bytes(b.qkv, m.int4) + linear_bytes(b.out, m.int4) + linear_bytes(b.fc_in, m.int4) +
                        linear_bytes(b.fc_out, m.int4);
  const int64_t wanted = bytes * S / (m.min_block_bytes_per_job > 0 ? m.min_block_bytes_per_job : 1);
  const int threads = get_num_threads();
  return wanted < 1 ? 1 : (wanted < threads ? static_cast<int>(wanted) : threads);
}

}  // namespace

void decode_step(const DecodeModel& m, const DecodeStepArgs& a) {
  validate(m, a);
  const KernelTable& k = kernels();
  const int64_t S = a.S, d = m.d, H = m.n_head, D = m.head_dim, inner = m.blocks[0].fc_in.N;
  const int64_t half = m.rotary_dim / 2;

  // Shared between the jobs (written by one job per element, read after a barrier).
  thread_local AlignedScratch qkv_buf, inner_buf, attn_buf, out_buf, fc_buf, length_buf;
  float* qkv = qkv_buf.get_as<float>(S * 3 * d);
  float* act = inner_buf.get_as<float>(S * inner);  // fc_in output, then gelu in place
  float* attn = attn_buf.get_as<float>(S * d);
  float* out = out_buf.get_as<float>(S * d);
  float* fc = fc_buf.get_as<float>(S * d);
  int32_t* lengths = length_buf.get_as<int32_t>(S);
  for (int64_t s = 0; s < S; ++s) lengths[s] = a.positions[s] + 1;
  // Attention over the first layer's pool; the other layers differ only in the cache pointers.
  const int64_t layer_slots = a.num_blocks * a.block_size;  // (token, head) scales: layer_slots * H
  const int64_t layer_bytes = layer_slots * d * kv_element_bytes(a.kv_type);
  const bool int8 = a.kv_type == KVType::kInt8;
  AttentionArgs attention;
  attention.q = qkv, attention.q_stride = 3 * d, attention.k_cache = a.k_cache, attention.v_cache = a.v_cache;
  attention.kv_type = a.kv_type, attention.k_scales = a.k_scales, attention.v_scales = a.v_scales;
  attention.block_tables = a.block_tables, attention.n_table_rows = S, attention.lengths = lengths;
  attention.out = attn, attention.n_query = S, attention.n_head = H, attention.head_dim = D;
  attention.block_size = a.block_size, attention.max_blocks = a.max_blocks, attention.num_blocks = a.num_blocks;
  attention.scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t longest = check_attention_tables(attention);
  check_slots_match_tables(a);

  if (a.token_ids) gather_embeddings(a, d);

  const auto qlinear = m.int4 ? k.qlinear_int4 : k.qlinear_int8;
  // parallel_region runs min(pool size, n) jobs; fewer jobs than threads for small blocks.
  const int n = jobs_for(m, S);
  SpinBarrier barrier(n);
  // Each job's greedy pick per sequence over its share of the vocab rows (index -1: none).
  thread_local std::vector<Pick> pick_buf;  // the caller's: the jobs write through `picks`
  if (a.argmax) pick_buf.assign(static_cast<size_t>(n) * S, Pick{0.0f, -1});
  Pick* picks = pick_buf.data();
  parallel_region(n, [&](int job, int n_jobs) {
    // Private: x, and the activation workspaces of x, attn and gelu(fc_in(x)).
    thread_local AlignedScratch x_buf, ws_x, ws_attn, ws_act, score_buf;
    float* x = x_buf.get_as<float>(S * d);
    float* scores = score_buf.get_as<float>(attention_scratch_floats(H, longest));
    const Range qkv_fc = share(3 * d + inner, kRowGrain, job, n_jobs);  // gelu adds ~nothing per row
    const Range heads = share(S * H, 1, job, n_jobs);
    const Range rows = share(d, kRowGrain, job, n_jobs);
    for (size_t li = 0; li < m.blocks.size(); ++li) {
      const DecodeBlock& b = m.blocks[li];
      // 1. x = ln_1(h), privately.
      layer_norm_rows(a.h, S, d, b.ln_w, b.ln_b, m.eps, x);
      QLinearArgs qa = linear_args(b.qkv, x, S, qkv, m.group_size, m.int8_activations);
      QLinearArgs fa = linear_args(b.fc_in, x, S, act, m.group_size, m.int8_activations);
      fa.gelu = true;  // from the kernel: its epilogue, or its pass over the columns it wrote
      qa.workspace = fa.workspace = ws_x.get(k.qlinear_workspace_bytes(qa, m.int4));
      k.qlinear_prepare(qa, m.int4, const_cast<void*>(qa.workspace));
      // 2. qkv rows, then fc_in rows + gelu.
      if (qkv_fc.begin < 3 * d) qlinear(qa, qkv_fc.begin, qkv_fc.end < 3 * d ? qkv_fc.end : 3 * d);
      if (qkv_fc.end > 3 * d) {
        const int64_t fb = qkv_fc.begin > 3 * d ? qkv_fc.begin - 3 * d : 0, fe = qkv_fc.end - 3 * d;
        qlinear(fa, fb, fe);
      }
      barrier.wait();
      // 3. Per (sequence, head): rotary and KV append; then attention over this job's heads.
      void* k_layer = static_cast<char*>(a.k_cache) + static_cast<int64_t>(li) * layer_bytes;
      void* v_layer = static_cast<char*>(a.v_cache) + static_cast<int64_t>(li) * layer_bytes;
      uint16_t* k_scales = int8 ? a.k_scales + static_cast<int64_t>(li) * layer_slots * H : nullptr;
      uint16_t* v_scales = int8 ? a.v_scales + static_cast<int64_t>(li) * layer_slots * H : nullptr;
      AttentionArgs at = attention;
      at.k_cache = k_layer, at.v_cache = v_layer, at.k_scales = k_scales, at.v_scales = v_scales;
      for (int64_t task = heads.begin; task < heads.end; ++task) {
        const int64_t s = task / H, h = task % H;
        float* q_head = qkv + s * 3 * d + h * D;
        float* k_head = q_head + d;
        const float* v_head = q_head + 2 * d;
        const float* sin = m.sin + a.positions[s] * half;
        const float* cos = m.cos + a.positions[s] * half;
        rotate_head(q_head, sin, cos, half);
        rotate_head(k_head, sin, cos, half);
        const int64_t slot = (static_cast<int64_t>(a.slot_blocks[s]) * a.block_size + a.slot_offsets[s]) * H + h;
        if (int8) {
          quantize_kv_head(k_head, D, static_cast<int8_t*>(k_layer) + slot * D, k_scales + slot);
          quantize_kv_head(v_head, D, static_cast<int8_t*>(v_layer) + slot * D, v_scales + slot);
        } else {
          k.store_kv_row(k_layer, a.kv_type == KVType::kFloat16, slot * D, k_head, D);
          k.store_kv_row(v_layer, a.kv_type == KVType::kFloat16, slot * D, v_head, D);
        }
      }
      k.paged_attention(at, scores, heads.begin, heads.end);
      barrier.wait();
      // 4. h += out_proj(attn) + fc_out(gelu) for this job's output rows.
      QLinearArgs oa = linear_args(b.out, attn, S, out, m.group_size, m.int8_activations);
      QLinearArgs ca = linear_args(b.fc_out, act, S, fc, m.group_size, m.int8_activations);
      oa.workspace = ws_attn.get(k.qlinear_workspace_bytes(oa, m.int4));
      ca.workspace = ws_act.get(k.qlinear_workspace_bytes(ca, m.int4));
      if (rows.begin < rows.end) {
        k.qlinear_prepare(oa, m.int4, const_cast<void*>(oa.workspace));
        k.qlinear_prepare(ca, m.int4, const_cast<void*>(ca.workspace));
        qlinear(oa, rows.begin, rows.end);
        qlinear(ca, rows.begin, rows.end);
        for (int64_t s = 0; s < S; ++s)
          for (int64_t n = rows.begin; n < rows.end; ++n) a.h[s * d + n] += out[s * d + n] + fc[s * d + n];
      }
      barrier.wait();
    }
    // 5. logits = lm_head(ln_f(h)), vocab rows split across jobs (the region's end joins them).
    if (m.has_head) {
      const DecodeHead& head = m.head;
      layer_norm_rows(a.h, S, d, head.ln_w, head.ln_b, m.eps, x);
      QLinearArgs la = linear_args(head.lm_head, x, S, a.logits, head.group_size);
      la.workspace = ws_x.get(k.qlinear_workspace_bytes(la, head.int4));
      k.qlinear_prepare(la, head.int4, const_cast<void*>(la.workspace));
      const Range vocab = share(head.lm_head.N, kRowGrain, job, n_jobs);
      if (vocab.begin < vocab.end) (head.int4 ? k.qlinear_int4 : k.qlinear_int8)(la, vocab.begin, vocab.end);
      const int64_t pick_end = vocab.end < a.argmax_rows ? vocab.end : a.argmax_rows;
      if (a.argmax && vocab.begin < pick_end)
        for (int64_t s = 0; s < S; ++s)
          picks[static_cast<size_t>(job) * S + s] = pick_largest(a.logits + s * head.lm_head.N, vocab.begin, pick_end);
    }
  });
  // Jobs hold ascending row ranges: a later job's pick wins only if strictly larger.
  for (int64_t s = 0; a.argmax && s < S; ++s) {
    Pick best{0.0f, -1};
    for (int j = 0; j < n; ++j) {
      const Pick& p = picks[static_cast<size_t>(j) * S + s];
      if (p.index >= 0 && (best.index < 0 || beats(p.value, best.value))) best = p;
    }
    a.argmax[s] = static_cast<int32_t>(best.index);
  }
}

}  // namespace cgq::cpu
