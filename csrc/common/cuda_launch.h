// Host helpers of the CUDA launchers (csrc/attention/attention_{fwd,bwd}_cuda.cu): the one torch
// header they use is c10/cuda/CUDAException.h (launch and API checks).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

namespace fusedlayers::cuda {

// Makes `kernel` accept `smem` bytes of dynamic shared memory, or fails naming the need.
template <typename Kernel>
void opt_in_smem(Kernel kernel, int smem, const char* what) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= limit, "fusedlayers cuda ", what, ": needs ", smem, " bytes of shared memory per block, the device",
              " allows ", limit, " (use backend='triton' for this head dim on this GPU)");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
}

}  // namespace fusedlayers::cuda
