// Entry points that every per-ISA build of qlinear_kernels.cpp provides. Each works on the output
// rows [n_begin, n_end) so the dispatcher can hand disjoint row ranges to threads.
#pragma once

#include <cstdint>

#include "common/qformat.h"

#define CGQ_DECLARE_ISA_KERNELS(isa)                                                   \
  namespace cgq::cpu::isa {                                                            \
  void qlinear_int8(const QLinearArgs& a, int64_t n_begin, int64_t n_end);             \
  void qlinear_int4(const QLinearArgs& a, int64_t n_begin, int64_t n_end);             \
  void dequantize_int8(const DequantArgs& a, int64_t n_begin, int64_t n_end);          \
  void dequantize_int4(const DequantArgs& a, int64_t n_begin, int64_t n_end);          \
  uint64_t read_checksum(const uint8_t* data, int64_t bytes);                          \
  }

CGQ_DECLARE_ISA_KERNELS(scalar)
CGQ_DECLARE_ISA_KERNELS(avx2)
CGQ_DECLARE_ISA_KERNELS(avx512)
