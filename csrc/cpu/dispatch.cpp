// kernels(): the table of the SIMD level that ATen itself uses on this machine
// (at::get_cpu_capability(): the CPU's features, lowered by ATEN_CPU_CAPABILITY=avx2 /
// default), read once.
#include <ATen/Version.h>

#include <string>

#include "cpu/kernels.h"

namespace fusedlayers::cpu {

extern const Kernels kernels_DEFAULT, kernels_AVX2, kernels_AVX512;

const Kernels& kernels() {
  static const Kernels* chosen = [] {
#if !(defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__))
    return &kernels_DEFAULT;  // the SIMD levels are GCC-on-x86-64 only (cpu_capability_begin.h)
#else
    const std::string level = at::get_cpu_capability();
    if (level == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return &kernels_AVX512;
    }
    if ((level == "AVX512" || level == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return &kernels_AVX2;
    }
    return &kernels_DEFAULT;
#endif
  }();
  return *chosen;
}

}  // namespace fusedlayers::cpu
