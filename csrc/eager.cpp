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
// Autograd: NormBackward and AttentionBackward are autograd graph nodes written as torch's
// generated ones are (saved variables and edges, no torch::autograd::Function context), with
// the backward formulas of fusedlayers/registration.py in C++. A backward with
// create_graph=True calls the Python path's differentiable backward
// (registration.norm_double_backward / attention_double_backward). Compiled autograd traces
// them through apply_with_saved: the saved tensors swapped for its proxies, then apply, whose
// kernel ops it records.
#include <torch/extension.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

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
using torch::autograd::CompiledNodeArgs;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::SwapSavedVariables;
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

// No input carries a forward-mode (dual) gradient. The fast path has no forward-mode formula (its
// nodes are reverse mode only), so a call with a tangent goes to the Python path, grad or not.
bool no_forward_grad(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors) {
    if (torch::autograd::isFwGradDefined(*t)) return false;
  }
  return true;
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

// The backward node of a norm call. Inputs (edges): x, residual, weight, bias (an invalid edge
// where absent or not requiring grad). Outputs: y, and z with prenorm.
struct NormBackward : public Node {
  NormArgs a{};
  // zin: the normalised stream, z when it is kept, else x itself
  SavedVariable x_, residual_, weight_, bias_, zin_, mean_, rstd_;

  std::string name() const override { return "fusedlayers::NormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x_, &residual_, &weight_, &bias_, &zin_, &mean_, &rstd_}) v->reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(std::string(name()));
    for (const SavedVariable* v : {&x_, &residual_, &weight_, &bias_, &mean_, &rstd_}) args.collect(*v, false);
    args.collect(zin_, a.prenorm);
    args.collect(a.eps), args.collect(a.hidden), args.collect(a.rms), args.collect(a.prenorm);
    args.collect(a.keep_stream), args.collect(a.stream_dtype);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    for (SavedVariable* v : {&x_, &residual_, &weight_, &bias_, &zin_, &mean_, &rstd_}) saved.before(*v);
    variable_list out = apply(variable_list(grads));
    for (SavedVariable* v : {&x_, &residual_, &weight_, &bias_, &zin_, &mean_, &rstd_}) saved.after(*v);
    return out;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor x = x_.unpack(), residual = residual_.unpack(), weight = weight_.unpack(), bias = bias_.unpack();
    const Tensor zin = as_rows(zin_.unpack(getptr()), a.hidden), mean = mean_.unpack(),
                 rstd = rstd_.unpack();
    Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(x);
    const Tensor dz = a.prenorm && grads.size() > 1 ? grads[1] : Tensor();
    variable_list out(4);
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
          mean, rstd, py::none(), a.eps, 0.0, a.rms, dtype(x.scalar_type()),
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
    const bool bias_grad = bias.defined() && task_should_compute_output(3);
    const Tensor dy2 = as_rows(dy, a.hidden);
    const std::optional<Tensor> dz2 = dz.defined() ? opt(as_rows(dz, a.hidden)) : std::nullopt;
    auto [dx, dres, dw, db] = [&] {
      // (grad mode is off: straight to the kernel, not through the autograd fallback's boxed call)
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return norm_bwd_op().call(dy2, dz2, zin, opt(weight), bias_grad ? opt(bias) : std::nullopt, mean, rstd, 0, 0.0,
                                a.rms, x.scalar_type(), residual_dtype);
    }();
    out[0] = as_shape(dx, x.sizes());
    if (residual.defined()) out[1] = share ? out[0] : as_shape(dres, residual.sizes());
    if (weight.defined()) out[2] = dw;
    if (bias_grad) out[3] = db;
    return out;
  }
};

