// CPU implementations of the norm kernel ops (schemas in csrc/ext.cpp):
//   norm_fwd_kernel  z = dropout(x) + residual; y = LN(z) or RMSNorm(z) -> y, z (or empty), mean, rstd
//   norm_bwd_kernel  -> dx, dresidual (or empty), dweight (or empty), dbias (or empty)
// Checks, allocates each output once (new contiguous tensors), fills cpu::NormParams and
// calls the kernel of the machine's SIMD level (layer_norm_cpu_kernel.h).
// Python adapter: fusedlayers/csrc_backend.py. Semantics: fusedlayers/registration.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/kernels.h"
#include "cpu/ops_common.h"

namespace fusedlayers::cpu {
namespace {

constexpr const char* kFwd = "norm_fwd_kernel";
constexpr const char* kBwd = "norm_bwd_kernel";

DType dtype_of_scalar(at::ScalarType t, const char* op, const char* name) {
  return dtype_of(at::empty({0}, at::TensorOptions().dtype(t)), op, name);
}

void set_affine(NormParams& p, const char* op, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, at::Tensor& w_keep, at::Tensor& b_keep) {
  if (weight.has_value()) {
    check_cpu(*weight, op, "weight");
    w_keep = weight->contiguous();
    TORCH_CHECK(w_keep.numel() == p.hidden, "fusedlayers::", op, ": weight must have ", p.hidden, " elements");
    p.weight = w_keep.const_data_ptr();
    p.weight_dtype = dtype_of(w_keep, op, "weight");
  }
  if (bias.has_value()) {
    check_cpu(*bias, op, "bias");
    b_keep = bias->contiguous();
    TORCH_CHECK(b_keep.numel() == p.hidden, "fusedlayers::", op, ": bias must have ", p.hidden, " elements");
    p.bias = b_keep.const_data_ptr();
    p.bias_dtype = dtype_of(b_keep, op, "bias");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t seed, double eps, double dropout_p, bool rms, bool keep_stream,
    at::ScalarType stream_dtype) {
  check_cpu(x_in, kFwd, "x");
  TORCH_CHECK(x_in.dim() == 2, "fusedlayers::", kFwd, ": x must be 2-D (rows, hidden), got ", x_in.sizes());
  const at::Tensor x = rows_contiguous(x_in);
  NormParams p{};
  p.rows = x.size(0);
  p.hidden = x.size(1);
  p.eps = static_cast<float>(eps);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", kFwd, ": dropout_p must be in [0, 1)");
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.rms = rms;
  p.x = x.const_data_ptr();
  p.x_dtype = dtype_of(x, kFwd, "x");
  p.x_rs = x.stride(0);
  at::Tensor residual, w_keep, b_keep;
  if (residual_in.has_value()) {
    check_cpu(*residual_in, kFwd, "residual");
    residual = rows_contiguous(*residual_in);
    TORCH_CHECK(residual.sizes() == x.sizes(), "fusedlayers::", kFwd, ": residual must have x's shape");
    p.residual = residual.const_data_ptr();
    p.residual_dtype = dtype_of(residual, kFwd, "residual");
    p.residual_rs = residual.stride(0);
  }
  set_affine(p, kFwd, weight, bias, w_keep, b_keep);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor z = keep_stream ? empty_output(x.sizes(), x.options().dtype(stream_dtype)) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : p.rows}, f32);
  at::Tensor rstd = at::empty({p.rows}, f32);
  p.y = y.mutable_data_ptr();
  if (keep_stream) {
    p.z = z.mutable_data_ptr();
    p.z_dtype = dtype_of(z, kFwd, "the residual stream");
  }
  p.mean = rms ? nullptr : mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  if (p.rows > 0 && p.hidden > 0) kernels().norm_fwd(p);
  return {y, z, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& dz_in, const at::Tensor& zin_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, int64_t seed, double dropout_p, bool rms, at::ScalarType x_dtype,
    std::optional<at::ScalarType> residual_dtype) {
  check_cpu(zin_in, kBwd, "zin");
  TORCH_CHECK(zin_in.dim() == 2, "fusedlayers::", kBwd, ": zin must be 2-D (rows, hidden), got ", zin_in.sizes());
  const at::Tensor zin = rows_contiguous(zin_in);
  NormParams p{};
  p.rows = zin.size(0);
  p.hidden = zin.size(1);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", kBwd, ": dropout_p must be in [0, 1)");
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.rms = rms;
  p.x_dtype = dtype_of_scalar(x_dtype, kBwd, "x");
  p.zin = zin.const_data_ptr();
  p.zin_dtype = dtype_of(zin, kBwd, "zin");
  p.zin_rs = zin.stride(0);
  check_cpu(dy_in, kBwd, "dy");
  check_cpu(mean_in, kBwd, "mean");
  check_cpu(rstd_in, kBwd, "rstd");
  if (dz_in.has_value()) check_cpu(*dz_in, kBwd, "dz");
  const at::Tensor dy = dy_in.contiguous().to(x_dtype);
  TORCH_CHECK(dy.sizes() == zin.sizes(), "fusedlayers::", kBwd, ": dy must have zin's shape");
  p.dy = dy.const_data_ptr();
  at::Tensor dz;
  if (dz_in.has_value()) {
    dz = dz_in->contiguous();
    TORCH_CHECK(dz.sizes() == zin.sizes(), "fusedlayers::", kBwd, ": dz must have zin's shape");
    p.dz = dz.const_data_ptr();
    p.dz_dtype = dtype_of(dz, kBwd, "dz");
  }
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == p.rows &&
                  (rms || (mean.scalar_type() == at::kFloat && mean.numel() == p.rows)),
              "fusedlayers::", kBwd, ": mean / rstd must be float32 (rows,)");
  p.mean = rms ? nullptr : const_cast<float*>(mean.const_data_ptr<float>());
  p.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
  at::Tensor w_keep, b_keep;
  set_affine(p, kBwd, weight, bias, w_keep, b_keep);

  at::Tensor dx = empty_output(zin.sizes(), zin.options().dtype(x_dtype));
  at::Tensor dres = residual_dtype.has_value() ? empty_output(zin.sizes(), zin.options().dtype(*residual_dtype))
                                               : at::empty({0}, zin.options());
  const auto f32 = zin.options().dtype(at::kFloat);
  at::Tensor dw = weight.has_value() ? at::empty({p.hidden}, f32) : at::empty({0}, zin.options());
  at::Tensor db = bias.has_value() ? at::empty({p.hidden}, f32) : at::empty({0}, zin.options());
  p.dx = dx.mutable_data_ptr();
  if (residual_dtype.has_value()) {
    p.dresidual = dres.mutable_data_ptr();
    p.residual_dtype = dtype_of(dres, kBwd, "residual");
  }
  p.dweight = weight.has_value() ? dw.mutable_data_ptr<float>() : nullptr;
  p.dbias = bias.has_value() ? db.mutable_data_ptr<float>() : nullptr;
  if (p.rows > 0 && p.hidden > 0) {
    kernels().norm_bwd(p);
  } else {
    if (p.dweight) dw.zero_();
    if (p.dbias) db.zero_();
  }
  // dweight / dbias in the parameters' dtype (float32 sums, rounded once)
  if (weight.has_value()) dw = dw.to(weight->scalar_type()).view(weight->sizes());
  if (bias.has_value()) db = db.to(bias->scalar_type()).view(bias->sizes());
  return {dx, dres, dw, db};
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("norm_fwd_kernel", &fusedlayers::cpu::norm_fwd_cpu);
  m.impl("norm_bwd_kernel", &fusedlayers::cpu::norm_bwd_cpu);
}
