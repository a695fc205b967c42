// The CPU kernels compiled for the DEFAULT SIMD level: the attention and norm kernel headers
// instantiated in namespace fusedlayers::cpu::DEFAULT, and the table kernels() may return.
// (The per-level files differ only in the macro below; see common/cpu_capability_begin.h.)

// Every torch header first, compiled for the baseline ISA.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

// DEFAULT: no SIMD pragma; at::vec falls back to plain loops.
#include "common/cpu_capability_begin.h"
#include "attention/attention_cpu_kernel.h"
#include "layer_norm/layer_norm_cpu_kernel.h"

namespace fusedlayers::cpu {
extern const Kernels kernels_DEFAULT;
const Kernels kernels_DEFAULT = {"DEFAULT", &DEFAULT::attention_fwd, &DEFAULT::attention_bwd, &DEFAULT::norm_fwd, &DEFAULT::norm_bwd};
}  // namespace fusedlayers::cpu
#include "common/cpu_capability_end.h"
