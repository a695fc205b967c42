// Launchers of the CUDA attention backward (kernels: attention_bwd_kernel.cuh):
//   attention_dkdv_kernel  one block per (key block, KV head, sequence): dK, dV, dbias;
//   attention_dq_kernel    then dQ, one block per (query block, query head, sequence).
// Deterministic by construction: every output element has one writer, no atomics.
// Instantiations: {fp16, bf16} x {64, 128, 256} x 2 kernels = 12 (common/static_switch.h).
// Delta - dlse, the float32 row terms, and the final casts are done by the op glue
// (attention_op_cuda.cpp) with ATen ops.
//
// FLOPs counted by the benchmarks: 2.5x the forward's.
// GPU tests: tests/test_cuda_kernels.py (pytest -m gpu).
#include <algorithm>

#include "attention/attention_bwd_kernel.cuh"
#include "common/cuda_launch.h"
#include "common/static_switch.h"

namespace fusedlayers::cuda {

int attention_bwd_smem(int head_dim) {
  return FL_HEADDIM_SWITCH(head_dim, kD, [&] {
    return std::max(attn::DkdvTile<__half, kD>::kSmem, attn::DqTile<__half, kD>::kSmem);
  });
}

void attention_bwd_launch(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_kv == 0) return;
  FL_HEADDIM_SWITCH(std::max(p.head_dim, p.head_dim_v), kD, [&] {
    FL_HALF_SWITCH(p.dtype == DType::bf16, T, [&] {
      if (p.seqlen_k > 0) {
        using Tile = attn::DkdvTile<T, kD>;
        const dim3 grid((p.seqlen_k + Tile::kBlockN - 1) / Tile::kBlockN, p.heads_kv, p.batch);
        launch_tile_kernel<Tile>(attn::attention_dkdv_kernel<T, kD>, "attention backward (dK, dV)", grid, p, stream);
      }
      if (p.seqlen_q > 0) {
        using Tile = attn::DqTile<T, kD>;
        const dim3 grid((p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM, p.heads_q, p.batch);
        launch_tile_kernel<Tile>(attn::attention_dq_kernel<T, kD>, "attention backward (dQ)", grid, p, stream);
      }
    });
  });
}

}  // namespace fusedlayers::cuda
