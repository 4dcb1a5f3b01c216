// gelu_new for the fused decode step (decode_step.cpp), compiled once per ISA: built there with the
// module's baseline flags it ran one element at a time (scalar SSE, a division per element).
#include <cstdint>

#include "cpu/gelu.h"
#include "cpu/kernels.h"

namespace cgq::cpu::CGQ_ISA {

void gelu_new(float* v, int64_t n) { gelu_inplace(v, n); }

}  // namespace cgq::cpu::CGQ_ISA
