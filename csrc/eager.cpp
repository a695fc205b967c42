// fusedlayers._C's Python functions: the eager fast path of the public ops, in C++.
//
// fusedlayers.layer_norm / rms_norm / add_layer_norm / add_rms_norm and fusedlayers.attention
// (fusedlayers/ops.py), and the nn modules built on them, offer each eager call to `norm` or
// `attention` below first. A function serves the call when it is a valid call that the `cpu`
// backend takes as it is:
//   - every tensor a plain torch.Tensor or nn.Parameter (no subclass), on the CPU, float32 /
//     float16 / bfloat16 (the dtypes of fusedlayers.csrc_backend), in the layout the kernel op
//     reads without a copy (see each function);
//   - no dropout; no TorchFunctionMode, TorchDispatchMode, functorch transform or
//     functionalization active (the Python side also skips this path under torch.compile).
// Then validation, the kernel call and the autograd node are all C++, and a call costs about
// what torch's own op costs. Anything else returns None, and the Python path (full
// validation with errors naming the argument, the dispatch table, the torch.library ops)
// serves it. Both paths call the same kernel ops (torch.ops.fusedlayers.*_kernel) through the
// dispatcher, so both give bitwise the same numbers.
//
// Autograd: NormFunction and AttentionFunction are the backward formulas of
// fusedlayers/registration.py in C++. A backward with create_graph=True calls the Python
// path's differentiable backward (registration.norm_double_backward / attention_double_backward).
#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "attention/attention_host.h"

namespace fusedlayers::eager {
namespace {

namespace py = pybind11;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------- acceptance

// No mode or transform that must see the call as a torch.library op (tracing, fake tensors,
// vmap/grad, functionalization, FlopCounter, ...).
bool plain_context() {
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return !(included.has(c10::DispatchKey::Python) || included.has(c10::DispatchKey::PythonTLSSnapshot) ||
           included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
           included.has(c10::DispatchKey::Functionalize));
}

bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// The tensor behind `h` when it is a plain CPU tensor (or Parameter) of a kernel dtype, else nullptr.
const Tensor* cpu_tensor(py::handle h) {
  if (!THPVariable_CheckExact(h.ptr())) return nullptr;
  const Tensor& t = THPVariable_Unpack(h.ptr());
  if (!t.defined() || !t.is_cpu() || !kernel_dtype(t.scalar_type())) return nullptr;
  return &t;
}

// None -> an undefined tensor; a plain CPU tensor -> itself; anything else -> nullopt (decline).
std::optional<Tensor> optional_cpu_tensor(py::handle h) {
  if (h.is_none()) return Tensor();
  const Tensor* t = cpu_tensor(h);
  return t != nullptr ? std::optional<Tensor>(*t) : std::nullopt;
}

std::optional<double> finite_number(py::handle h) {
  if (!PyFloat_Check(h.ptr()) && !PyLong_Check(h.ptr())) return std::nullopt;
  const double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return std::nullopt;
  }
  return std::isfinite(v) ? std::optional<double>(v) : std::nullopt;
}

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }

std::optional<Tensor> opt(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// ctx->needs_input_grad by argument position: `inputs` are a Function's tensor arguments in order
// (undefined where an optional one was None, which has no edge).
bool needs_grad(AutogradContext* ctx, const variable_list& inputs, size_t arg) {
  size_t edge = 0;
  for (size_t i = 0; i < arg; ++i) edge += inputs[i].defined();
  return inputs[arg].defined() && ctx->needs_input_grad(edge);
}

// ---------------------------------------------------------------------------- kernel ops
// Typed handles of the schemas of csrc/ext.cpp. The attention ones end in the score variants
// (window_left, window_right, softcap, alibi_slopes) and the dropout layout: the fast path
// serves plain attention only (fusedlayers.ops sends variant calls to the Python path) and
// passes their defaults.

using NormFwdOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                             const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                             int64_t, double, double, bool, bool, at::ScalarType);
using NormBwdOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                                             const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                             const Tensor&, const Tensor&, int64_t, double, bool,
                                                             at::ScalarType, std::optional<at::ScalarType>);
using AttnFwdOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                             const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t,
                                             int64_t, int64_t, double, bool, bool, double, int64_t, int64_t, double,
                                             const std::optional<Tensor>&, at::OptionalIntArrayRef);
using AttnBwdOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t, int64_t, const Tensor&, const Tensor&,
    int64_t, double, bool, bool, double, bool, int64_t, int64_t, double, const std::optional<Tensor>&,
    at::OptionalIntArrayRef);

template <class Signature>
c10::TypedOperatorHandle<Signature> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<NormFwdOp>& norm_fwd_op() {
  static const auto op = kernel_op<NormFwdOp>("fusedlayers::norm_fwd_kernel");
  return op;
}
const c10::TypedOperatorHandle<NormBwdOp>& norm_bwd_op() {
  static const auto op = kernel_op<NormBwdOp>("fusedlayers::norm_bwd_kernel");
  return op;
}
const c10::TypedOperatorHandle<AttnFwdOp>& attn_fwd_op() {
  static const auto op = kernel_op<AttnFwdOp>("fusedlayers::attention_fwd_kernel");
  return op;
}
const c10::TypedOperatorHandle<AttnBwdOp>& attn_bwd_op() {
  static const auto op = kernel_op<AttnBwdOp>("fusedlayers::attention_bwd_kernel");
  return op;
}

// ---------------------------------------------------------------------------- norms

// z = x + residual in the stream dtype (x alone without residual); y = norm(z) * weight + bias.
// `shape` is x's shape; the kernel sees (rows, hidden) views. Outputs y (x's shape and dtype)
// and, with prenorm, z.
// t as (rows, hidden) and back in a shape: t itself where it has that shape already.
Tensor as_rows(const Tensor& t, int64_t hidden) {
  return t.dim() == 2 && t.size(1) == hidden ? t : t.reshape({-1, hidden});
}
Tensor as_shape(const Tensor& t, at::IntArrayRef sizes) { return t.sizes() == sizes ? t : t.view(sizes); }

struct NormArgs {
  double eps;
  int64_t hidden;
  bool rms, prenorm, keep_stream;
  at::ScalarType stream_dtype;
};

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                                        const Tensor& bias, const NormArgs& a) {
  const Tensor x2 = as_rows(x, a.hidden);
  const Tensor r2 = residual.defined() ? as_rows(residual, a.hidden) : Tensor();
  auto [y, z, mean, rstd] =
      norm_fwd_op().call(x2, opt(r2), opt(weight), opt(bias), 0, a.eps, 0.0, a.rms, a.keep_stream, a.stream_dtype);
  if (y.sizes() == x.sizes()) return {y, z, mean, rstd};
  return {at::_unsafe_view(y, x.sizes()), a.keep_stream ? at::_unsafe_view(z, x.sizes()) : z, mean, rstd};
}

