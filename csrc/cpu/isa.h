// Which CPU kernel variant runs: the best one this CPU (and OS) supports, unless
// CODEGEN_Q_CPU_ISA or set_isa() forces another.
#pragma once

#include <string>
#include <vector>

namespace cgq::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
std::vector<std::string> compiled_isas();   // built into this module
std::vector<std::string> supported_isas();  // built in and runnable on this CPU
Isa active_isa();
// Forces a variant by name; throws std::invalid_argument for an unknown name or one this CPU or
// build cannot run.
void set_isa(const std::string& name);
// Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16): torch's bf16 GEMM is then
// ~2.4x its fp32 one; without, it is emulated and slower (codegen_q.load's prefill_dtype).
bool cpu_has_native_bf16();

}  // namespace cgq::cpu
