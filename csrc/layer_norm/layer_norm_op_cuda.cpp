// CUDA implementations of the norm kernel ops (schemas in csrc/ext.cpp, the same as the
// CPU ones in layer_norm_cpu.cpp):
//   norm_fwd_kernel           -> y, z (or empty), mean (empty for RMS), rstd
//   norm_bwd_kernel           -> dx, dresidual (or empty), dweight (or empty), dbias (or empty)
//   dropout_keep_mask_kernel  the kernels' Philox keep-mask, for tests
// Checks the tensors, allocates the outputs (new contiguous tensors), fills
// cuda::NormParams and calls the launchers of layer_norm_cuda.cu. Host code only (g++):
// includes c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h (no cuBLAS headers needed).
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

namespace fusedlayers::cuda {
namespace {

constexpr const char* kFwd = "norm_fwd_kernel";
constexpr const char* kBwd = "norm_bwd_kernel";

DType dtype_code(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, "fusedlayers::", op, ": ", name, " must be float32, float16 or bfloat16 on the cuda backend, got ",
                  t);
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fusedlayers::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fusedlayers::", op, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1) ? t : t.contiguous();
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void set_affine(NormParams& p, const char* op, const at::Tensor& like, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, at::Tensor& w_keep, at::Tensor& b_keep) {
  if (weight.has_value()) {
    check_cuda(*weight, like, op, "weight");
    w_keep = weight->contiguous();
    TORCH_CHECK(w_keep.numel() == p.hidden, "fusedlayers::", op, ": weight must have ", p.hidden, " elements, got ",
                w_keep.numel());
    p.weight = w_keep.const_data_ptr();
    p.weight_dtype = dtype_code(w_keep.scalar_type(), op, "weight");
  }
  if (bias.has_value()) {
    check_cuda(*bias, like, op, "bias");
    b_keep = bias->contiguous();
    TORCH_CHECK(b_keep.numel() == p.hidden, "fusedlayers::", op, ": bias must have ", p.hidden, " elements, got ",
                b_keep.numel());
    p.bias = b_keep.const_data_ptr();
    p.bias_dtype = dtype_code(b_keep.scalar_type(), op, "bias");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t seed, double eps, double dropout_p, bool rms, bool keep_stream,
    at::ScalarType stream_dtype) {
  check_cuda(x_in, x_in, kFwd, "x");
  TORCH_CHECK(x_in.dim() == 2, "fusedlayers::", kFwd, ": x must be 2-D (rows, hidden), got ", x_in.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", kFwd, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_contiguous(x_in);
  NormParams p{};
  p.rows = x.size(0);
  p.hidden = x.size(1);
  p.eps = static_cast<float>(eps);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.rms = rms;
  p.x = x.const_data_ptr();
  p.x_dtype = dtype_code(x.scalar_type(), kFwd, "x");
  p.x_rs = x.stride(0);
  at::Tensor residual, w_keep, b_keep;
  if (residual_in.has_value()) {
    check_cuda(*residual_in, x, kFwd, "residual");
    residual = rows_contiguous(*residual_in);
    TORCH_CHECK(residual.sizes() == x.sizes(), "fusedlayers::", kFwd, ": residual must have x's shape ", x.sizes(),
                ", got ", residual.sizes());
    p.residual = residual.const_data_ptr();
    p.residual_dtype = dtype_code(residual.scalar_type(), kFwd, "residual");
    p.residual_rs = residual.stride(0);
  }
  set_affine(p, kFwd, x, weight, bias, w_keep, b_keep);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor z = keep_stream ? at::empty(x.sizes(), x.options().dtype(stream_dtype)) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : p.rows}, f32);
  at::Tensor rstd = at::empty({p.rows}, f32);
  p.y = y.mutable_data_ptr();
  if (keep_stream) {
    p.z = z.mutable_data_ptr();
    p.z_dtype = dtype_code(z.scalar_type(), kFwd, "the residual stream");
  }
  p.mean = rms ? nullptr : mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.vec = p.hidden % 8 == 0 && p.x_rs % 8 == 0 && p.residual_rs % 8 == 0 && aligned16(p.x) && aligned16(p.residual) &&
          aligned16(p.weight) && aligned16(p.bias) && aligned16(p.y) && aligned16(p.z);
  norm_fwd_launch(p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  return {y, z, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& dz_in, const at::Tensor& zin_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, int64_t seed, double dropout_p, bool rms, at::ScalarType x_dtype,
    std::optional<at::ScalarType> residual_dtype) {
  check_cuda(zin_in, zin_in, kBwd, "zin");
  TORCH_CHECK(zin_in.dim() == 2, "fusedlayers::", kBwd, ": zin must be 2-D (rows, hidden), got ", zin_in.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", kBwd, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  const c10::cuda::CUDAGuard guard(zin_in.device());
  const at::Tensor zin = rows_contiguous(zin_in);
  NormParams p{};
  p.rows = zin.size(0);
  p.hidden = zin.size(1);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.rms = rms;
  p.x_dtype = dtype_code(x_dtype, kBwd, "x");
  p.zin = zin.const_data_ptr();
  p.zin_dtype = dtype_code(zin.scalar_type(), kBwd, "zin");
  p.zin_rs = zin.stride(0);
  check_cuda(dy_in, zin, kBwd, "dy");
  const at::Tensor dy = dy_in.contiguous().to(x_dtype);
  TORCH_CHECK(dy.sizes() == zin.sizes(), "fusedlayers::", kBwd, ": dy must have zin's shape ", zin.sizes(), ", got ",
              dy.sizes());
  p.dy = dy.const_data_ptr();
  at::Tensor dz;
  if (dz_in.has_value()) {
    check_cuda(*dz_in, zin, kBwd, "dz");
    dz = dz_in->contiguous();
    TORCH_CHECK(dz.sizes() == zin.sizes(), "fusedlayers::", kBwd, ": dz must have zin's shape ", zin.sizes(), ", got ",
                dz.sizes());
    p.dz = dz.const_data_ptr();
    p.dz_dtype = dtype_code(dz.scalar_type(), kBwd, "dz");
  }
  check_cuda(rstd_in, zin, kBwd, "rstd");
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == p.rows, "fusedlayers::", kBwd,
              ": rstd must be float32 (rows,), got ", rstd.scalar_type(), " ", rstd.sizes());
  TORCH_CHECK(rms || (mean.is_cuda() && mean.scalar_type() == at::kFloat && mean.numel() == p.rows), "fusedlayers::",
              kBwd, ": mean must be float32 (rows,) on the device, got ", mean.scalar_type(), " ", mean.sizes());
  p.mean = rms ? nullptr : const_cast<float*>(mean.const_data_ptr<float>());
  p.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
  at::Tensor w_keep, b_keep;
  set_affine(p, kBwd, zin, weight, bias, w_keep, b_keep);

  at::Tensor dx = at::empty(zin.sizes(), zin.options().dtype(x_dtype));
  at::Tensor dres = residual_dtype.has_value() ? at::empty(zin.sizes(), zin.options().dtype(*residual_dtype))
                                               : at::empty({0}, zin.options());
  p.dx = dx.mutable_data_ptr();
  if (residual_dtype.has_value()) {
    p.dresidual = dres.mutable_data_ptr();
    p.residual_dtype = dtype_code(*residual_dtype, kBwd, "residual");
  }
  // dweight / dbias: (teams, hidden) float32 partial sums, summed over teams below
  const auto f32 = zin.options().dtype(at::kFloat);
  p.teams = norm_bwd_teams(p.rows, p.hidden, zin.device().index());
  at::Tensor dw_part = weight.has_value() ? at::zeros({p.teams, p.hidden}, f32) : at::Tensor();
  at::Tensor db_part = bias.has_value() ? at::zeros({p.teams, p.hidden}, f32) : at::Tensor();
  p.dweight_partial = weight.has_value() ? dw_part.mutable_data_ptr<float>() : nullptr;
  p.dbias_partial = bias.has_value() ? db_part.mutable_data_ptr<float>() : nullptr;
  p.vec = p.hidden % 8 == 0 && p.zin_rs % 8 == 0 && aligned16(p.zin) && aligned16(p.dy) && aligned16(p.dz) &&
          aligned16(p.weight) && aligned16(p.dx) && aligned16(p.dresidual);
  norm_bwd_launch(p, c10::cuda::getCurrentCUDAStream(zin.device().index()).stream());

  // dweight / dbias in the parameters' dtype (float32 sums, rounded once)
  at::Tensor dw = weight.has_value() ? at::sum(dw_part, {0}).to(weight->scalar_type()).view(weight->sizes())
                                     : at::empty({0}, zin.options());
  at::Tensor db = bias.has_value() ? at::sum(db_part, {0}).to(bias->scalar_type()).view(bias->sizes())
                                   : at::empty({0}, zin.options());
  return {dx, dres, dw, db};
}

void dropout_keep_mask_cuda(const at::Tensor& keep, int64_t seed, double p) {
  TORCH_CHECK(keep.is_cuda(), "fusedlayers::dropout_keep_mask_kernel: keep must be a CUDA tensor, got ", keep.device());
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous(),
              "fusedlayers::dropout_keep_mask_kernel: keep must be a contiguous bool tensor");
  const c10::cuda::CUDAGuard guard(keep.device());
  dropout_keep_mask_launch(keep.mutable_data_ptr<bool>(), keep.numel(), static_cast<uint64_t>(seed),
                           static_cast<float>(p), c10::cuda::getCurrentCUDAStream(keep.device().index()).stream());
}

}  // namespace
}  // namespace fusedlayers::cuda

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  m.impl("norm_fwd_kernel", &fusedlayers::cuda::norm_fwd_cuda);
  m.impl("norm_bwd_kernel", &fusedlayers::cuda::norm_bwd_cuda);
  m.impl("dropout_keep_mask_kernel", &fusedlayers::cuda::dropout_keep_mask_cuda);
}
