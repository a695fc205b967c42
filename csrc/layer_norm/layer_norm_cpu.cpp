// CPU implementations of the norm kernel ops (schemas in csrc/ext.cpp):
//   norm_fwd_kernel  z = dropout(x) + residual; y = LN(z) or RMSNorm(z) -> y, z (or empty), mean, rstd
//   norm_bwd_kernel  -> dx, dresidual (or empty), dweight (or empty), dbias (or empty)
// The checks, the params and the outputs shared with the CUDA op are in layer_norm_host.h; this
// file adds the dweight / dbias sums and calls the kernel of the machine's SIMD level
// (layer_norm_cpu_kernel.h). Outputs are new contiguous tensors, each allocated once.
// Python adapter: fusedlayers/csrc_backend.py. Semantics: fusedlayers/registration.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/kernels.h"
#include "cpu/ops_common.h"
#include "layer_norm/layer_norm_host.h"

namespace fusedlayers::cpu {
namespace {

constexpr const char* kFwd = "norm_fwd_kernel";
constexpr const char* kBwd = "norm_bwd_kernel";
const norm_host::Device kCpu{c10::DeviceType::CPU, "cpu", &empty_output};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t seed, double eps, double dropout_p, bool rms, bool keep_stream,
    at::ScalarType stream_dtype) {
  NormParams p{};
  norm_host::Keep keep;
  auto outs = norm_host::fwd_setup(kCpu, p, keep, kFwd, x, residual, weight, bias, seed, eps, dropout_p, rms,
                                   keep_stream, stream_dtype);
  if (p.rows > 0 && p.hidden > 0) kernels().norm_fwd(p);
  return outs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dz, const at::Tensor& zin,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t seed, double dropout_p, bool rms, at::ScalarType x_dtype,
    std::optional<at::ScalarType> residual_dtype) {
  NormParams p{};
  norm_host::Keep keep;
  auto [dx, dres] = norm_host::bwd_setup(kCpu, p, keep, kBwd, dy, dz, zin, weight, bias, mean, rstd, seed, dropout_p,
                                         rms, x_dtype, residual_dtype);
  // dweight / dbias: float32 (hidden,) sums written by the kernel
  const auto f32 = zin.options().dtype(at::kFloat);
  at::Tensor dw = weight.has_value() ? at::empty({p.hidden}, f32) : at::Tensor();
  at::Tensor db = bias.has_value() ? at::empty({p.hidden}, f32) : at::Tensor();
  p.dweight = weight.has_value() ? dw.mutable_data_ptr<float>() : nullptr;
  p.dbias = bias.has_value() ? db.mutable_data_ptr<float>() : nullptr;
  if (p.rows > 0 && p.hidden > 0) {
    kernels().norm_bwd(p);
  } else {
    if (p.dweight) dw.zero_();
    if (p.dbias) db.zero_();
  }
  return {dx, dres, norm_host::param_grad(dw, weight, zin), norm_host::param_grad(db, bias, zin)};
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("norm_fwd_kernel", &fusedlayers::cpu::norm_fwd_cpu);
  m.impl("norm_bwd_kernel", &fusedlayers::cpu::norm_bwd_cpu);
}
