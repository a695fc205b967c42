// Launchers of the CUDA attention backward (kernels: attention_cuda_kernel.cuh):
//   attention_dkdv_kernel  one block per (key block, KV head, sequence): dK, dV, dbias;
//   attention_dq_kernel    then dQ, one block per (query block, query head, sequence).
// Deterministic by construction: every output element has one writer, no atomics.
// Instantiations: {fp16, bf16} x {64, 128, 256} x 2 kernels = 12 (common/static_switch.h).
// Delta - dlse, the float32 row terms, and the final casts are done by the op glue
// (attention_op_cuda.cpp) with ATen ops.
//
// FLOPs counted by the benchmarks: 2.5x the forward's.
// Verified on a GPU by tests/test_cuda_kernels.py (pytest -m gpu); not yet run on a GPU.
#include <algorithm>

#include "attention/attention_cuda_kernel.cuh"
#include "common/cuda_launch.h"
#include "common/static_switch.h"

namespace fusedlayers::cuda {

namespace attn {

template <typename T, int kD>
void run_bwd(const AttentionParams& p, cudaStream_t stream) {
  if (p.seqlen_k > 0) {
    using Tile = DkdvTile<T, kD>;
    auto kernel = attention_dkdv_kernel<T, kD>;
    opt_in_smem(kernel, Tile::kSmem, "attention backward (dK, dV)");
    const dim3 grid((p.seqlen_k + Tile::kBlockN - 1) / Tile::kBlockN, p.heads_kv, p.batch);
    kernel<<<grid, Tile::kThreads, Tile::kSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.seqlen_q > 0) {
    using Tile = DqTile<T, kD>;
    auto kernel = attention_dq_kernel<T, kD>;
    opt_in_smem(kernel, Tile::kSmem, "attention backward (dQ)");
    const dim3 grid((p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM, p.heads_q, p.batch);
    kernel<<<grid, Tile::kThreads, Tile::kSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace attn

int attention_bwd_smem(int head_dim) {
  return FL_HEADDIM_SWITCH(head_dim, kD, [&] {
    return std::max(attn::DkdvTile<__half, kD>::kSmem, attn::DqTile<__half, kD>::kSmem);
  });
}

void attention_bwd_launch(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_kv == 0) return;
  FL_HEADDIM_SWITCH(std::max(p.head_dim, p.head_dim_v), kD, [&] {
    FL_HALF_SWITCH(p.bf16, T, [&] { attn::run_bwd<T, kD>(p, stream); });
  });
}

}  // namespace fusedlayers::cuda
