// Launcher of the CUDA attention forward (kernel: attention_cuda_kernel.cuh): picks the
// (dtype, head-dim bucket) instantiation through common/static_switch.h, opts in to the
// shared memory it needs, launches one block per (query block, query head, sequence).
// Instantiations: {fp16, bf16} x {64, 128, 256} = 6 kernels. No torch header beyond
// c10/cuda/CUDAException.h (the launch check).
//
// FLOPs counted by the benchmarks: 4 * B * Hq * Nq * Nk * D (halved when causal).
// Verified on a GPU by tests/test_cuda_kernels.py (pytest -m gpu) and
// benchmarks/gpu_session.sh; not yet run on a GPU (see README).
#include <algorithm>

#include "attention/attention_cuda_kernel.cuh"
#include "common/cuda_launch.h"
#include "common/static_switch.h"

namespace fusedlayers::cuda {

namespace attn {

template <typename T, int kD>
void run_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Tile = FwdTile<T, kD>;
  auto kernel = attention_fwd_kernel<T, kD>;
  opt_in_smem(kernel, Tile::kSmem, "attention forward");
  const dim3 grid((p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM, p.heads_q, p.batch);
  kernel<<<grid, Tile::kThreads, Tile::kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attn

int attention_fwd_smem(int head_dim) {
  return FL_HEADDIM_SWITCH(head_dim, kD, [&] { return attn::FwdTile<__half, kD>::kSmem; });
}

void attention_fwd_launch(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return;
  FL_HEADDIM_SWITCH(std::max(p.head_dim, p.head_dim_v), kD, [&] {
    FL_HALF_SWITCH(p.bf16, T, [&] { attn::run_fwd<T, kD>(p, stream); });
  });
}

}  // namespace fusedlayers::cuda
