// CUDA kernel of fusedlayers::_ext_smoke (x * 2 + 1): proves the CUDA part of
// fusedlayers._C builds, links and registers. The schema is declared in csrc/ext.cpp.
//
// Built by setup.py with nvcc (CUDAExtension) only when CUDA is built (torch is a CUDA
// build and nvcc is found, or FUSEDLAYERS_FORCE_CUDA=1), for TORCH_CUDA_ARCH_LIST
// (default 8.0). One translation unit: each .cu including torch headers costs about a
// minute of compile time on a small machine. Includes c10/cuda/* only, not
// ATen/cuda/CUDAContext.h (which needs cuBLAS/cuSPARSE headers).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fusedlayers {
namespace {

__global__ void smoke_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = x[i] * 2.0f + 1.0f;
  }
}

at::Tensor ext_smoke_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fusedlayers::_ext_smoke: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat,
              "fusedlayers::_ext_smoke: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "fusedlayers::_ext_smoke: x must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) {
    return out;
  }
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 4096);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  smoke_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  m.impl("_ext_smoke", &fusedlayers::ext_smoke_cuda);
}
