// codegen_q._C_cpu: one binding per op, no logic. Tensors arrive as raw addresses (ints) so the
// module never links libtorch; codegen_q/kernels/ops.py is the only caller and validates everything first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "common/raw_args.h"
#include "common/thread_pool.h"
#include "cpu/decode_step.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"
#include "cpu/kernel_constants.h"
#include "cpu/limb_policy.h"

namespace py = pybind11;
using cgq::DequantArgs;
using cgq::QLinearArgs;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The type code is checked by the op (an unknown one raises), so the cast here is only a relabel.
cgq::cpu::WeightRows weight_rows(uintptr_t w, int64_t K, int w_type) {
  return {ptr<const void>(w), static_cast<cgq::cpu::WeightType>(w_type), K};
}

QLinearArgs qlinear_args(uintptr_t x, int64_t M, int64_t K, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                         int64_t group_size, uintptr_t bias, uintptr_t y, int64_t N, bool int8_activations,
                         bool gelu) {
  QLinearArgs a;
  a.int8_activations = int8_activations;
  a.gelu = gelu;
  a.x = ptr<const float>(x);
  a.M = M;
  a.K = K;
  a.N = N;
  a.qweight = ptr<const void>(qweight);
  a.scales = ptr<const uint16_t>(scales);
  a.zeros = ptr<const uint8_t>(zeros);
  a.group_size = group_size;
  a.bias = ptr<const float>(bias);
  a.y = ptr<float>(y);
  return a;
}