struct NormFunction : public torch::autograd::Function<NormFunction> {
  // Inputs: x, residual, weight, bias (nullopt when absent), and the NormArgs fields.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& residual_in,
                               const std::optional<Tensor>& weight_in, const std::optional<Tensor>& bias_in,
                               double eps, int64_t hidden, bool rms, bool prenorm, bool keep_stream,
                               int64_t stream_dtype) {
    const NormArgs a{eps, hidden, rms, prenorm, keep_stream, static_cast<at::ScalarType>(stream_dtype)};
    const Tensor residual = residual_in.value_or(Tensor()), weight = weight_in.value_or(Tensor()),
                 bias = bias_in.value_or(Tensor());
    auto [y, z, mean, rstd] = norm_forward(x, residual, weight, bias, a);
    ctx->set_materialize_grads(false);
    // zin, the normalised stream: z when it is kept, else x itself.
    ctx->save_for_backward({x, residual, weight, bias, keep_stream ? z : x, mean, rstd});
    ctx->saved_data["a"] = c10::List<double>({eps, static_cast<double>(hidden), rms ? 1.0 : 0.0, prenorm ? 1.0 : 0.0,
                                              keep_stream ? 1.0 : 0.0, static_cast<double>(stream_dtype)});
    if (prenorm) return {y, z};
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &residual = saved[1], &weight = saved[2], &bias = saved[3];
    const auto v = ctx->saved_data["a"].toDoubleList();
    const NormArgs a{v.get(0), static_cast<int64_t>(v.get(1)), v.get(2) != 0.0, v.get(3) != 0.0, v.get(4) != 0.0,
                     static_cast<at::ScalarType>(static_cast<int64_t>(v.get(5)))};
    Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(x);
    const Tensor dz = a.prenorm && grads.size() > 1 ? grads[1] : Tensor();
    variable_list out(10);
    const Tensor zin = as_rows(saved[4], a.hidden);
    if (at::GradMode::is_enabled()) {  // create_graph=True: the Python path's differentiable backward
      py::gil_scoped_acquire gil;
      static const auto* double_backward =
          new py::object(py::module_::import("fusedlayers.registration").attr("norm_double_backward"));
      auto none_or = [](const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); };
      auto dtype = [](at::ScalarType t) {
        return py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(t)));
      };
      // the stream again from the inputs, so that the second-order terms reach x and the residual
      // (the saved z is not an output of this node unless prenorm)
      const Tensor z = residual.defined() ? x.to(a.stream_dtype) + residual.to(a.stream_dtype) : x.to(a.stream_dtype);
      const py::tuple g = (*double_backward)(
          dy.reshape({-1, a.hidden}), dz.defined() ? py::cast(dz.reshape({-1, a.hidden})) : py::none(),
          z.reshape({-1, a.hidden}),
          none_or(weight.defined() ? weight.view({-1}) : weight), none_or(bias.defined() ? bias.view({-1}) : bias),
          saved[5], saved[6], py::none(), a.eps, 0.0, a.rms, dtype(x.scalar_type()),
          residual.defined() ? dtype(residual.scalar_type()) : py::none(), "cpu");
      const Tensor* shapes[4] = {&x, &residual, &weight, &bias};
      for (size_t i = 0; i < 4; ++i) {
        if (shapes[i]->defined() && !g[i].is_none()) out[i] = THPVariable_Unpack(g[i].ptr()).view(shapes[i]->sizes());
      }
      return out;
    }
    // Without dropout the residual's gradient is dx itself: when it also has x's dtype the
    // kernel writes it once and both inputs get that tensor (autograd copies before it
    // accumulates into a shared one), as torch's own x + residual backward does.
    const bool share = residual.defined() && residual.scalar_type() == x.scalar_type();
    const std::optional<at::ScalarType> residual_dtype =
        residual.defined() && !share ? std::optional<at::ScalarType>(residual.scalar_type()) : std::nullopt;
    // bias only shapes y: the kernel needs it for dbias alone
    const bool bias_grad = bias.defined() && needs_grad(ctx, {x, residual, weight, bias}, 3);
    const Tensor dy2 = as_rows(dy, a.hidden);
    const std::optional<Tensor> dz2 = dz.defined() ? opt(as_rows(dz, a.hidden)) : std::nullopt;
    auto [dx, dres, dw, db] = [&] {
      // (grad mode is off: straight to the kernel, not through the autograd fallback's boxed call)
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return norm_bwd_op().call(dy2, dz2, zin, opt(weight), bias_grad ? opt(bias) : std::nullopt, saved[5], saved[6],
                                0, 0.0, a.rms, x.scalar_type(), residual_dtype);
    }();
    out[0] = as_shape(dx, x.sizes());
    if (residual.defined()) out[1] = share ? out[0] : as_shape(dres, residual.sizes());
    if (weight.defined()) out[2] = dw;
    if (bias_grad) out[3] = db;
    return out;
  }
};

