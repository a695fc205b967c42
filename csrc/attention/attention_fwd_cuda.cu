// Launcher of the CUDA attention forward (kernel: attention_fwd_kernel.cuh): picks the
// (dtype, head-dim bucket) instantiation through common/static_switch.h, opts in to the
// shared memory it needs, launches one block per (query block, query head, sequence).
// Instantiations: {fp16, bf16} x {64, 128, 256} = 6 kernels. No torch header beyond
// c10/cuda/CUDAException.h (the launch check).
//
// FLOPs counted by the benchmarks: 4 * B * Hq * Nq * Nk * D (halved when causal).
// GPU tests: tests/test_cuda_kernels.py (pytest -m gpu) and benchmarks/gpu_session.sh.
#include <algorithm>

#include "attention/attention_fwd_kernel.cuh"
#include "common/cuda_launch.h"
#include "common/static_switch.h"

namespace fusedlayers::cuda {

int attention_fwd_smem(int head_dim) {
  return FL_HEADDIM_SWITCH(head_dim, kD, [&] { return attn::FwdTile<__half, kD>::kSmem; });
}

void attention_fwd_launch(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return;
  FL_HEADDIM_SWITCH(std::max(p.head_dim, p.head_dim_v), kD, [&] {
    FL_HALF_SWITCH(p.dtype == DType::bf16, T, [&] {
      using Tile = attn::FwdTile<T, kD>;
      const dim3 grid((p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM, p.heads_q, p.batch);
      launch_tile_kernel<Tile>(attn::attention_fwd_kernel<T, kD>, "attention forward", grid, p, stream);
    });
  });
}

}  // namespace fusedlayers::cuda
