// The CPU kernels' interface: the parameter structs (common/params.h) and the table of
// kernel entry points of one SIMD level. The op glue
// (csrc/attention/attention_cpu.cpp, csrc/layer_norm/layer_norm_cpu.cpp) fills the
// params and calls kernels(); each csrc/cpu/kernels_<level>.cpp compiles the kernel
// headers for its level and defines its table.
#pragma once

#include <cstdint>

#include "common/params.h"

namespace fusedlayers::cpu {

// The parameter structs (common/params.h, shared with the CUDA kernels); 64-bit sizes.
using AttentionParams = fusedlayers::AttentionParamsOf<int64_t>;
using fusedlayers::NormParams;

struct Kernels {
  const char* name;  // "AVX512", "AVX2", "DEFAULT"
  void (*attention_fwd)(const AttentionParams&);
  void (*attention_bwd)(const AttentionParams&);
  void (*norm_fwd)(const NormParams&);
  void (*norm_bwd)(const NormParams&);
};

// The table of the SIMD level ATen uses on this machine (ATEN_CPU_CAPABILITY honoured).
const Kernels& kernels();

}  // namespace fusedlayers::cpu