// The forward of a call that records a graph: the kernel, then the node that outputs y (and z).
std::tuple<Tensor, Tensor> norm_forward_with_grad(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                                  const Tensor& bias, const NormArgs& a) {
  Tensor y, z, mean, rstd;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(y, z, mean, rstd) = norm_forward(x, residual, weight, bias, a);
  }
  auto node = c10::make_intrusive<NormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, residual, weight, bias));
  node->a = a;
  node->x_ = SavedVariable(x, false);
  node->residual_ = SavedVariable(residual, false);
  node->weight_ = SavedVariable(weight, false);
  node->bias_ = SavedVariable(bias, false);
  node->mean_ = SavedVariable(mean, false);
  node->rstd_ = SavedVariable(rstd, false);
  torch::autograd::set_history(y, node);
  if (a.prenorm) torch::autograd::set_history(z, node);
  node->zin_ = SavedVariable(a.keep_stream ? z : x, a.prenorm);  // z is then an output of the node
  return {y, z};
}

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
  if (!no_forward_grad({&x, &*residual, &*weight, &*bias})) return py::none();
  Tensor y, z;
  {
    py::gil_scoped_release no_gil;
    if (grad) {
      std::tie(y, z) = norm_forward_with_grad(x, *residual, *weight, *bias, a);
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

// The backward node of an attention call. Inputs (edges): q, k, v, mask (4-D; an invalid edge where
// absent or not requiring grad). Outputs: out, lse.
struct AttentionBackward : public Node {
  double scale = 0.0;
  bool causal = false, bottom_right = false;
  SavedVariable q_, k_, v_, mask_, out_, lse_;

  std::string name() const override { return "fusedlayers::AttentionBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* t : {&q_, &k_, &v_, &mask_, &out_, &lse_}) t->reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(std::string(name()));
    for (const SavedVariable* t : {&q_, &k_, &v_, &mask_}) args.collect(*t, false);
    args.collect(out_, true), args.collect(lse_, true);
    args.collect(scale), args.collect(causal), args.collect(bottom_right);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    for (SavedVariable* t : {&q_, &k_, &v_, &mask_, &out_, &lse_}) saved.before(*t);
    variable_list result = apply(variable_list(grads));
    for (SavedVariable* t : {&q_, &k_, &v_, &mask_, &out_, &lse_}) saved.after(*t);
    return result;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor q = q_.unpack(), k = k_.unpack(), v = v_.unpack(), mask = mask_.unpack();
    const Tensor out = out_.unpack(getptr()), lse = lse_.unpack(getptr());
    const Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const Tensor dlse = grads[1].defined() ? grads[1] : at::zeros_like(lse);
    variable_list result(4);
    if (at::GradMode::is_enabled()) {  // create_graph=True: the Python path's differentiable backward
      py::gil_scoped_acquire gil;
      static const auto* double_backward = new py::object(
          py::module_::import("fusedlayers.registration").attr("attention_double_backward"));
      const py::tuple needs = py::make_tuple(task_should_compute_output(0), task_should_compute_output(1),
                                             task_should_compute_output(2), task_should_compute_output(3));
      const py::tuple g = (*double_backward)(dout, dlse, q, k, v, mask.defined() ? py::cast(mask) : py::none(),
                                             py::none(), scale, causal, bottom_right, 0.0, "cpu", needs);
      for (size_t i = 0; i < 4; ++i) {
        if (!g[i].is_none()) result[i] = THPVariable_Unpack(g[i].ptr());
      }
      return result;
    }
    const bool bias_grad = mask.defined() && mask.is_floating_point() && task_should_compute_output(3);
    auto [dq, dk, dv, dbias] = [&] {
      // (grad mode is off: straight to the kernel, not through the autograd fallback's boxed call)
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return attn_bwd_op().call(dout, dlse, q, k, v, opt(mask), std::nullopt, std::nullopt, 0, 0, out, lse, 0, scale,
                                causal, bottom_right, 0.0, bias_grad, -1, -1, 0.0, std::nullopt, std::nullopt);
    }();
    result[0] = dq, result[1] = dk, result[2] = dv;
    if (bias_grad) result[3] = dbias;
    return result;
  }
};

// The forward of a call that records a graph: the kernel, then the node that outputs out and lse.
std::tuple<Tensor, Tensor> attention_forward_with_grad(const Tensor& q, const Tensor& k, const Tensor& v,
                                                       const Tensor& mask, double scale, bool causal,
                                                       bool bottom_right) {
  Tensor out, lse;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, lse) = attn_fwd_op().call(q, k, v, opt(mask), std::nullopt, std::nullopt, 0, 0, 0, scale, causal,
                                            bottom_right, 0.0, -1, -1, 0.0, std::nullopt, std::nullopt);
  }
  auto node = c10::make_intrusive<AttentionBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(q, k, v, mask));
  node->scale = scale, node->causal = causal, node->bottom_right = bottom_right;
  node->q_ = SavedVariable(q, false);
  node->k_ = SavedVariable(k, false);
  node->v_ = SavedVariable(v, false);
  node->mask_ = SavedVariable(mask, false);
  torch::autograd::set_history(out, node);
  torch::autograd::set_history(lse, node);
  node->out_ = SavedVariable(out, true);
  node->lse_ = SavedVariable(lse, true);
  return {out, lse};
}

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
  if (!no_forward_grad({&q, &k, &v, &mask})) return py::none();
  {
    py::gil_scoped_release no_gil;
    if (mask.defined() && mask.dim() < 4) {
      std::vector<int64_t> shape(4 - mask.dim(), 1);
      shape.insert(shape.end(), mask.sizes().begin(), mask.sizes().end());
      mask = mask.view(shape);  // a view: the bias gradient flows back through it
    }
    if (grad) {
      std::tie(out, lse) = attention_forward_with_grad(q, k, v, mask, scale, causal, bottom_right);
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
