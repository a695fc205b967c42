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

#if defined(__CUDACC__)
// Launches kernel(p) on `grid` with Tile::kThreads threads and Tile::kSmem bytes of dynamic
// shared memory (opted in first) on `stream`, and checks the launch.
template <typename Tile, typename Kernel, typename Params>
void launch_tile_kernel(Kernel kernel, const char* what, dim3 grid, const Params& p, cudaStream_t stream) {
  opt_in_smem(kernel, Tile::kSmem, what);
  kernel<<<grid, Tile::kThreads, Tile::kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace fusedlayers::cuda
