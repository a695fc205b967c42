// CUDA implementations of the norm kernel ops (schemas in csrc/ext.cpp, the same as the
// CPU ones in layer_norm_cpu.cpp):
//   norm_fwd_kernel           -> y, z (or empty), mean (empty for RMS), rstd
//   norm_bwd_kernel           -> dx, dresidual (or empty), dweight (or empty), dbias (or empty)
//   dropout_keep_mask_kernel  the kernels' Philox keep-mask, for tests
// The checks, the params and the outputs shared with the CPU op are in layer_norm_host.h; this
// file adds the device guard, the per-team dweight / dbias partial sums and the vectorisation
// flag, and calls the launchers of layer_norm_cuda.cu. Host code only (g++): includes
// c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h (no cuBLAS headers needed).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "layer_norm/layer_norm_cuda.h"
#include "layer_norm/layer_norm_host.h"

namespace fusedlayers::cuda {
namespace {

constexpr const char* kFwd = "norm_fwd_kernel";
constexpr const char* kBwd = "norm_bwd_kernel";

const norm_host::Device kCuda{c10::DeviceType::CUDA, "cuda", &plain_empty};

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t seed, double eps, double dropout_p, bool rms, bool keep_stream,
    at::ScalarType stream_dtype) {
  norm_host::check_device(kCuda, x, x, kFwd, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  NormParams p{};
  norm_host::Keep keep;
  auto outs = norm_host::fwd_setup(kCuda, p, keep, kFwd, x, residual, weight, bias, seed, eps, dropout_p, rms,
                                   keep_stream, stream_dtype);
  p.vec = p.hidden % 8 == 0 && p.x_rs % 8 == 0 && p.residual_rs % 8 == 0 && aligned16(p.x) && aligned16(p.residual) &&
          aligned16(p.weight) && aligned16(p.bias) && aligned16(p.y) && aligned16(p.z);
  norm_fwd_launch(p, stream_of(x));
  return outs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(
    const at::Tensor& dy, const std::optional<at::Tensor>& dz, const at::Tensor& zin,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t seed, double dropout_p, bool rms, at::ScalarType x_dtype,
    std::optional<at::ScalarType> residual_dtype) {
  norm_host::check_device(kCuda, zin, zin, kBwd, "zin");
  const c10::cuda::CUDAGuard guard(zin.device());
  NormParams p{};
  norm_host::Keep keep;
  auto [dx, dres] = norm_host::bwd_setup(kCuda, p, keep, kBwd, dy, dz, zin, weight, bias, mean, rstd, seed, dropout_p,
                                         rms, x_dtype, residual_dtype);
  // dweight / dbias: (teams, hidden) float32 partial sums, summed over teams below
  const auto f32 = zin.options().dtype(at::kFloat);
  p.teams = norm_bwd_teams(p.rows, p.hidden, zin.device().index());
  at::Tensor dw_part = weight.has_value() ? at::zeros({p.teams, p.hidden}, f32) : at::Tensor();
  at::Tensor db_part = bias.has_value() ? at::zeros({p.teams, p.hidden}, f32) : at::Tensor();
  p.dweight_partial = weight.has_value() ? dw_part.mutable_data_ptr<float>() : nullptr;
  p.dbias_partial = bias.has_value() ? db_part.mutable_data_ptr<float>() : nullptr;
  p.vec = p.hidden % 8 == 0 && p.zin_rs % 8 == 0 && aligned16(p.zin) && aligned16(p.dy) && aligned16(p.dz) &&
          aligned16(p.weight) && aligned16(p.dx) && aligned16(p.dresidual);
  norm_bwd_launch(p, stream_of(zin));
  at::Tensor dw = weight.has_value() ? at::sum(dw_part, {0}) : at::Tensor();
  at::Tensor db = bias.has_value() ? at::sum(db_part, {0}) : at::Tensor();
  return {dx, dres, norm_host::param_grad(dw, weight, zin), norm_host::param_grad(db, bias, zin)};
}

void dropout_keep_mask_cuda(const at::Tensor& keep, int64_t seed, double p) {
  TORCH_CHECK(keep.is_cuda(), "fusedlayers::dropout_keep_mask_kernel: keep must be a CUDA tensor, got ", keep.device());
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous(),
              "fusedlayers::dropout_keep_mask_kernel: keep must be a contiguous bool tensor");
  const c10::cuda::CUDAGuard guard(keep.device());
  dropout_keep_mask_launch(keep.mutable_data_ptr<bool>(), keep.numel(), static_cast<uint64_t>(seed),
                           static_cast<float>(p), stream_of(keep));
}

}  // namespace
}  // namespace fusedlayers::cuda

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  m.impl("norm_fwd_kernel", &fusedlayers::cuda::norm_fwd_cuda);
  m.impl("norm_bwd_kernel", &fusedlayers::cuda::norm_bwd_cuda);
  m.impl("dropout_keep_mask_kernel", &fusedlayers::cuda::dropout_keep_mask_cuda);
}
