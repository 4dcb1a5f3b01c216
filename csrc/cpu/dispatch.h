// The CPU ops as the bindings see them: pick the active ISA's kernel and spread rows over threads.
#pragma once

#include <cstdint>

#include "common/qformat.h"

namespace cgq::cpu {

void qlinear_int8(const QLinearArgs& a);
void qlinear_int4(const QLinearArgs& a);
void dequantize_int8(const DequantArgs& a);
void dequantize_int4(const DequantArgs& a);
// Reads `bytes` with every pool thread (one contiguous slice each) and returns a checksum.
uint64_t read_checksum(const uint8_t* data, int64_t bytes);

}  // namespace cgq::cpu
