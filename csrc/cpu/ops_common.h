// Helpers of the CPU op glue (tensor checks, dtype mapping), shared by the op files.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

#include "common/op_utils.h"
#include "cpu/kernels.h"

namespace fusedlayers::cpu {

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  return dtype_code(t.scalar_type(), op, name, "cpu");
}

// A new tensor (at::empty) whose memory the kernel writes for the first time. A large fresh
// block comes straight from mmap, and its first touch page-faults 4 KB at a time: at 32 MB
// that costs more than the norm itself. Advising transparent huge pages on its 2 MB-aligned
// interior (Linux, THP "madvise" or "always") makes the kernel fault 2 MB at a time. Torch's
// own allocator does the same for every block under THP_MEM_ALLOC_ENABLE=1.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (t.nbytes() >= 2 * kHuge && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return t;
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedlayers::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

}  // namespace fusedlayers::cpu
