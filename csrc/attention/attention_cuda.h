// Interface between the CUDA attention kernels (attention_{fwd,bwd}_cuda.cu, no torch
// header) and their op glue (attention_op_cuda.cpp, host compiler): the parameter struct
// (common/params.h, shared with the CPU kernels) and the launchers. Semantics: fusedlayers/registration.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/params.h"

namespace fusedlayers::cuda {

// The CUDA kernels' parameters: 32-bit sizes (their index arithmetic is 32-bit; the glue
// bounds the sizes), f16 / bf16 dtype.
using AttentionParams = fusedlayers::AttentionParamsOf<int>;

// Shared memory (bytes) the forward / backward kernels need for head dims <= head_dim.
int attention_fwd_smem(int head_dim);
int attention_bwd_smem(int head_dim);

// Launch on `stream`; every launch is checked (C10_CUDA_KERNEL_LAUNCH_CHECK).
void attention_fwd_launch(const AttentionParams& p, cudaStream_t stream);
// dk, dv, dbias (one pass over query blocks per key block), then dq (one pass over key
// blocks per query block): deterministic, no atomics.
void attention_bwd_launch(const AttentionParams& p, cudaStream_t stream);

}  // namespace fusedlayers::cuda
