// Tensor helpers of the op glue of both devices (the CPU and CUDA op files, attention_host.h,
// layer_norm_host.h). Host compiler only: includes torch headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#include "common/params.h"

namespace fusedlayers {

// t itself when its last dim is contiguous (rows may be strided), else a contiguous copy.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1) ? t : t.contiguous();
}

// A new tensor for an output the kernels write in full: at::empty (plain_empty) on CUDA, the cpu
// backend's output cache on the CPU (empty_output, cpu/ops_common.h).
using EmptyFn = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);
inline at::Tensor plain_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// Whether p is 16-byte aligned. A null pointer counts as aligned: the kernels never read
// through it (an absent optional tensor, or the data of an empty one), so it must not turn
// the vectorised paths off for the tensors that are there.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The kernels' code of a storage dtype, or an error naming the op, the argument and the
// backend ("cpu" / "cuda").
inline DType dtype_code(at::ScalarType t, const char* op, const char* name, const char* backend) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, "fusedlayers::", op, ": ", name, " must be float32, float16 or bfloat16 on the ", backend,
                  " backend, got ", t);
  }
}

}  // namespace fusedlayers
