// Helpers of the CPU op glue (tensor checks, dtype mapping), shared by the op files.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <vector>

#include "common/op_utils.h"
#include "cpu/kernels.h"

namespace fusedlayers::cpu {

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  return dtype_code(t.scalar_type(), op, name, "cpu");
}

// A new tensor for a kernel's output (output_cache.cpp): one of 128 KB or more reuses the
// memory of a freed output of about its size (under 32 MB: one freed within the reuse time),
// whose pages the former output touched are mapped, so writing them does not page-fault; large
// new blocks get transparent huge pages advised.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// The output cache's counters: {bytes held, limit in bytes, hits, misses, blocks held, bytes
// of live blocks, reuse time in µs, blocks given back for their age} (blocks: page-rounded;
// resize_ and copy-on-write copies of an output count too). new_reuse_us >= 0 sets the reuse
// time; new_limit >= 0 sets the limit (0 turns the cache off) and returns kept blocks beyond it
// to the system.
std::vector<int64_t> output_cache_stats(int64_t new_limit, int64_t new_reuse_us);

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedlayers::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

}  // namespace fusedlayers::cpu