// norm(x, residual, weight, bias, eps, norm_ndim, rms, prenorm, residual_in_fp32) -> y, (y, z) or None.
// Serves: x contiguous with at least norm_ndim dims and a non-empty row; residual None or of x's
// shape, contiguous; weight / bias None or contiguous with hidden = prod(x.shape[-norm_ndim:])
// elements; eps a finite number >= 0.
py::object norm(py::handle x_h, py::handle residual_h, py::handle weight_h, py::handle bias_h, py::handle eps_h,
                int64_t norm_ndim, bool rms, bool prenorm, bool residual_in_fp32) {
  const Tensor* xp = cpu_tensor(x_h);
  if (xp == nullptr || !plain_context()) return py::none();
  const Tensor& x = *xp;
  const auto residual = optional_cpu_tensor(residual_h), weight = optional_cpu_tensor(weight_h),
             bias = optional_cpu_tensor(bias_h);
  const auto eps = finite_number(eps_h);
  if (!residual || !weight || !bias || !eps || *eps < 0.0) return py::none();
  if (norm_ndim < 1 || x.dim() < norm_ndim || x.numel() == 0 || !x.is_contiguous()) return py::none();
  int64_t hidden = 1;
  for (int64_t d = x.dim() - norm_ndim; d < x.dim(); ++d) hidden *= x.size(d);
  if (residual->defined() && (residual->sizes() != x.sizes() || !residual->is_contiguous())) return py::none();
  for (const Tensor* p : {&*weight, &*bias}) {
    if (p->defined() && (p->numel() != hidden || !p->is_contiguous() || p->dim() > norm_ndim)) return py::none();
  }
  const at::ScalarType stream_dtype =
      residual_in_fp32 ? at::kFloat : residual->defined() ? residual->scalar_type() : x.scalar_type();
  const NormArgs a{*eps, hidden, rms, prenorm,
                   residual->defined() || prenorm || stream_dtype != x.scalar_type(), stream_dtype};

  const bool grad = at::GradMode::is_enabled() && (requires_grad(x) || requires_grad(*residual) ||
                                                   requires_grad(*weight) || requires_grad(*bias));
  Tensor y, z;
  {
    py::gil_scoped_release no_gil;
    if (grad) {
      auto outs = NormFunction::apply(x, opt(*residual), opt(*weight), opt(*bias), a.eps, a.hidden, a.rms, a.prenorm, a.keep_stream,
                                      static_cast<int64_t>(a.stream_dtype));
      y = outs[0];
      if (prenorm) z = outs[1];
    } else {
      // without a backward, z is written only as the prenorm output (the cpu kernel takes y from z rounded to a
      // 16-bit stream dtype without storing it)
      NormArgs b = a;
      b.keep_stream = a.keep_stream && prenorm;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, z, std::ignore, std::ignore) = norm_forward(x, *residual, *weight, *bias, b);
    }
  }
  return prenorm ? py::object(py::make_tuple(y, z)) : py::cast(y);
}

