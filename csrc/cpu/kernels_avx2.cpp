// The CPU kernels compiled for the AVX2 SIMD level: the attention and norm kernel headers
// instantiated in namespace fusedlayers::cpu::AVX2, and the table kernels() may return.
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

#define FUSEDLAYERS_CPU_AVX2
#include "common/cpu_capability_begin.h"
#include "attention/attention_cpu_kernel.h"
#include "layer_norm/layer_norm_cpu_kernel.h"

namespace fusedlayers::cpu {
extern const Kernels kernels_AVX2;
const Kernels kernels_AVX2 = {"AVX2", &AVX2::attention_fwd, &AVX2::attention_bwd, &AVX2::norm_fwd, &AVX2::norm_bwd};
}  // namespace fusedlayers::cpu
#include "common/cpu_capability_end.h"
