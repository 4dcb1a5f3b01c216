// codegen_q._C_cuda: one binding per op, no logic. Same raw-address interface as _C_cpu plus the
// CUDA stream (torch.cuda.current_stream().cuda_stream) as an integer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "cuda/cuda_ops.h"

namespace py = pybind11;
using cgq::DequantArgs;
using cgq::QLinearArgs;

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

  m.def(
      "qlinear_int8",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t qweight, uintptr_t scales, uintptr_t bias, uintptr_t y,
         int64_t N, uintptr_t stream) {
        QLinearArgs a;
        a.x = ptr<const float>(x), a.M = M, a.K = K, a.N = N, a.qweight = ptr<const void>(qweight);
        a.scales = ptr<const uint16_t>(scales), a.bias = ptr<const float>(bias), a.y = ptr<float>(y);
        cgq::cuda::qlinear_int8(a, stream);
      },
      py::arg("x"), py::arg("M"), py::arg("K"), py::arg("qweight"), py::arg("scales"), py::arg("bias"), py::arg("y"),
      py::arg("N"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "qlinear_int4",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         int64_t group_size, uintptr_t bias, uintptr_t y, int64_t N, uintptr_t stream) {
        QLinearArgs a;
        a.x = ptr<const float>(x), a.M = M, a.K = K, a.N = N, a.qweight = ptr<const void>(qweight);
        a.scales = ptr<const uint16_t>(scales), a.zeros = ptr<const uint8_t>(zeros), a.group_size = group_size;
        a.bias = ptr<const float>(bias), a.y = ptr<float>(y);
        cgq::cuda::qlinear_int4(a, stream);
      },
      py::arg("x"), py::arg("M"), py::arg("K"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("group_size"), py::arg("bias"), py::arg("y"), py::arg("N"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_int8",
      [](uintptr_t qweight, uintptr_t scales, int64_t N, int64_t K, uintptr_t out, uintptr_t stream) {
        DequantArgs a;
        a.N = N, a.K = K, a.qweight = ptr<const void>(qweight), a.scales = ptr<const uint16_t>(scales);
        a.out = ptr<float>(out);
        cgq::cuda::dequantize_int8(a, stream);
      },
      py::arg("qweight"), py::arg("scales"), py::arg("N"), py::arg("K"), py::arg("out"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_int4",
      [](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t group_size, int64_t N, int64_t K,
         uintptr_t out, uintptr_t stream) {
        DequantArgs a;
        a.N = N, a.K = K, a.qweight = ptr<const void>(qweight), a.scales = ptr<const uint16_t>(scales);
        a.zeros = ptr<const uint8_t>(zeros), a.group_size = group_size, a.out = ptr<float>(out);
        cgq::cuda::dequantize_int4(a, stream);
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("N"), py::arg("K"),
      py::arg("out"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

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
