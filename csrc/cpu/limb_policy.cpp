#include "cpu/limb_policy.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace cgq::cpu {
namespace {

bool from_environment() {
  const char* v = std::getenv("CODEGEN_Q_ACTIVATION_LIMBS");
  return !(v && std::strcmp(v, "3") == 0);
}

std::atomic<bool>& allowed() {
  static std::atomic<bool> value{from_environment()};
  return value;
}

}  // namespace

bool two_limbs_allowed() { return allowed().load(std::memory_order_relaxed); }

void set_two_limbs_allowed(bool allowed_) { allowed().store(allowed_, std::memory_order_relaxed); }

}  // namespace cgq::cpu
