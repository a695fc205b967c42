// Interface between the CUDA norm kernels (layer_norm_cuda.cu, no torch header) and their
// op glue (layer_norm_op_cuda.cpp, compiled by the host compiler): the launchers of
// NormParams (common/params.h, shared with the CPU kernels). Semantics: fusedlayers/registration.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/params.h"

namespace fusedlayers::cuda {

using fusedlayers::NormParams;  // common/params.h

// Number of teams (rows of the dweight / dbias partial-sum buffers) the backward uses.
int64_t norm_bwd_teams(int64_t rows, int64_t hidden, int device);

// Launch on `stream`; every launch is checked (C10_CUDA_KERNEL_LAUNCH_CHECK).
void norm_fwd_launch(const NormParams& p, cudaStream_t stream);
void norm_bwd_launch(const NormParams& p, cudaStream_t stream);
// keep[i] = Philox keep decision of mask index i (common/philox.h), i < n.
void dropout_keep_mask_launch(bool* keep, int64_t n, uint64_t seed, float p, cudaStream_t stream);

}  // namespace fusedlayers::cuda
