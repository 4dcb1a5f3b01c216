// codegen_q._C_cuda: one binding per op, no logic. Same raw-address interface as _C_cpu plus the
// CUDA stream (torch.cuda.current_stream().cuda_stream) as an integer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "common/raw_args.h"
#include "cuda/cuda_ops.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "codegen-q CUDA kernels (raw-pointer interface; use codegen_q.kernels.ops)";
  m.attr("architectures") = CGQ_CUDA_ARCHS;
  m.attr("compiler_version") = CGQ_CUDA_VERSION;

  py::enum_<cgq::cuda::QLinearKernel>(m, "QLinearKernel")
      .value("GEMV", cgq::cuda::QLinearKernel::kGemv)
      .value("PLAIN", cgq::cuda::QLinearKernel::kPlain)
      .value("DEQUANT_GEMM", cgq::cuda::QLinearKernel::kDequantGemm)
      .value("MMA", cgq::cuda::QLinearKernel::kMma);
  // Activation dtype codes (ActType): what qlinear's `act` and dequantize's `out_type` take.
  m.attr("ACT_FLOAT32") = static_cast<int>(cgq::cuda::ActType::kFloat32);
  m.attr("ACT_FLOAT16") = static_cast<int>(cgq::cuda::ActType::kFloat16);
  m.attr("ACT_BFLOAT16") = static_cast<int>(cgq::cuda::ActType::kBFloat16);
  m.attr("MAX_GEMV_M") = cgq::cuda::kMaxGemvM;
  m.attr("MAX_MMA_M") = cgq::cuda::kMaxMmaM;
  m.attr("MMA_TILE_K") = cgq::cuda::kMmaTileK;
  m.attr("HALF_CHAIN_PRODUCTS") = cgq::cuda::kHalfChainProducts;

  m.def(
      "qlinear_kernel",
      [](int64_t M, int64_t K, int bits, int act, int arch, uintptr_t x, uintptr_t qweight) {
        return cgq::cuda::choose_qlinear_kernel(M, K, bits, static_cast<cgq::cuda::ActType>(act), arch,
                                                ptr<const void>(x), ptr<const void>(qweight));
      },
      py::arg("M"), py::arg("K"), py::arg("bits"), py::arg("act"), py::arg("arch"), py::arg("x"), py::arg("qweight"),
      "The kernel qlinear runs for these arguments; DEQUANT_GEMM is the caller's dequantize + GEMM.");
  m.def(
      "qlinear",
      [](uintptr_t x, int act, int arch, int64_t M, int64_t K, int bits, uintptr_t qweight, uintptr_t scales,
         uintptr_t zeros, int64_t group_size, uintptr_t bias, uintptr_t y, int64_t N, uintptr_t stream) {
        cgq::cuda::LinearArgs a;
        a.x = ptr<const void>(x), a.y = ptr<void>(y), a.act = static_cast<cgq::cuda::ActType>(act), a.arch = arch;
        a.M = M, a.K = K, a.N = N, a.bits = bits, a.qweight = ptr<const void>(qweight);
        a.scales = ptr<const uint16_t>(scales), a.zeros = ptr<const uint8_t>(zeros), a.group_size = group_size;
        a.bias = ptr<const float>(bias);
        cgq::cuda::qlinear(a, stream);
      },
      py::arg("x"), py::arg("act"), py::arg("arch"), py::arg("M"), py::arg("K"), py::arg("bits"), py::arg("qweight"),
      py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("bias"), py::arg("y"), py::arg("N"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize",
      [](int bits, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t group_size, int64_t N, int64_t K,
         uintptr_t out, int out_type, uintptr_t stream) {
        cgq::cuda::DequantizeArgs a;
        a.bits = bits, a.N = N, a.K = K, a.qweight = ptr<const void>(qweight);
        a.scales = ptr<const uint16_t>(scales), a.zeros = ptr<const uint8_t>(zeros), a.group_size = group_size;
        a.out = ptr<void>(out), a.out_type = static_cast<cgq::cuda::ActType>(out_type);
        cgq::cuda::dequantize(a, stream);
      },
      py::arg("bits"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("N"),
      py::arg("K"), py::arg("out"), py::arg("out_type"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  // The attention-side ops: the CPU bindings' parameters, in the same order, plus (paged_attention)
  // the workspace, and the stream.
  m.def(
      "paged_attention",
      [](uintptr_t q, int64_t q_stride, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables,
         int64_t n_table_rows, uintptr_t query_rows, uintptr_t lengths, uintptr_t out, int64_t n_query,
         int64_t n_head, int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t num_blocks, float scale,
         int kv_type, uintptr_t k_scales, uintptr_t v_scales, uintptr_t workspace, uintptr_t stream) {
        const cgq::AttentionArgs a =
            cgq::attention_args(q, q_stride, k_cache, v_cache, block_tables, n_table_rows, query_rows, lengths, out,
                                n_query, n_head, head_dim, block_size, max_blocks, num_blocks, scale, kv_type,
                                k_scales, v_scales);
cgq::cuda::paged_attention(a, ptr<float>(workspace), stream);
      },
      py::arg("q"), py::arg("q_stride"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
      py::arg("n_table_rows"), py::arg("query_rows"), py::arg("lengths"), py::arg("out"), py::arg("n_query"),
      py::arg("n_head"), py::arg("head_dim"), py::arg("block_size"), py::arg("max_blocks"), py::arg("num_blocks"),
      py::arg("scale"), py::arg("kv_type"), py::arg("k_scales"), py::arg("v_scales"), py::arg("workspace"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "attention_workspace_floats",
      [](int64_t n_query, int64_t n_head, int64_t head_dim, int64_t block_size, int64_t max_blocks) {
        cgq::AttentionArgs a;
        a.n_query = n_query, a.n_head = n_head, a.head_dim = head_dim, a.block_size = block_size;
        a.max_blocks = max_blocks;
        return cgq::cuda::attention_workspace_floats(a);
      },
      py::arg("n_query"), py::arg("n_head"), py::arg("head_dim"), py::arg("block_size"), py::arg("max_blocks"),
      "Floats of the workspace paged_attention needs for these sizes (0: none).");
  m.def(
      "rotary_kv_append",
      [](uintptr_t qkv, int64_t T, int64_t n_head, int64_t head_dim, int64_t rotary_dim, uintptr_t positions,
         uintptr_t sin, uintptr_t cos, int64_t n_positions, uintptr_t slot_blocks, uintptr_t slot_offsets,
         uintptr_t k_cache, uintptr_t v_cache, int64_t block_size, int64_t num_blocks, int kv_type,
         uintptr_t k_scales, uintptr_t v_scales, uintptr_t stream) {
        const cgq::RotaryAppendArgs a =
            cgq::rotary_append_args(qkv, T, n_head, head_dim, rotary_dim, positions, sin, cos, n_positions,
                                    slot_blocks, slot_offsets, k_cache, v_cache, block_size, num_blocks, kv_type,
                                    k_scales, v_scales);
cgq::cuda::rotary_kv_append(a, stream);
      },
      py::arg("qkv"), py::arg("T"), py::arg("n_head"), py::arg("head_dim"), py::arg("rotary_dim"),
      py::arg("positions"), py::arg("sin"), py::arg("cos"), py::arg("n_positions"), py::arg("slot_blocks"),
      py::arg("slot_offsets"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_size"),
      py::arg("num_blocks"), py::arg("kv_type"), py::arg("k_scales"), py::arg("v_scales"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.attr("MAX_ATTENTION_HEAD_DIM") = cgq::cuda::kMaxAttentionHeadDim;
  m.attr("ATTENTION_PARTITION") = cgq::cuda::kAttentionPartition;

  m.def("devices", [] {
    std::string error;
    py::list out;
    for (const auto& d : cgq::cuda::devices(&error)) {
      py::dict info;
      info["index"] = d.index;
      info["name"] = d.name;
      info["capability"] = py::make_tuple(d.major, d.minor);
      info["total_memory"] = d.total_memory;
      out.append(info);
    }
    return py::make_tuple(out, error);
  });
  m.def("runtime_version", &cgq::cuda::runtime_version);
}
