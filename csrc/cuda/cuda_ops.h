// Host-side entry points of the CUDA kernels. Same layouts and meaning as the CPU twins in
// csrc/cpu/dispatch.h, plus the stream to launch on (torch's current stream, passed as an integer).
// Errors (bad sizes, launch failures) are thrown as std::invalid_argument / std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/qformat.h"

namespace cgq::cuda {

void qlinear_int8(const QLinearArgs& a, uintptr_t stream);
void qlinear_int4(const QLinearArgs& a, uintptr_t stream);
void dequantize_int8(const DequantArgs& a, uintptr_t stream);
void dequantize_int4(const DequantArgs& a, uintptr_t stream);

struct DeviceInfo {
  int index;
  std::string name;
  int major;
  int minor;
  uint64_t total_memory;
};

// Visible devices; empty with `error` set when there is no driver or no device.
std::vector<DeviceInfo> devices(std::string* error);
int runtime_version();

}  // namespace cgq::cuda
