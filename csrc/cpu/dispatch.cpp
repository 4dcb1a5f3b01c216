#include "cpu/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/arg_checks.h"
#include "common/thread_pool.h"
#include "cpu/isa.h"
#include "cpu/kernel_table.h"

namespace cgq::cpu {

#define CGQ_TABLE(isa) \
  KernelTable { isa::qlinear_workspace_bytes, isa::qlinear_prepare, isa::qlinear_prepare_parts, isa::qlinear_prepare_part, isa::qlinear_int8, isa::qlinear_int4, isa::int8_activation_min_rows, isa::dequantize_int8, isa::dequantize_int4, isa::read_checksum, \
                isa::quantize_rows, \
                isa::paged_attention, isa::causal_attention_tasks, isa::causal_attention_scratch, isa::causal_attention_kv_floats, isa::causal_attention_kv, isa::causal_attention, isa::rotary_kv_append, isa::store_kv_row }

const KernelTable& kernels() {
  static const KernelTable scalar_table = CGQ_TABLE(scalar);
#ifdef CGQ_HAVE_AVX2
  static const KernelTable avx2_table = CGQ_TABLE(avx2);
#endif
#ifdef CGQ_HAVE_AVX512
  static const KernelTable avx512_table = CGQ_TABLE(avx512);
#endif
  switch (active_isa()) {
#ifdef CGQ_HAVE_AVX2
    case Isa::kAvx2:
      return avx2_table;
#endif
#ifdef CGQ_HAVE_AVX512
    case Isa::kAvx512:
      return avx512_table;
#endif
    default:
      return scalar_table;
  }
}
#undef CGQ_TABLE

namespace {

// Threads take whole 8-row tiles so every thread runs the wide kernel; a weight row is at least
// a few KB, so even 8 rows are worth a thread.
constexpr int64_t kRowGrain = 8;

// Waking a worker costs about what 1 MB of weights takes one thread at decode; so a thread gets at
// least kMinBytesPerThread of weight bytes x rows of x, and below ~2 MB a decode GEMV runs on the
// calling thread alone (docs/cpu-kernels.md, "Waking threads").
constexpr int64_t kMinBytesPerThread = int64_t(1) << 20;

// Rows of x per pass of the kernels. The blocked GEMM's workspace (a transposed copy of x) is
// kept by the calling thread for its next call, so a long prompt would otherwise leave M x K
// floats behind for good (201 MB after a 2048-token 16B prefill); in passes it is at most
// kRowsPerPass x K (25 MB for 16B's fc_out). 256 is a whole number of GEMM tiles (16 / 32 rows),
// so the passes add no leftover rows, and each pass is far more work at 16B shapes than the one
// barrier between passes.
constexpr int64_t kRowsPerPass = 256;

int max_jobs(int64_t M, int64_t N, int64_t row_bytes) {
  const int64_t work = row_bytes * N * (M > 0 ? M : 1);
  const int64_t jobs = work / kMinBytesPerThread;
  return jobs < 1 ? 1 : (jobs > 4096 ? 4096 : static_cast<int>(jobs));
}

// Last line of defence: codegen_q/kernels/ops.py validates tensors before calling, but a raw call into the
// module with bad sizes must raise, not read out of bounds.
void check_shapes(int64_t N, int64_t K, const void* qweight, const void* scales, const void* out, bool int4,
                  int64_t group_size) {
  if (N < 0 || K <= 0) throw std::invalid_argument("N must be >= 0 and K > 0");
  if (!qweight || !scales || !out) throw std::invalid_argument("null weight, scale or output pointer");
  if (int4) {
    if (!is_supported_group_size(group_size))
      throw std::invalid_argument("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
    if (K % group_size != 0)
      throw std::invalid_argument("K (" + std::to_string(K) + ") is not a multiple of group_size (" +
                                  std::to_string(group_size) + ")");
  }
}

void check(const QLinearArgs& a, bool int4) {
  check_shapes(a.N, a.K, a.qweight, a.scales, a.y, int4, a.group_size);
  if (a.M < 0 || (a.M > 0 && !a.x)) throw std::invalid_argument("M must be >= 0 with a non-null x");
}


void run_qlinear_pass(QLinearArgs a, bool int4) {
  const KernelTable& k = kernels();
  const int64_t ws_bytes = k.qlinear_workspace_bytes(a, int4);
  if (ws_bytes > 0) {
    thread_local AlignedScratch workspace;
    void* ws = workspace.get(ws_bytes);
    const int64_t parts = k.qlinear_prepare_parts(a, int4);
    if (parts > 0) {  // a part per tile of rows of x: K floats of each of its rows are read
      const int64_t part_bytes = a.K * 4 * ((a.M + parts - 1) / parts);
      parallel_for(parts, 1, [&](int64_t b, int64_t e) { k.qlinear_prepare_part(a, int4, ws, b, e); },
                   max_jobs(1, parts, part_bytes));
    } else {
      k.qlinear_prepare(a, int4, ws);
    }
    a.workspace = ws;
  }
  const auto fn = int4 ? k.qlinear_int4 : k.qlinear_int8;
  parallel_for(a.N, kRowGrain, [&](int64_t b, int64_t e) { fn(a, b, e); }, max_jobs(a.M, a.N, int4 ? a.K / 2 : a.K));
}

void run_qlinear(QLinearArgs a, bool int4) {
  check(a, int4);
  for (int64_t m0 = 0; m0 < a.M && a.N > 0; m0 += kRowsPerPass) {
    QLinearArgs pass = a;
    pass.x = a.x + m0 * a.K;
    pass.y = a.y + m0 * a.N;
    pass.M = a.M - m0 < kRowsPerPass ? a.M - m0 : kRowsPerPass;
    run_qlinear_pass(pass, int4);
  }
}

}  // namespace

void qlinear_int8(const QLinearArgs& a) { run_qlinear(a, false); }

void qlinear_int4(const QLinearArgs& a) { run_qlinear(a, true); }

int64_t int8_activation_min_rows() { return kernels().int8_activation_min_rows(); }

void dequantize_int8(const DequantArgs& a) {
  check_shapes(a.N, a.K, a.qweight, a.scales, a.out, false, 0);
  const auto fn = kernels().dequantize_int8;
  parallel_for(a.N, kRowGrain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void dequantize_int4(const DequantArgs& a) {
  check_shapes(a.N, a.K, a.qweight, a.scales, a.out, true, a.group_size);
  const auto fn = kernels().dequantize_int4;
  parallel_for(a.N, kRowGrain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void check_weight_type(const WeightRows& w) {
  if (w.type != WeightType::kFloat32 && w.type != WeightType::kFloat16 && w.type != WeightType::kBFloat16)
    throw std::invalid_argument("weight type must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

int64_t element_bytes(WeightType t) { return t == WeightType::kFloat32 ? 4 : 2; }

int quantize(const WeightRows& w, int64_t N, const QuantizeOut& o) {
  const bool int4 = o.bits == 4;
  if (o.bits != 8 && !int4) throw std::invalid_argument("bits must be 8 or 4, got " + std::to_string(o.bits));
  check_shapes(N, w.K, w.data, o.scales, o.q, int4, o.group_size);
  check_weight_type(w);
  if (int4 && !o.symmetric && !o.zeros) throw std::invalid_argument("asymmetric int4 needs a zero-point output");
  if ((o.err.err2 == nullptr) != (o.err.sq == nullptr)) throw std::invalid_argument("give both error sums or neither");
  const auto fn = kernels().quantize_rows;
  std::atomic<int> status{0};
  parallel_for(N, kRowGrain, [&](int64_t b, int64_t e) { status.fetch_or(fn(w, o, b, e)); },
               max_jobs(1, N, w.K * element_bytes(w.type)));
  return status.load();
}

int64_t check_attention_tables(const AttentionArgs& a) {
  check_attention_args(a, "attention");
  int64_t longest = 0;
  for (int64_t i = 0; i < a.n_query; ++i) {
    const int64_t s = a.query_rows ? a.query_rows[i] : i;
    if (s < 0 || s >= a.n_table_rows)
      throw std::invalid_argument("attention: query " + std::to_string(i) + " names block table row " +
                                  std::to_string(s) + " of " + std::to_string(a.n_table_rows));
    const int64_t L = a.lengths[i];
    if (L < 1 || L > a.max_blocks * a.block_size)
      throw std::invalid_argument("attention: sequence length " + std::to_string(L) + " outside its block table");
    for (int64_t b = 0; b < (L + a.block_size - 1) / a.block_size; ++b) {
      const int32_t blk = a.block_tables[s * a.max_blocks + b];
      if (blk < 0 || blk >= a.num_blocks) throw std::invalid_argument("attention: block id out of range");
    }
    longest = L > longest ? L : longest;
  }
  return longest;
}

void paged_attention(const AttentionArgs& a) {
  const int64_t longest = check_attention_tables(a);
  const auto fn = kernels().paged_attention;
  const int64_t tasks = a.n_query * a.n_head;
  // A (query, head) task reads longest * head_dim * 2 elements of K and V at most.
  const int jobs = max_jobs(1, tasks, longest * a.head_dim * 2 * kv_element_bytes(a.kv_type));
  parallel_for(tasks, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> scratch;
    const auto floats = static_cast<size_t>(attention_scratch_floats(a.n_head, longest));
    if (scratch.size() < floats) scratch.resize(floats);
    fn(a, scratch.data(), b, e);
  }, jobs);
}

void causal_attention(const CausalAttentionArgs& a) {
  if (a.n < 0 || a.past < 0 || a.n_head <= 0 || a.head_dim <= 0)
    throw std::invalid_argument("causal_attention: bad sizes");
  if (a.n == 0) return;
  if (!a.q || !a.k || !a.v || !a.out) throw std::invalid_argument("causal_attention: null pointer");
  const int64_t row = a.n_head * a.head_dim;
  if (a.q_stride < row || a.k_stride < row || a.v_stride < row || a.out_stride < row)
    throw std::invalid_argument("causal_attention: rows overlap (a stride below n_head * head_dim)");
  const KernelTable& k = kernels();
  thread_local AlignedScratch gathered;  // K transposed and V per head, read by every task of its head
  float* kv = gathered.get_as<float>(k.causal_attention_kv_floats(a));
  const int64_t keys = a.past + a.n;
  parallel_for(a.n_head, 1, [&](int64_t b, int64_t e) { k.causal_attention_kv(a, kv, b, e); },
               max_jobs(1, a.n_head, keys * a.head_dim * 8));
  const int64_t tasks = k.causal_attention_tasks(a);
  const auto floats = static_cast<size_t>(k.causal_attention_scratch(a.head_dim));
  // a task reads up to past + n rows of K and V of one head
  const int jobs = max_jobs(1, tasks, keys * a.head_dim * 8);
  parallel_for(tasks, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < floats) scratch.resize(floats);
    k.causal_attention(a, kv, scratch.data(), b, e);
  }, jobs);
}

void rotary_kv_append(const RotaryAppendArgs& a) {
  check_rotary_append_args(a);
  for (int64_t t = 0; t < a.T; ++t) {
    if (a.positions[t] < 0 || a.positions[t] >= a.n_positions)
      throw std::invalid_argument("rotary_kv_append: position " + std::to_string(a.positions[t]) +
                                  " outside the rotary table of " + std::to_string(a.n_positions));
    if (a.slot_blocks[t] < 0 || a.slot_blocks[t] >= a.num_blocks || a.slot_offsets[t] < 0 ||
        a.slot_offsets[t] >= a.block_size)
      throw std::invalid_argument("rotary_kv_append: cache slot out of range");
  }
  const auto fn = kernels().rotary_kv_append;
  const int64_t token_bytes = 3 * a.n_head * a.head_dim * 4;
  parallel_for(a.T, 1, [&](int64_t b, int64_t e) { fn(a, b, e); }, max_jobs(1, a.T, token_bytes));
}

uint64_t read_checksum(const uint8_t* data, int64_t bytes) {
  const auto fn = kernels().read_checksum;
  constexpr int64_t kGrain = 4096;
  std::atomic<uint64_t> total{0};
  parallel_for(bytes, kGrain, [&](int64_t b, int64_t e) { total.fetch_add(fn(data + b, e - b)); });
  return total.load();
}

}  // namespace cgq::cpu