DequantArgs dequant_args(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t group_size, int64_t N,
                         int64_t K, uintptr_t out) {
  DequantArgs a;
  a.N = N;
  a.K = K;
  a.qweight = ptr<const void>(qweight);
  a.scales = ptr<const uint16_t>(scales);
  a.zeros = ptr<const uint8_t>(zeros);
  a.group_size = group_size;
  a.out = ptr<float>(out);
  return a;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "codegen-q CPU kernels (raw-pointer interface; use codegen_q.kernels.ops)";

  m.def(
      "qlinear_int8",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t qweight, uintptr_t scales, uintptr_t bias, uintptr_t y,
         int64_t N, bool int8_activations, bool gelu) {
        cgq::cpu::qlinear_int8(qlinear_args(x, M, K, qweight, scales, 0, 0, bias, y, N, int8_activations, gelu));
      },
      py::arg("x"), py::arg("M"), py::arg("K"), py::arg("qweight"), py::arg("scales"), py::arg("bias"), py::arg("y"),
      py::arg("N"), py::arg("int8_activations") = false, py::arg("gelu") = false,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "qlinear_int4",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         int64_t group_size, uintptr_t bias, uintptr_t y, int64_t N, bool int8_activations, bool gelu) {
        cgq::cpu::qlinear_int4(
            qlinear_args(x, M, K, qweight, scales, zeros, group_size, bias, y, N, int8_activations, gelu));
      },
      py::arg("x"), py::arg("M"), py::arg("K"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("group_size"), py::arg("bias"), py::arg("y"), py::arg("N"), py::arg("int8_activations") = false,
      py::arg("gelu") = false, py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_int8",
      [](uintptr_t qweight, uintptr_t scales, int64_t N, int64_t K, uintptr_t out) {
        cgq::cpu::dequantize_int8(dequant_args(qweight, scales, 0, 0, N, K, out));
      },
      py::arg("qweight"), py::arg("scales"), py::arg("N"), py::arg("K"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_int4",
      [](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t group_size, int64_t N, int64_t K,
         uintptr_t out) { cgq::cpu::dequantize_int4(dequant_args(qweight, scales, zeros, group_size, N, K, out)); },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("N"), py::arg("K"),
      py::arg("out"), py::call_guard<py::gil_scoped_release>());
  // Quantize rows [0, N) of a [N, K] weight in one pass per row (min/max, fp16 scale, codes).
  // w_type: 0 float32, 1 float16, 2 bfloat16 (the weight's own dtype; rows are widened in cache).
  // err2/sq: optional float64 [N] outputs, per row sum((w - dequant(q))^2) and sum(w^2).
  // Returns status bits: 1 the rows hold NaN or inf, 2 a scale does not fit fp16.
  m.def(
      "quantize",
      [](uintptr_t w, int64_t N, int64_t K, int w_type, int bits, int64_t group_size, bool symmetric, uintptr_t q,
         uintptr_t scales, uintptr_t zeros, uintptr_t err2, uintptr_t sq) {
        cgq::cpu::QuantizeOut o;
        o.bits = bits;
        o.group_size = group_size;
        o.symmetric = symmetric;
        o.q = ptr<void>(q);
        o.scales = ptr<uint16_t>(scales);
        o.zeros = ptr<uint8_t>(zeros);
        o.err = {ptr<double>(err2), ptr<double>(sq)};
        return cgq::cpu::quantize(weight_rows(w, K, w_type), N, o);
      },
      py::arg("w"), py::arg("N"), py::arg("K"), py::arg("w_type"), py::arg("bits"), py::arg("group_size"),
      py::arg("symmetric"), py::arg("q"), py::arg("scales"), py::arg("zeros"), py::arg("err2") = 0, py::arg("sq") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "causal_attention",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t n, int64_t n_head, int64_t head_dim,
         int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t out_stride, float scale, bool kv_fp16,
         int64_t past) {
        cgq::cpu::CausalAttentionArgs a;
        a.q = ptr<const float>(q), a.k = ptr<const float>(k), a.v = ptr<const float>(v), a.out = ptr<float>(out);
        a.n = n, a.n_head = n_head, a.head_dim = head_dim, a.scale = scale, a.kv_fp16 = kv_fp16, a.past = past;
        a.q_stride = q_stride, a.k_stride = k_stride, a.v_stride = v_stride, a.out_stride = out_stride;
        cgq::cpu::causal_attention(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("n"), py::arg("n_head"), py::arg("head_dim"),
      py::arg("q_stride"), py::arg("k_stride"), py::arg("v_stride"), py::arg("out_stride"), py::arg("scale"),
      py::arg("kv_fp16") = false, py::arg("past") = 0, py::call_guard<py::gil_scoped_release>());
  m.def(
      "paged_attention",
      [](uintptr_t q, int64_t q_stride, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables,
         int64_t n_table_rows, uintptr_t query_rows, uintptr_t lengths, uintptr_t out, int64_t n_query,
         int64_t n_head, int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t num_blocks, float scale,
         int kv_type, uintptr_t k_scales, uintptr_t v_scales) {
        const cgq::AttentionArgs a =
            cgq::attention_args(q, q_stride, k_cache, v_cache, block_tables, n_table_rows, query_rows, lengths, out,
                                n_query, n_head, head_dim, block_size, max_blocks, num_blocks, scale, kv_type,
                                k_scales, v_scales);
cgq::cpu::paged_attention(a);
      },
      py::arg("q"), py::arg("q_stride"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
      py::arg("n_table_rows"), py::arg("query_rows"), py::arg("lengths"), py::arg("out"), py::arg("n_query"),
      py::arg("n_head"), py::arg("head_dim"), py::arg("block_size"), py::arg("max_blocks"), py::arg("num_blocks"),
      py::arg("scale"), py::arg("kv_type") = 0, py::arg("k_scales") = 0, py::arg("v_scales") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rotary_kv_append",
      [](uintptr_t qkv, int64_t T, int64_t n_head, int64_t head_dim, int64_t rotary_dim, uintptr_t positions,
         uintptr_t sin, uintptr_t cos, int64_t n_positions, uintptr_t slot_blocks, uintptr_t slot_offsets,
         uintptr_t k_cache, uintptr_t v_cache, int64_t block_size, int64_t num_blocks, int kv_type,
         uintptr_t k_scales, uintptr_t v_scales) {
        const cgq::RotaryAppendArgs a =
            cgq::rotary_append_args(qkv, T, n_head, head_dim, rotary_dim, positions, sin, cos, n_positions,
                                    slot_blocks, slot_offsets, k_cache, v_cache, block_size, num_blocks, kv_type,
                                    k_scales, v_scales);
cgq::cpu::rotary_kv_append(a);
      },
      py::arg("qkv"), py::arg("T"), py::arg("n_head"), py::arg("head_dim"), py::arg("rotary_dim"),
      py::arg("positions"), py::arg("sin"), py::arg("cos"), py::arg("n_positions"), py::arg("slot_blocks"),
      py::arg("slot_offsets"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_size"),
      py::arg("num_blocks"), py::arg("kv_type") = 0, py::arg("k_scales") = 0, py::arg("v_scales") = 0,
      py::call_guard<py::gil_scoped_release>());
  py::class_<cgq::cpu::DecodeModel>(m, "DecodeModel")
      .def(py::init([](const std::vector<std::vector<uintptr_t>>& blocks, const std::vector<int64_t>& linear_shapes,
                       int64_t d, int64_t n_head, int64_t head_dim, int64_t rotary_dim, int64_t n_positions, bool int4,
                       int64_t group_size, float eps, uintptr_t sin, uintptr_t cos) {
             // blocks[i] = [ln_w, ln_b] + 4 x [qweight, scales, zeros, bias] (qkv, out, fc_in, fc_out);
             // linear_shapes = 4 x [N, K], the same for every block.
             if (linear_shapes.size() != 8) throw std::invalid_argument("linear_shapes must hold 4 (N, K) pairs");
             cgq::cpu::DecodeModel model;
             for (const auto& p : blocks) {
               if (p.size() != 18) throw std::invalid_argument("each block needs 18 addresses");
               cgq::cpu::DecodeBlock b;
               b.ln_w = ptr<const float>(p[0]), b.ln_b = ptr<const float>(p[1]);
               cgq::cpu::DecodeLinear* linears[4] = {&b.qkv, &b.out, &b.fc_in, &b.fc_out};
               for (int i = 0; i < 4; ++i) {
                 linears[i]->qweight = ptr<const void>(p[2 + 4 * i]);
                 linears[i]->scales = ptr<const uint16_t>(p[3 + 4 * i]);
                 linears[i]->zeros = ptr<const uint8_t>(p[4 + 4 * i]);
                 linears[i]->bias = ptr<const float>(p[5 + 4 * i]);
                 linears[i]->N = linear_shapes[2 * i], linears[i]->K = linear_shapes[2 * i + 1];
               }
               model.blocks.push_back(b);
             }
             model.d = d, model.n_head = n_head, model.head_dim = head_dim, model.rotary_dim = rotary_dim;
             model.n_positions = n_positions, model.int4 = int4, model.group_size = group_size, model.eps = eps;
             model.sin = ptr<const float>(sin), model.cos = ptr<const float>(cos);
             return model;
           }),
           py::arg("blocks"), py::arg("linear_shapes"), py::arg("d"), py::arg("n_head"), py::arg("head_dim"),
           py::arg("rotary_dim"), py::arg("n_positions"), py::arg("int4"), py::arg("group_size"), py::arg("eps"),
           py::arg("sin"), py::arg("cos"))
      .def(
          "set_head",
          [](cgq::cpu::DecodeModel& model, uintptr_t ln_w, uintptr_t ln_b, uintptr_t qweight, uintptr_t scales,
             uintptr_t zeros, uintptr_t bias, int64_t N, int64_t K, bool int4, int64_t group_size) {
            cgq::cpu::DecodeHead& h = model.head;
            h.ln_w = ptr<const float>(ln_w), h.ln_b = ptr<const float>(ln_b);
            h.lm_head.qweight = ptr<const void>(qweight), h.lm_head.scales = ptr<const uint16_t>(scales);
            h.lm_head.zeros = ptr<const uint8_t>(zeros), h.lm_head.bias = ptr<const float>(bias);
            h.lm_head.N = N, h.lm_head.K = K, h.int4 = int4, h.group_size = group_size;
            model.has_head = true;
          },
          py::arg("ln_w"), py::arg("ln_b"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
          py::arg("N"), py::arg("K"), py::arg("int4"), py::arg("group_size"))
      .def_readonly("has_head", &cgq::cpu::DecodeModel::has_head)
      .def_readwrite("min_block_bytes_per_job", &cgq::cpu::DecodeModel::min_block_bytes_per_job)
      .def_readwrite("int8_activations", &cgq::cpu::DecodeModel::int8_activations);
  m.def(
      "decode_step",
      [](const cgq::cpu::DecodeModel& model, uintptr_t h, int64_t S, uintptr_t k_cache, uintptr_t v_cache,
         int64_t num_blocks, int64_t block_size, uintptr_t positions, uintptr_t slot_blocks, uintptr_t slot_offsets,
         uintptr_t block_tables, int64_t max_blocks, int kv_type, uintptr_t k_scales, uintptr_t v_scales,
         uintptr_t logits, uintptr_t token_ids,
         uintptr_t wte, bool wte_half, int64_t wte_rows, uintptr_t argmax, int64_t argmax_rows) {
        cgq::cpu::DecodeStepArgs a;
        a.logits = ptr<float>(logits);
        a.token_ids = ptr<const int32_t>(token_ids), a.wte = ptr<const void>(wte), a.wte_half = wte_half;
        a.wte_rows = wte_rows, a.argmax = ptr<int32_t>(argmax), a.argmax_rows = argmax_rows;
        a.h = ptr<float>(h), a.S = S, a.k_cache = ptr<void>(k_cache), a.v_cache = ptr<void>(v_cache);
        a.kv_type = static_cast<cgq::KVType>(kv_type);  // checked by the step
        a.k_scales = ptr<uint16_t>(k_scales), a.v_scales = ptr<uint16_t>(v_scales);
        a.num_blocks = num_blocks, a.block_size = block_size, a.positions = ptr<const int32_t>(positions);
        a.slot_blocks = ptr<const int32_t>(slot_blocks), a.slot_offsets = ptr<const int32_t>(slot_offsets);
        a.block_tables = ptr<const int32_t>(block_tables), a.max_blocks = max_blocks;
        cgq::cpu::decode_step(model, a);
      },
      py::arg("model"), py::arg("h"), py::arg("S"), py::arg("k_cache"), py::arg("v_cache"), py::arg("num_blocks"),
      py::arg("block_size"), py::arg("positions"), py::arg("slot_blocks"), py::arg("slot_offsets"),
      py::arg("block_tables"), py::arg("max_blocks"), py::arg("kv_type") = 0, py::arg("k_scales") = 0,
      py::arg("v_scales") = 0, py::arg("logits") = 0,
      py::arg("token_ids") = 0, py::arg("wte") = 0, py::arg("wte_half") = false, py::arg("wte_rows") = 0,
      py::arg("argmax") = 0, py::arg("argmax_rows") = 0, py::call_guard<py::gil_scoped_release>());
  m.def(
      "read_checksum", [](uintptr_t data, int64_t bytes) { return cgq::cpu::read_checksum(ptr<const uint8_t>(data), bytes); },
      py::arg("data"), py::arg("bytes"), py::call_guard<py::gil_scoped_release>());

  m.def("int8_activation_min_rows", &cgq::cpu::int8_activation_min_rows);
  m.def("active_isa", [] { return std::string(cgq::cpu::isa_name(cgq::cpu::active_isa())); });
  m.def("set_isa", &cgq::cpu::set_isa, py::arg("name"));
  m.def("compiled_isas", &cgq::cpu::compiled_isas);
  m.def("supported_isas", &cgq::cpu::supported_isas);
  m.def("cpu_has_native_bf16", &cgq::cpu::cpu_has_native_bf16);
  m.def("two_limbs_allowed", &cgq::cpu::two_limbs_allowed);
  m.def("set_two_limbs_allowed", &cgq::cpu::set_two_limbs_allowed, py::arg("allowed"));
  m.def("get_num_threads", &cgq::get_num_threads);
  m.def("set_num_threads", &cgq::set_num_threads, py::arg("n"));

  // ---- Kernel constants (csrc/cpu/kernel_constants.h), for the tests to read, not restate ----
  m.def("kernel_constants", [] {
    namespace kc = cgq::cpu::kernel_constants;
    auto isa = [](const kc::Isa& c) {
      py::dict d;
      d["native_max_m"] = c.native_max_m;
      d["limb_max_m_int8"] = c.limb_max_m_int8;
      d["limb_max_m_int4"] = c.limb_max_m_int4;
      d["gemm_tile_m"] = c.gemm_tile_m;
      d["gemm_tile_n"] = c.gemm_tile_n;
      d["int8_gemv_max_m"] = c.int8_gemv_max_m;
      return d;
    };
    py::dict isas;
    isas["avx512"] = isa(kc::kAvx512);
    isas["avx2"] = isa(kc::kAvx2);
    py::dict d;
    d["two_limb_factor"] = kc::kTwoLimbFactor;
    d["limb_chunk"] = kc::kLimbChunk;
    d["native_max_m_scalar"] = kc::kNativeMaxMScalar;
    d["native_max_m_bf16"] = kc::kNativeMaxMBf16;
    d["isa"] = isas;
    return d;
  });
}