// ---------------------------------------------------------------------------- attention

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  // Inputs: q, k, v, mask (nullopt when absent; 4-D), scale, causal, bottom_right.
  // Outputs: out, lse.
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& mask_in, double scale, bool causal, bool bottom_right) {
    const Tensor mask = mask_in.value_or(Tensor());
    auto [out, lse] = attn_fwd_op().call(q, k, v, mask_in, std::nullopt, std::nullopt, 0, 0, 0, scale, causal,
                                         bottom_right, 0.0, -1, -1, 0.0, std::nullopt, std::nullopt);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k, v, mask, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["bottom_right"] = bottom_right;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &mask = saved[3], &out = saved[4], &lse = saved[5];
    const Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const Tensor dlse = grads[1].defined() ? grads[1] : at::zeros_like(lse);
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool causal = ctx->saved_data["causal"].toBool(), bottom_right = ctx->saved_data["bottom_right"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True: the Python path's differentiable backward
      py::gil_scoped_acquire gil;
      static const auto* double_backward = new py::object(
          py::module_::import("fusedlayers.registration").attr("attention_double_backward"));
      const py::tuple needs = py::make_tuple(needs_grad(ctx, saved, 0), needs_grad(ctx, saved, 1),
                                             needs_grad(ctx, saved, 2), needs_grad(ctx, saved, 3));
      const py::tuple g = (*double_backward)(dout, dlse, q, k, v, mask.defined() ? py::cast(mask) : py::none(),
                                             py::none(), scale, causal, bottom_right, 0.0, "cpu", needs);
      variable_list result(7);
      for (size_t i = 0; i < 4; ++i) {
        if (!g[i].is_none()) result[i] = THPVariable_Unpack(g[i].ptr());
      }
      return result;
    }
    const bool bias_grad = mask.defined() && mask.is_floating_point() && needs_grad(ctx, saved, 3);
    auto [dq, dk, dv, dbias] = [&] {
      // (grad mode is off: straight to the kernel, not through the autograd fallback's boxed call)
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return attn_bwd_op().call(dout, dlse, q, k, v, opt(mask), std::nullopt, std::nullopt, 0, 0, out, lse, 0, scale,
                                causal, bottom_right, 0.0, bias_grad, -1, -1, 0.0, std::nullopt, std::nullopt);
    }();
    return {dq, dk, dv, bias_grad ? dbias : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// attention(q, k, v, attn_mask, causal, bottom_right, scale, return_lse) -> out, (out, lse) or None.
// Serves: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), non-empty, one dtype, Hq % Hkv
// == 0, each with a contiguous last dim and rows that neither repeat nor overlap (other dims free:
// the q, k, v views of a packed projection); attn_mask None, or a contiguous bool /
// float (q's dtype or float32) tensor of at most 4 dims each 1 or full-size (right-aligned
// against (B, Hq, Nq, Nk)); scale None or finite.
py::object attention(py::handle q_h, py::handle k_h, py::handle v_h, py::handle mask_h, bool causal,
                     bool bottom_right, py::handle scale_h, bool return_lse) {
  const Tensor *qp = cpu_tensor(q_h), *kp = cpu_tensor(k_h), *vp = cpu_tensor(v_h);
  if (qp == nullptr || kp == nullptr || vp == nullptr || !plain_context()) return py::none();
  const Tensor &q = *qp, &k = *kp, &v = *vp;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return py::none();
  if (k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type()) return py::none();
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) return py::none();
  const int64_t b = q.size(0), hq = q.size(1), nq = q.size(2), hkv = k.size(1), nk = k.size(2);
  if (k.size(0) != b || v.size(0) != b || v.size(1) != hkv || v.size(2) != nk || k.size(3) != q.size(3) ||
      hq % hkv != 0) {
    return py::none();
  }
  using attention_host::kernel_reads;  // (else the kernel op would read a copy)
  if (!kernel_reads(q, 2) || !kernel_reads(k, 2) || !kernel_reads(v, 2)) return py::none();
  Tensor mask;
  if (!mask_h.is_none()) {
    if (!THPVariable_CheckExact(mask_h.ptr())) return py::none();
    const Tensor& m = THPVariable_Unpack(mask_h.ptr());
    if (!m.is_cpu() || m.dim() > 4 || !m.is_contiguous()) return py::none();
    if (m.scalar_type() != at::kBool && m.scalar_type() != q.scalar_type() && m.scalar_type() != at::kFloat) {
      return py::none();
    }
    const int64_t full[4] = {b, hq, nq, nk};
    for (int64_t d = 0; d < m.dim(); ++d) {
      const int64_t size = m.size(m.dim() - 1 - d);
      if (size != 1 && size != full[3 - d]) return py::none();
    }
    mask = m;
  }
  double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  if (!scale_h.is_none()) {
    const auto s = finite_number(scale_h);
    if (!s) return py::none();
    scale = *s;
  }

  Tensor out, lse;
  const bool grad = at::GradMode::is_enabled() &&
                    (q.requires_grad() || k.requires_grad() || v.requires_grad() || requires_grad(mask));
  {
    py::gil_scoped_release no_gil;
    if (mask.defined() && mask.dim() < 4) {
      std::vector<int64_t> shape(4 - mask.dim(), 1);
      shape.insert(shape.end(), mask.sizes().begin(), mask.sizes().end());
      mask = mask.view(shape);  // a view: the bias gradient flows back through it
    }
    if (grad) {
      auto outs = AttentionFunction::apply(q, k, v, opt(mask), scale, causal, bottom_right);
      out = outs[0], lse = outs[1];
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, lse) = attn_fwd_op().call(q, k, v, opt(mask), std::nullopt, std::nullopt, 0, 0, 0, scale, causal,
                                              bottom_right, 0.0, -1, -1, 0.0, std::nullopt, std::nullopt);
    }
  }
  return return_lse ? py::object(py::make_tuple(out, lse)) : py::cast(out);
}

}  // namespace
}  // namespace fusedlayers::eager

// The extension module fusedlayers._C: its import also runs the TORCH_LIBRARY registrations
// of every translation unit (torch.ops.fusedlayers.*).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedlayers C++/CUDA ops (torch.ops.fusedlayers.*) and the eager fast path of the public ops";
  m.def("norm", &fusedlayers::eager::norm,
        "norm(x, residual, weight, bias, eps, norm_ndim, rms, prenorm, residual_in_fp32) -> y, (y, z) or None");
  m.def("attention", &fusedlayers::eager::attention,
        "attention(q, k, v, attn_mask, causal, bottom_right, scale, return_lse) -> out, (out, lse) or None");
}
