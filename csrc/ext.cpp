// fusedlayers._C: entry point of the C++/CUDA extension: the op schemas and _ext_info.
//
// Built by setup.py (torch BuildExtension, g++ -O3 -fopenmp) into fusedlayers/_C*.so,
// together with every other csrc/**/*.cpp and, when CUDA is built, csrc/**/*.cu and
// csrc/**/*_cuda.cpp. Importing the module runs the static registrations below, and the
// ops are called as torch.ops.fusedlayers.<name>, which torch.compile traces without graph
// breaks. The module's Python functions (the eager fast path of the public ops) and its
// init function are in csrc/eager.cpp.
//
// All C++ op schemas are declared here, in one list; kernels register per dispatch key
// with TORCH_LIBRARY_IMPL next to their code (CUDA ones in the .cu files).
//
// Macros set by setup.py (describe what was built; see _ext_info):
//   FUSEDLAYERS_WITH_CUDA        1 when the CUDA sources are compiled in, else 0
//   FUSEDLAYERS_CUDA_ARCHS       "8.0"-style TORCH_CUDA_ARCH_LIST, when WITH_CUDA
//   FUSEDLAYERS_NO_CUDA_REASON   why CUDA was not built, when not WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#ifndef FUSEDLAYERS_WITH_CUDA
#define FUSEDLAYERS_WITH_CUDA 0
#endif
#ifndef FUSEDLAYERS_CUDA_ARCHS
#define FUSEDLAYERS_CUDA_ARCHS "unknown"
#endif
#ifndef FUSEDLAYERS_NO_CUDA_REASON
#define FUSEDLAYERS_NO_CUDA_REASON "unknown (built without setup.py)"
#endif

namespace fusedlayers {
namespace {

// What this binary contains, e.g. "cpu,cuda(archs=8.0)" or "cpu; cuda: nvcc not found".
std::string ext_info() {
#if FUSEDLAYERS_WITH_CUDA
  return "cpu,cuda(archs=" FUSEDLAYERS_CUDA_ARCHS ")";
#else
  return "cpu; cuda: " FUSEDLAYERS_NO_CUDA_REASON;
#endif
}

// Meta kernels: the output shapes and dtypes of the kernel ops, no data. Fake tensors run them
// when a trace reaches a kernel op directly, as compiled autograd does through the eager path's
// backward nodes (csrc/eager.cpp). They follow the device kernels' outputs (layer_norm_host.h,
// attention_host.h).
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor none_like(const at::Tensor& t) { return at::empty({0}, t.options()); }

Tensors4 norm_fwd_meta(const at::Tensor& x, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                       const std::optional<at::Tensor>&, int64_t, double, double, bool rms, bool keep_stream,
                       at::ScalarType stream_dtype) {
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t rows = x.size(0);
  return {at::empty(x.sizes(), x.options()), at::empty(keep_stream ? x.sizes() : at::IntArrayRef{0},
                                                       x.options().dtype(stream_dtype)),
          at::empty({rms ? 0 : rows}, f32), at::empty({rows}, f32)};
}

Tensors4 norm_bwd_meta(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor& zin,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor&, const at::Tensor&, int64_t, double, bool, at::ScalarType x_dtype,
                       std::optional<at::ScalarType> residual_dtype) {
  return {at::empty(zin.sizes(), zin.options().dtype(x_dtype)),
          residual_dtype ? at::empty(zin.sizes(), zin.options().dtype(*residual_dtype)) : none_like(zin),
          weight ? at::empty(weight->sizes(), weight->options()) : none_like(zin),
          bias ? at::empty(bias->sizes(), bias->options()) : none_like(zin)};
}

// out (B, Hq, Nq, Dv) / lse (B, Hq, Nq); varlen (cu_seqlens_q given): out (Tq, Hq, Dv) / lse (Hq, Tq).
std::tuple<at::Tensor, at::Tensor> attention_fwd_meta(
    const at::Tensor& q, const at::Tensor&, const at::Tensor& v, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double, bool,
    bool, double, int64_t, int64_t, double, const std::optional<at::Tensor>&, at::OptionalIntArrayRef) {
  const auto f32 = q.options().dtype(at::kFloat);
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = v.size(-1);
  if (cu_q) return {at::empty(out_shape, q.options()), at::empty({q.size(1), q.size(0)}, f32)};
  return {at::empty(out_shape, q.options()), at::empty({q.size(0), q.size(1), q.size(2)}, f32)};
}

Tensors4 attention_bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t,
                            const at::Tensor&, const at::Tensor&, int64_t, double, bool, bool, double, bool bias_grad,
                            int64_t, int64_t, double, const std::optional<at::Tensor>&, at::OptionalIntArrayRef) {
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options()),
          bias_grad && mask ? at::empty(mask->sizes(), mask->options()) : none_like(q)};
}

}  // namespace
}  // namespace fusedlayers

// TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY: the Python side defines ops in the same
// namespace. torch.library.custom_op("fusedlayers::...") uses a FRAGMENT library and would
// coexist with TORCH_LIBRARY in either import order (torch 2.14.1), but a Python
// torch.library.Library("fusedlayers", "DEF") created before this module is imported makes
// TORCH_LIBRARY throw during static initialisation, which aborts the interpreter (no
// Python exception to catch). As a fragment this module can be imported in any case.
TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  m.def("_ext_info() -> str");

  // Kernel ops, device-neutral names: CPU impls in csrc/{attention,layer_norm,cpu}/*_cpu.cpp,
  // CUDA impls of the same schemas in the .cu files. Called from the Python custom ops'
  // bodies (fusedlayers/csrc_backend.py); the fake and autograd registration are those of
  // the Python ops (fusedlayers/registration.py). Dense attention: q (B, Hq, Nq, D), k, v
  // (B, Hkv, Nk, D), cu_seqlens None; varlen: q (Tq, Hq, D), k, v (Tk, Hkv, D) with
  // cu_seqlens (B + 1,) int32. seed: the dropout seed (0 when dropout_p = 0). window_left /
  // window_right (-1 unbounded), softcap (0 off), alibi_slopes (float32 (Hq,) or (B, Hq)): the
  // score variants, served by the CPU kernels; the CUDA ones take the defaults only.
  // dropout_layout [row0, col0, rows, cols] (dense only, CPU kernels only): the call's keep-mask
  // is the block at (row0, col0) of a (B, Hq, rows, cols) call's (fusedlayers/registration.py).
  m.def("attention_fwd_kernel(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? cu_seqlens_q, "
        "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int seed, float scale, bool causal, "
        "bool bottom_right, float dropout_p, int window_left=-1, int window_right=-1, float softcap=0., "
        "Tensor? alibi_slopes=None, int[]? dropout_layout=None) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd_kernel(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor out, Tensor lse, "
        "int seed, float scale, bool causal, bool bottom_right, float dropout_p, bool bias_grad, int window_left=-1, "
        "int window_right=-1, float softcap=0., Tensor? alibi_slopes=None, int[]? dropout_layout=None) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  // x (M, N); z kept (in stream_dtype) when keep_stream, else empty.
  m.def("norm_fwd_kernel(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, int seed, float eps, "
        "float dropout_p, bool rms, bool keep_stream, ScalarType stream_dtype) "
        "-> (Tensor y, Tensor z, Tensor mean, Tensor rstd)");
  m.def("norm_bwd_kernel(Tensor dy, Tensor? dz, Tensor zin, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, int seed, float dropout_p, bool rms, ScalarType x_dtype, ScalarType? residual_dtype) "
        "-> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)");
  // Fills `keep` with the kernels' dropout keep-mask of `seed` (element index = flat index).
  m.def("dropout_keep_mask_kernel(Tensor(a!) keep, int seed, float p) -> ()");
  // Host unit tests of the shared tile math (csrc/common/).
  m.def("_philox4x32(Tensor counter_key) -> Tensor");
  m.def("_online_softmax_test(Tensor scores, int block) -> Tensor");
  m.def("_mean_var_test(Tensor x, int block) -> Tensor");
  // What the CPU kernels run on: SIMD level and GEMM provider (benchmarks state it).
  m.def("_cpu_kernels_info() -> str");
  // The cpu outputs' cache (csrc/cpu/output_cache.cpp): counters; a new limit (bytes) and reuse time (µs) when
  // >= 0.
  m.def("_cpu_output_cache(int new_limit=-1, int new_reuse_us=-1) -> int[]");
  // Bytes of shared memory per block the CUDA attention kernels of head dim `head_dim`
  // (max of D and Dv) need, forward or backward, whichever is more. Needs no GPU; its kernel is
  // registered only by a build with the CUDA part (csrc/attention/attention_op_cuda.cpp).
  m.def("_attention_cuda_smem(int head_dim) -> int");
}

// _ext_info has no tensor argument, so no backend key: CompositeExplicitAutograd serves
// every call.
TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  m.impl("_ext_info", &fusedlayers::ext_info);
}

TORCH_LIBRARY_IMPL(fusedlayers, Meta, m) {
  m.impl("norm_fwd_kernel", &fusedlayers::norm_fwd_meta);
  m.impl("norm_bwd_kernel", &fusedlayers::norm_bwd_meta);
  m.impl("attention_fwd_kernel", &fusedlayers::attention_fwd_meta);
  m.impl("attention_bwd_kernel", &fusedlayers::attention_bwd_meta);
}
