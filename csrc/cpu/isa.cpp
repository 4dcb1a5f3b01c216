#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace cgq::cpu {
namespace {

bool compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
#ifdef CGQ_HAVE_AVX2
      return true;
#else
      return false;
#endif
    case Isa::kAvx512:
#ifdef CGQ_HAVE_AVX512
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool cpu_runs(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's __builtin_cpu_supports also checks XGETBV, i.e. that the OS saves the wide registers.
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

}  // namespace

bool cpu_has_native_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

namespace {

const Isa kAll[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512};

Isa parse(const std::string& name) {
  for (Isa isa : kAll)
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("unknown CPU ISA '" + name + "'; expected one of scalar, avx2, avx512");
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

Isa checked(Isa isa) {
  if (!compiled(isa))
    throw std::invalid_argument(std::string("the CPU ISA '") + isa_name(isa) +
                                "' was not compiled into this build (it has: " + joined(compiled_isas()) + ")");
  if (!cpu_runs(isa))
    throw std::invalid_argument(std::string("this CPU cannot run the '") + isa_name(isa) +
                                "' kernels (it runs: " + joined(supported_isas()) + ")");
  return isa;
}

Isa best() {
  Isa chosen = Isa::kScalar;
  for (Isa isa : kAll)
    if (compiled(isa) && cpu_runs(isa)) chosen = isa;
  return chosen;
}

Isa initial() {
  if (const char* env = std::getenv("CODEGEN_Q_CPU_ISA")) {
    const std::string name(env);
    if (!name.empty() && name != "auto") {
      try {
        return checked(parse(name));
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("CODEGEN_Q_CPU_ISA: ") + e.what());
      }
    }
  }
  return best();
}

std::atomic<int> g_active{-1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll)
    if (compiled(isa)) out.emplace_back(isa_name(isa));
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll)
    if (compiled(isa) && cpu_runs(isa)) out.emplace_back(isa_name(isa));
  return out;
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_acquire);
  if (v < 0) {
    v = static_cast<int>(initial());
    g_active.store(v, std::memory_order_release);
  }
  return static_cast<Isa>(v);
}

void set_isa(const std::string& name) {
  const Isa isa = (name == "auto") ? best() : checked(parse(name));
  g_active.store(static_cast<int>(isa), std::memory_order_release);
}

}  // namespace cgq::cpu
