// Host glue shared by the norm ops of both devices (layer_norm_cpu.cpp, layer_norm_op_cuda.cpp):
// the argument checks, the NormParams filling and the allocation of the outputs both devices
// return alike. What differs by device stays in the op files: the device guard, the dweight /
// dbias buffers (CPU: full sums; CUDA: per-team partial sums), the vectorisation flag and the
// kernel call. Semantics: fusedlayers/registration.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <tuple>

#include "common/op_utils.h"
#include "common/params.h"

namespace fusedlayers::norm_host {

// What the shared glue needs to know of a device.
struct Device {
  c10::DeviceType type;
  const char* backend;  // "cpu" / "cuda", for messages
  EmptyFn empty;  // a new tensor for an output the kernels write in full
};

// t is a tensor of `dev`, on like's device.
inline void check_device(const Device& dev, const at::Tensor& t, const at::Tensor& like, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device().type() == dev.type, "fusedlayers::", op, ": ", name, " must be a ",
              c10::DeviceTypeName(dev.type), " tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fusedlayers::", op, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

inline DType code(const Device& dev, at::ScalarType t, const char* op, const char* name) {
  return dtype_code(t, op, name, dev.backend);
}

inline void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
}

// The tensors the params point into that the glue made (contiguous copies), kept alive until
// the kernel has run.
struct Keep {
  at::Tensor rows, residual, weight, bias, dy, dz, mean, rstd;
};

// weight or bias (hidden,): made contiguous into `keep`, checked, its pointer and dtype set.
inline void set_param(const Device& dev, const char* op, const char* name, int64_t hidden, const at::Tensor& like,
                      const std::optional<at::Tensor>& param, at::Tensor& keep, const void*& ptr, DType& dtype) {
  if (!param.has_value()) return;
  check_device(dev, *param, like, op, name);
  keep = param->contiguous();
  TORCH_CHECK(keep.numel() == hidden, "fusedlayers::", op, ": ", name, " must have ", hidden, " elements, got ",
              keep.numel());
  ptr = keep.const_data_ptr();
  dtype = code(dev, keep.scalar_type(), op, name);
}

inline void set_affine(const Device& dev, NormParams& p, const char* op, const at::Tensor& like,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, Keep& keep) {
  set_param(dev, op, "weight", p.hidden, like, weight, keep.weight, p.weight, p.weight_dtype);
  set_param(dev, op, "bias", p.hidden, like, bias, keep.bias, p.bias, p.bias_dtype);
}

// What both directions check and set from the row tensor (x forward, zin backward): a 2-D
// tensor on the device, kept as keep.rows through rows_contiguous; rows, hidden, dropout, seed, rms.
inline at::Tensor rows_setup(const Device& dev, NormParams& p, Keep& keep, const char* op, const char* name,
                             const at::Tensor& t_in, int64_t seed, double dropout_p, bool rms) {
  check_device(dev, t_in, t_in, op, name);
  TORCH_CHECK(t_in.dim() == 2, "fusedlayers::", op, ": ", name, " must be 2-D (rows, hidden), got ", t_in.sizes());
  check_dropout(op, dropout_p);
  const at::Tensor t = keep.rows = rows_contiguous(t_in);
  p.rows = t.size(0);
  p.hidden = t.size(1);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.rms = rms;
  return t;
}

// The forward: checks, fills p (inputs and outputs), allocates y, z (or empty), mean (empty
// for RMS norm), rstd. keep.rows is x (through rows_contiguous).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_setup(
    const Device& dev, NormParams& p, Keep& keep, const char* op, const at::Tensor& x_in,
    const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t seed, double eps, double dropout_p, bool rms, bool keep_stream,
    at::ScalarType stream_dtype) {
  const at::Tensor x = rows_setup(dev, p, keep, op, "x", x_in, seed, dropout_p, rms);
  p.eps = static_cast<float>(eps);
  p.x = x.const_data_ptr();
  p.x_dtype = code(dev, x.scalar_type(), op, "x");
  p.x_rs = x.stride(0);
  if (residual_in.has_value()) {
    check_device(dev, *residual_in, x, op, "residual");
    keep.residual = rows_contiguous(*residual_in);
    TORCH_CHECK(keep.residual.sizes() == x.sizes(), "fusedlayers::", op, ": residual must have x's shape ",
                x.sizes(), ", got ", keep.residual.sizes());
    p.residual = keep.residual.const_data_ptr();
    p.residual_dtype = code(dev, keep.residual.scalar_type(), op, "residual");
    p.residual_rs = keep.residual.stride(0);
  }
  set_affine(dev, p, op, x, weight, bias, keep);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = dev.empty(x.sizes(), x.options());
  at::Tensor z = keep_stream ? dev.empty(x.sizes(), x.options().dtype(stream_dtype))
                             : at::empty({0}, x.options().dtype(stream_dtype));
  at::Tensor mean = at::empty({rms ? 0 : p.rows}, f32);
  at::Tensor rstd = at::empty({p.rows}, f32);
  p.y = y.mutable_data_ptr();
  p.z_dtype = code(dev, stream_dtype, op, "the residual stream");
  if (keep_stream) p.z = z.mutable_data_ptr();
  p.mean = rms ? nullptr : mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  return {y, z, mean, rstd};
}

