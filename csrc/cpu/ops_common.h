// Helpers of the CPU op glue (tensor checks, dtype mapping), shared by the op files.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/kernels.h"

namespace fusedlayers::cpu {

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, "fusedlayers::", op, ": ", name, " must be float32, float16 or bfloat16 on the cpu backend, got ",
                  t.scalar_type());
  }
}

// t itself when its last dim is contiguous (rows may be strided), else a contiguous copy.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1) ? t : t.contiguous();
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedlayers::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

}  // namespace fusedlayers::cpu
