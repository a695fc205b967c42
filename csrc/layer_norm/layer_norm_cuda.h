// Interface between the CUDA norm kernels (layer_norm_cuda.cu, no torch header) and their
// op glue (layer_norm_op_cuda.cpp, compiled by the host compiler): a parameter struct of
// raw pointers and strides, and the launchers. Semantics: fusedlayers/registration.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedlayers::cuda {

// Storage type codes (the numbering of fusedlayers::cpu::DType).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// (Residual-add +) layer / RMS norm over `rows` rows of `hidden` elements.
//   forward:  z = dropout(x) + residual;  y = (z - mean) * rstd * weight + bias
//             (RMS: mean = 0, rstd = 1 / sqrt(mean(z^2) + eps))
//   backward: xhat = (z - mean) * rstd, wdy = dy * weight,
//             dz = rstd * (wdy - mean(wdy) - xhat * mean(xhat * wdy)) + dz_in  (RMS: no mean(wdy)),
//             dresidual = dz, dx = dropout(dz), dweight = sum_rows dy * xhat, dbias = sum_rows dy
struct NormParams {
  int64_t rows, hidden;
  float eps, dropout_p;
  uint64_t seed;  // dropout element (row, col) has mask index row * hidden + col
  bool rms;

  // forward inputs: rows of x / residual with row strides; last dim contiguous
  const void* x = nullptr;
  DType x_dtype = DType::f32;  // also the dtype of y, dy and dx
  int64_t x_rs = 0;
  const void* residual = nullptr;  // or null
  DType residual_dtype = DType::f32;
  int64_t residual_rs = 0;
  const void* weight = nullptr;  // (hidden,) contiguous, or null (1)
  DType weight_dtype = DType::f32;
  const void* bias = nullptr;  // (hidden,) contiguous, or null (0)
  DType bias_dtype = DType::f32;

  // forward outputs: y (rows, hidden) contiguous in x_dtype; z the same in z_dtype or null
  void* y = nullptr;
  void* z = nullptr;
  DType z_dtype = DType::f32;
  float* mean = nullptr;  // (rows,), null for RMS norm
  float* rstd = nullptr;  // (rows,)

  // backward: zin rows (the saved stream, or x) with row stride zin_rs; dy, dz contiguous
  const void* zin = nullptr;
  DType zin_dtype = DType::f32;
  int64_t zin_rs = 0;
  const void* dy = nullptr;  // x_dtype
  const void* dz = nullptr;  // dz_dtype, or null (no prenorm gradient)
  DType dz_dtype = DType::f32;
  void* dx = nullptr;         // x_dtype, contiguous
  void* dresidual = nullptr;  // residual_dtype, contiguous, or null
  // float32 (teams, hidden) partial sums of dweight / dbias, one row per team of threads,
  // zero-initialised; summed over teams afterwards. Null when not wanted.
  float* dweight_partial = nullptr;
  float* dbias_partial = nullptr;

  int64_t teams = 0;  // rows of the partial-sum buffers: norm_bwd_teams(rows, hidden, device)

  // Every row start of every tensor is 16-byte aligned and hidden % 8 == 0: rows move in
  // 16-byte accesses (else element by element).
  bool vec = false;
};

// Number of teams (rows of the dweight / dbias partial-sum buffers) the backward uses.
int64_t norm_bwd_teams(int64_t rows, int64_t hidden, int device);

// Launch on `stream`; every launch is checked (C10_CUDA_KERNEL_LAUNCH_CHECK).
void norm_fwd_launch(const NormParams& p, cudaStream_t stream);
void norm_bwd_launch(const NormParams& p, cudaStream_t stream);
// keep[i] = Philox keep decision of mask index i (common/philox.h), i < n.
void dropout_keep_mask_launch(bool* keep, int64_t n, uint64_t seed, float p, cudaStream_t stream);

}  // namespace fusedlayers::cuda