// The backward: checks, fills p (everything but the dweight / dbias buffers), allocates dx
// and dresidual (or empty). keep.rows is zin (through rows_contiguous).
inline std::tuple<at::Tensor, at::Tensor> bwd_setup(
    const Device& dev, NormParams& p, Keep& keep, const char* op, const at::Tensor& dy_in,
    const std::optional<at::Tensor>& dz_in, const at::Tensor& zin_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t seed,
    double dropout_p, bool rms, at::ScalarType x_dtype, std::optional<at::ScalarType> residual_dtype) {
  const at::Tensor zin = rows_setup(dev, p, keep, op, "zin", zin_in, seed, dropout_p, rms);
  p.x_dtype = code(dev, x_dtype, op, "x");
  p.zin = zin.const_data_ptr();
  p.zin_dtype = code(dev, zin.scalar_type(), op, "zin");
  p.zin_rs = zin.stride(0);
  check_device(dev, dy_in, zin, op, "dy");
  keep.dy = dy_in.contiguous().to(x_dtype);
  TORCH_CHECK(keep.dy.sizes() == zin.sizes(), "fusedlayers::", op, ": dy must have zin's shape ", zin.sizes(),
              ", got ", keep.dy.sizes());
  p.dy = keep.dy.const_data_ptr();
  if (dz_in.has_value()) {
    check_device(dev, *dz_in, zin, op, "dz");
    keep.dz = dz_in->contiguous();
    TORCH_CHECK(keep.dz.sizes() == zin.sizes(), "fusedlayers::", op, ": dz must have zin's shape ", zin.sizes(),
                ", got ", keep.dz.sizes());
    p.dz = keep.dz.const_data_ptr();
    p.dz_dtype = code(dev, keep.dz.scalar_type(), op, "dz");
  }
  check_device(dev, rstd_in, zin, op, "rstd");
  keep.rstd = rstd_in.contiguous();
  TORCH_CHECK(keep.rstd.scalar_type() == at::kFloat && keep.rstd.numel() == p.rows, "fusedlayers::", op,
              ": rstd must be float32 (rows,), got ", keep.rstd.scalar_type(), " ", keep.rstd.sizes());
  if (!rms) {  // RMS norm has no mean (the forward returns an empty one)
    check_device(dev, mean_in, zin, op, "mean");
    keep.mean = mean_in.contiguous();
    TORCH_CHECK(keep.mean.scalar_type() == at::kFloat && keep.mean.numel() == p.rows, "fusedlayers::", op,
                ": mean must be float32 (rows,), got ", keep.mean.scalar_type(), " ", keep.mean.sizes());
    p.mean = const_cast<float*>(keep.mean.const_data_ptr<float>());
  }
  p.rstd = const_cast<float*>(keep.rstd.const_data_ptr<float>());
  set_affine(dev, p, op, zin, weight, bias, keep);

  at::Tensor dx = dev.empty(zin.sizes(), zin.options().dtype(x_dtype));
  at::Tensor dres = residual_dtype.has_value() ? dev.empty(zin.sizes(), zin.options().dtype(*residual_dtype))
                                               : at::empty({0}, zin.options());
  p.dx = dx.mutable_data_ptr();
  if (residual_dtype.has_value()) {
    p.dresidual = dres.mutable_data_ptr();
    p.residual_dtype = code(dev, *residual_dtype, op, "residual");
  }
  return {dx, dres};
}

// A float32 sum over `hidden` (dweight / dbias) in the parameter's dtype and shape (rounded
// once), or an empty tensor when the parameter is absent.
inline at::Tensor param_grad(const at::Tensor& sum, const std::optional<at::Tensor>& param, const at::Tensor& like) {
  if (!param.has_value()) return at::empty({0}, like.options());
  const at::Tensor g = sum.to(param->scalar_type());
  return g.sizes() == param->sizes() ? g : g.view(param->sizes());
}

}  // namespace fusedlayers::norm_host
