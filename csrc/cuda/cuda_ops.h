// Host-side entry points of the CUDA kernels. Same weight layouts and meaning as the CPU twins in
// csrc/cpu/dispatch.h, plus the activation dtype and the stream to launch on (torch's current
// stream, passed as an integer). Errors (bad sizes, launch failures) are thrown as
// std::invalid_argument / std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/qformat.h"
#include "cuda/qlinear_plan.h"

namespace cgq::cuda {

// y[M, N] = x[M, K] @ dequant(W)^T + bias, x and y both of type `act`, bias float32 (or null),
// accumulation float32. The kernel is the one choose_qlinear_kernel names; kDequantGemm is not run
// here (it needs the caller's GEMM) and is refused.
struct LinearArgs {
  const void* x = nullptr;
  void* y = nullptr;
  ActType act = ActType::kFloat32;
  int arch = 0;                      // the device's compute capability, 10 * major + minor
  int64_t M = 0, K = 0, N = 0;
  int bits = 0;                      // 8 or 4
  const void* qweight = nullptr;     // int8 [N, K] or packed uint8 [N, K/2]
  const uint16_t* scales = nullptr;  // fp16 bits, [N] (int8) or [N, K/group_size] (int4)
  const uint8_t* zeros = nullptr;    // int4 only; nullptr means symmetric
  int64_t group_size = 0;            // int4 only
  const float* bias = nullptr;       // [N] or nullptr
};

// out[N, K] of type `out_type` = dequant(W), each element (q - zero) * scale formed exactly in
// float32 and rounded once to out_type (so an fp16 tile equals the CPU's float32 result rounded).
struct DequantizeArgs {
  int bits = 0;
  int64_t N = 0, K = 0;
  const void* qweight = nullptr;
  const uint16_t* scales = nullptr;
  const uint8_t* zeros = nullptr;
  int64_t group_size = 0;
  void* out = nullptr;
  ActType out_type = ActType::kFloat32;
};

void qlinear(const LinearArgs& a, uintptr_t stream);
void dequantize(const DequantizeArgs& a, uintptr_t stream);

// The attention-side ops (attention_cuda.cu), the CPU twins' structs and meaning; head_dim up to
// kMaxAttentionHeadDim (CodeGen's 64, 80 and 256 included).
constexpr int64_t kMaxAttentionHeadDim = 256;
// Positions per block of paged_attention: a table longer than this is split over several blocks
// whose partial softmaxes meet in a workspace of attention_workspace_floats(a) floats (0: none
// needed), which the caller allocates (torch's allocator, so the call can be graph-captured).
constexpr int64_t kAttentionPartition = 512;
int64_t attention_workspace_floats(const AttentionArgs& a);
void paged_attention(const AttentionArgs& a, float* workspace, uintptr_t stream);
void rotary_kv_append(const RotaryAppendArgs& a, uintptr_t stream);

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
