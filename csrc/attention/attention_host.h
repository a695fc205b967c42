// Host glue shared by the attention ops of both devices (attention_cpu.cpp, attention_op_cuda.cpp):
// the ops' argument lists (AttentionArgs, fwd_op, bwd_op), the shape checks, the layouts written
// into the backend's AttentionParams, the output and gradient allocations, and the bias-gradient
// buffer and reduction. What differs by device stays in the op files: which dtypes, head dims and
// grid sizes a device takes, where cu_seqlens must live, how a mask is converted, the bias-gradient
// buffer's shape, and the kernel call. Templates over the params type: cpu::AttentionParams and
// cuda::AttentionParams are AttentionParamsOf (common/params.h) with int64_t and int sizes.
// Semantics: fusedlayers/registration.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/op_utils.h"

namespace fusedlayers::attention_host {

// The arguments attention_fwd_kernel and attention_bwd_kernel both take (schemas in csrc/ext.cpp),
// q, k, v as the caller gave them.
struct AttentionArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::optional<at::Tensor>& mask;
  const std::optional<at::Tensor>& cu_q;
  const std::optional<at::Tensor>& cu_k;
  int64_t max_q, max_k, seed;
  double scale;
  bool causal, bottom_right;
  double dropout_p;
  int64_t window_left, window_right;
  double softcap;
  const std::optional<at::Tensor>& alibi;
  at::OptionalIntArrayRef dropout_layout;
};

// The arguments only attention_bwd_kernel takes.
struct AttentionBwdArgs {
  const at::Tensor& dout;
  const at::Tensor& dlse;
  const at::Tensor& out;
  const at::Tensor& lse;
  bool bias_grad;
};

// attention_fwd_kernel with its schema's argument list, served by Fwd(const AttentionArgs&) -> (out, lse).
template <auto Fwd>
std::tuple<at::Tensor, at::Tensor> fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                                          const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                          int64_t seed, double scale, bool causal, bool bottom_right, double dropout_p,
                                          int64_t window_left, int64_t window_right, double softcap,
                                          const std::optional<at::Tensor>& alibi,
                                          at::OptionalIntArrayRef dropout_layout) {
  return Fwd(AttentionArgs{q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right, dropout_p,
                           window_left, window_right, softcap, alibi, dropout_layout});
}

// attention_bwd_kernel with its schema's argument list, served by
// Bwd(const AttentionArgs&, const AttentionBwdArgs&) -> (dq, dk, dv, dbias).
template <auto Bwd>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, const at::Tensor& out, const at::Tensor& lse,
    int64_t seed, double scale, bool causal, bool bottom_right, double dropout_p, bool bias_grad, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi,
    at::OptionalIntArrayRef dropout_layout) {
  return Bwd(AttentionArgs{q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right, dropout_p,
                           window_left, window_right, softcap, alibi, dropout_layout},
             AttentionBwdArgs{dout, dlse, out, lse, bias_grad});
}

// Whether the kernels can read t through its strides (kernel_rows: t itself, else a contiguous copy). They read
// each row (dim row_dim; the others are free, stride 0 included) as a run of t.size(-1) elements
// and hand runs of rows to BLAS, whose leading dimension (the row stride) must be at least the row
// length and fit an int: so the last dim must be contiguous and the rows must neither repeat nor
// overlap (expand / unfold / as_strided along the rows give a copy). A dim of size 1 counts as
// contiguous, as in torch; set_qkv then reports a leading dimension of the row length for it.
inline bool kernel_reads(const at::Tensor& t, int64_t row_dim) {
  if (t.dim() == 0 || t.numel() == 0) return false;
  const int64_t n = t.size(-1);
  const bool last_ok = t.stride(-1) == 1 || n == 1;
  const int64_t rs = t.stride(row_dim);
  const bool rows_ok = t.size(row_dim) == 1 || (rs >= n && rs <= INT32_MAX);
  return last_ok && rows_ok;
}

inline at::Tensor kernel_rows(const at::Tensor& t, int64_t row_dim) {
  return kernel_reads(t, row_dim) ? t : t.contiguous();
}

// The row stride the kernels use for dim d of t (see kernel_rows): its stride, or the row length
// where the dim has one row and its stride is never stepped (any value is legal in torch there).
inline int64_t row_stride(const at::Tensor& t, int64_t d) {
  return t.size(d) == 1 ? std::max<int64_t>(t.size(-1), 1) : t.stride(d);
}

// q, k, v (dense (B, H, N, D): rows on dim 2; varlen (T, H, D): rows on dim 0) through kernel_rows;
// other ranks pass unchanged, for set_qkv to refuse.
inline at::Tensor qkv_rows(const at::Tensor& t) {
  return t.dim() == 4 ? kernel_rows(t, 2) : t.dim() == 3 ? kernel_rows(t, 0) : t;
}

// Stride of dim d of the mask, 0 where it broadcasts (size 1).
inline int64_t bstride(const at::Tensor& m, int64_t d) { return m.size(d) == 1 ? 0 : m.stride(d); }

// Shapes, head counts, q / k / v pointers and strides, and the dropout index layout. Dense:
// (B, H, N, D). Varlen (cu_q, cu_k given, int32 offsets where the kernels read them): packed
// (T, H, D), max_q / max_k the longest sequences; the dropout index runs over (Hq, Tq, Tk).
template <class Params>
void set_qkv(Params& p, const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor* cu_q, const at::Tensor* cu_k, int64_t max_q, int64_t max_k) {
  using Int = decltype(p.batch);
  const bool varlen = cu_q != nullptr;
  TORCH_CHECK(varlen == (cu_k != nullptr), "fusedlayers::", op, ": give both cu_seqlens_q and cu_seqlens_k or neither");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "fusedlayers::", op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4) && k.dim() == q.dim() && v.dim() == q.dim(), "fusedlayers::", op,
              ": q, k, v must be ", varlen ? "3-D (T, H, D)" : "4-D (B, H, N, D)", ", got q ", q.sizes(), " k ",
              k.sizes(), " v ", v.sizes());
  p.heads_q = static_cast<Int>(q.size(1));  // the head dim of (B, H, N, D) and of (T, H, D)
  p.heads_kv = static_cast<Int>(k.size(1));
  p.head_dim = static_cast<Int>(q.size(-1));
  p.head_dim_v = static_cast<Int>(v.size(-1));
  TORCH_CHECK(k.size(-1) == p.head_dim && p.heads_kv > 0 && p.heads_q % p.heads_kv == 0 && v.size(1) == p.heads_kv,
              "fusedlayers::", op, ": bad shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(),
              " (need Hq % Hkv == 0 and k, v with Hkv heads)");
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  if (varlen) {  // rows are tokens, no batch stride
    TORCH_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 2, "fusedlayers::", op,
                ": cu_seqlens_q and cu_seqlens_k must hold B + 1 >= 2 offsets each");
    p.batch = static_cast<Int>(cu_q->numel() - 1);
    p.seqlen_q = static_cast<Int>(max_q);
    p.seqlen_k = static_cast<Int>(max_k);
    p.cu_seqlens_q = cu_q->const_data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k->const_data_ptr<int32_t>();
    p.q_bs = p.k_bs = p.v_bs = 0;
    p.q_hs = q.stride(1), p.q_rs = row_stride(q, 0);
    p.k_hs = k.stride(1), p.k_rs = row_stride(k, 0);
    p.v_hs = v.stride(1), p.v_rs = row_stride(v, 0);
    const int64_t tq = q.size(0), tk = k.size(0);
    p.drop_bs = 0, p.drop_hs = tq * tk, p.drop_rs = tk;
  } else {
    p.batch = static_cast<Int>(q.size(0));
    p.seqlen_q = static_cast<Int>(q.size(2));
    p.seqlen_k = static_cast<Int>(k.size(2));
    TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch && v.size(2) == p.seqlen_k, "fusedlayers::", op,
                ": bad shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
    p.q_bs = q.stride(0), p.q_hs = q.stride(1), p.q_rs = row_stride(q, 2);
    p.k_bs = k.stride(0), p.k_hs = k.stride(1), p.k_rs = row_stride(k, 2);
    p.v_bs = v.stride(0), p.v_hs = v.stride(1), p.v_rs = row_stride(v, 2);
    const int64_t nq = p.seqlen_q, nk = p.seqlen_k;
    p.drop_bs = p.heads_q * nq * nk, p.drop_hs = nq * nk, p.drop_rs = nk;  // (B, Hq, Nq, Nk)
  }
}

// The dropout layout [row0, col0, rows, cols] of a dense call (see fusedlayers.registration):
// mask element (b, h, i, j) of this call is element (b, h, row0 + i, col0 + j) of the keep-mask
// of a (B, Hq, rows, cols) call, so a block of a larger problem draws the larger problem's mask.
// None leaves set_qkv's own (B, Hq, Nq, Nk) layout. Call after set_qkv.
template <class Params>
void set_dropout_layout(Params& p, const char* op, at::OptionalIntArrayRef layout) {
  if (!layout.has_value()) return;
  TORCH_CHECK(p.cu_seqlens_q == nullptr, "fusedlayers::", op, ": dropout_layout is not supported with cu_seqlens");
  const at::IntArrayRef l = *layout;
  TORCH_CHECK(l.size() == 4, "fusedlayers::", op, ": dropout_layout must be [row0, col0, rows, cols], got ", l);
  const int64_t row0 = l[0], col0 = l[1], rows = l[2], cols = l[3];
  const int64_t nq = p.seqlen_q, nk = p.seqlen_k;
  TORCH_CHECK(row0 >= 0 && col0 >= 0 && row0 + nq <= rows && col0 + nk <= cols, "fusedlayers::", op,
              ": dropout_layout ", l, " must hold the call's (Nq, Nk) = (", nq, ", ", nk,
              ") rows and cols: 0 <= row0, row0 + Nq <= rows, 0 <= col0, col0 + Nk <= cols");
  p.drop_bs = p.heads_q * rows * cols, p.drop_hs = rows * cols, p.drop_rs = cols;  // (B, Hq, rows, cols)
  p.drop_offset = row0 * cols + col0;
}

// Pointer and broadcast strides of attn_mask `m` (dense calls only; p.mask_kind is the caller's,
// which knows the dtypes its kernels read). Call after set_qkv.
template <class Params>
void set_mask(Params& p, const char* op, const at::Tensor& m) {
  TORCH_CHECK(p.cu_seqlens_q == nullptr, "fusedlayers::", op, ": attn_mask is not supported with cu_seqlens");
  TORCH_CHECK(m.dim() == 4, "fusedlayers::", op, ": attn_mask must be 4-D, got ", m.sizes());
  const int64_t full[4] = {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k};
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(m.size(d) == 1 || m.size(d) == full[d], "fusedlayers::", op, ": attn_mask of shape ", m.sizes(),
                " does not broadcast to (B, Hq, Nq, Nk)");
  }
  p.mask = m.const_data_ptr();
  p.m_bs = bstride(m, 0), p.m_hs = bstride(m, 1), p.m_qs = bstride(m, 2), p.m_ks = bstride(m, 3);
}

template <class Params>
void set_scalars(Params& p, const char* op, double scale, bool causal, bool bottom_right, double dropout_p,
                 int64_t seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.bottom_right = bottom_right;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
}

// The score variants (sliding window, softcap, ALiBi slopes float32 (Hq,) or (B, Hq), B the
// batch or, varlen, the sequence count), checked and set in p. The slopes' device is the caller's
// to check. Call after set_qkv.
template <class Params>
void set_variants(Params& p, const char* op, int64_t window_left, int64_t window_right, double softcap,
                  const std::optional<at::Tensor>& alibi) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fusedlayers::", op,
              ": window_left and window_right must be >= 0, or -1 for an unbounded side, got ", window_left, " and ",
              window_right);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "fusedlayers::", op,
              ": softcap must be a finite float >= 0 (0 = off), got ", softcap);
  // A side of 2^32 or more reaches every key (sequences hold < 2^31 tokens): unbounded, which keeps the
  // kernels' position arithmetic (row + shift + right + 1) far from int64 overflow.
  constexpr int64_t kUnbounded = int64_t{1} << 32;
  p.window_left = window_left >= kUnbounded ? -1 : window_left;
  p.window_right = window_right >= kUnbounded ? -1 : window_right;
  p.softcap = static_cast<float>(softcap);
  if (alibi.has_value()) {
    const at::Tensor& a = *alibi;
    const int64_t hq = p.heads_q, batch = p.batch;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "fusedlayers::", op, ": alibi_slopes must be float32, got ",
                a.scalar_type());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == hq) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == hq),
                "fusedlayers::", op, ": alibi_slopes must have shape (", hq, ",) or (", batch, ", ", hq, "), got ",
                a.sizes());
    p.alibi = a.const_data_ptr<float>();
    p.alibi_bs = a.dim() == 2 ? a.stride(0) : 0;
    p.alibi_hs = a.stride(-1);
  }
}

// out / lse (and dout / dlse) layout: dense (B, Hq, Nq, Dv) / (B, Hq, Nq); varlen (Tq, Hq, Dv) / (Hq, Tq).
template <class Params>
void set_out_layout(Params& p, int64_t rows_q) {
  const int64_t hq = p.heads_q, dv = p.head_dim_v;
  if (p.cu_seqlens_q != nullptr) {
    p.o_bs = 0, p.o_hs = dv, p.o_rs = hq * dv;
    p.lse_bs = 0, p.lse_hs = rows_q;
  } else {
    p.o_bs = hq * p.seqlen_q * dv, p.o_hs = p.seqlen_q * dv, p.o_rs = dv;
    p.lse_bs = hq * p.seqlen_q, p.lse_hs = p.seqlen_q;
  }
}

// The forward's out (q's dtype, Dv columns) and lse (float32), new (from `empty`) and contiguous,
// set in p.
template <class Params>
std::tuple<at::Tensor, at::Tensor> alloc_out(Params& p, const at::Tensor& q, EmptyFn empty) {
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.head_dim_v;
  at::Tensor out = empty(out_shape, q.options());
  at::Tensor lse = p.cu_seqlens_q != nullptr
                       ? empty({static_cast<int64_t>(p.heads_q), q.size(0)}, q.options().dtype(at::kFloat))
                       : empty({static_cast<int64_t>(p.batch), static_cast<int64_t>(p.heads_q),
                                static_cast<int64_t>(p.seqlen_q)},
                               q.options().dtype(at::kFloat));
  set_out_layout(p, q.size(0));
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  return {out, lse};
}

// The backward's saved out / lse and incoming dout / dlse, made contiguous (out, dout in q's
// dtype; lse, dlse float32), checked against each other and set in p (out, dout, lse).
template <class Params>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_inputs(Params& p, const char* op, const at::Tensor& q,
                                                                      const at::Tensor& out_in,
                                                                      const at::Tensor& dout_in,
                                                                      const at::Tensor& lse_in,
                                                                      const at::Tensor& dlse_in) {
  at::Tensor out = out_in.contiguous().to(q.scalar_type());
  at::Tensor dout = dout_in.contiguous().to(q.scalar_type());
  at::Tensor lse = lse_in.contiguous().to(at::kFloat);
  at::Tensor dlse = dlse_in.contiguous().to(at::kFloat);
  TORCH_CHECK(out.sizes() == dout.sizes() && lse.sizes() == dlse.sizes(), "fusedlayers::", op, ": out ",
              out.sizes(), " / dout ", dout.sizes(), " or lse ", lse.sizes(), " / dlse ", dlse.sizes(),
              " shapes differ");
  const int64_t hq = p.heads_q, dv = p.head_dim_v;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const std::vector<int64_t> want_out =
      varlen ? std::vector<int64_t>{q.size(0), hq, dv} : std::vector<int64_t>{q.size(0), hq, q.size(2), dv};
  const std::vector<int64_t> want_lse =
      varlen ? std::vector<int64_t>{hq, q.size(0)} : std::vector<int64_t>{q.size(0), hq, q.size(2)};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(want_out) && lse.sizes() == at::IntArrayRef(want_lse), "fusedlayers::",
              op, ": out / dout must have shape ", at::IntArrayRef(want_out), " and lse / dlse ",
              at::IntArrayRef(want_lse), ", got ", out.sizes(), " and ", lse.sizes());
  set_out_layout(p, q.size(0));
  p.out = const_cast<void*>(out.const_data_ptr());
  p.dout = dout.const_data_ptr();
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  return {out, dout, lse, dlse};
}

// dq, dk, dv: new (from `empty`) contiguous tensors shaped and typed as q, k, v, with their strides set in p.
template <class Params>
std::tuple<at::Tensor, at::Tensor, at::Tensor> alloc_grads(Params& p, const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, EmptyFn empty) {
  at::Tensor dq = empty(q.sizes(), q.options());
  at::Tensor dk = empty(k.sizes(), k.options());
  at::Tensor dv = empty(v.sizes(), v.options());
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t r = varlen ? 0 : 2;  // the row dim
  p.dq = dq.mutable_data_ptr(), p.dk = dk.mutable_data_ptr(), p.dv = dv.mutable_data_ptr();
  p.dq_bs = varlen ? 0 : dq.stride(0), p.dq_hs = dq.stride(1), p.dq_rs = dq.stride(r);
  p.dk_bs = varlen ? 0 : dk.stride(0), p.dk_hs = dk.stride(1), p.dk_rs = dk.stride(r);
  p.dv_bs = varlen ? 0 : dv.stride(0), p.dv_hs = dv.stride(1), p.dv_rs = dv.stride(r);
  return {dq, dk, dv};
}

// The float32 buffer the kernels write dS into when bias_grad asks for the gradient of a bias
// (attn_mask must then be a float tensor), zeroed, set in p: (B, Hq, rows, cols) with (rows, cols)
// the mask's own q / k dims when mask_qk (kernels that add the elements of a broadcast dim into
// one), else (Nq, Nk) (kernels that write each element once); a dim of size 1 is indexed with
// stride 0. Undefined when !bias_grad. Call after set_qkv.
template <class Params>
at::Tensor alloc_bias_grad(Params& p, const char* op, bool bias_grad, const std::optional<at::Tensor>& mask,
                           const at::Tensor& q, bool mask_qk) {
  if (!bias_grad) return at::Tensor();
  TORCH_CHECK(mask.has_value() && mask->is_floating_point(), "fusedlayers::", op, ": bias_grad needs a float attn_mask");
  const int64_t batch = p.batch, hq = p.heads_q;
  const int64_t rows = mask_qk ? mask->size(2) : p.seqlen_q, cols = mask_qk ? mask->size(3) : p.seqlen_k;
  at::Tensor acc = at::zeros({batch, hq, rows, cols}, q.options().dtype(at::kFloat));
  p.dbias = acc.mutable_data_ptr<float>();
  p.db_bs = hq * rows * cols, p.db_hs = rows * cols, p.db_qs = rows == 1 ? 0 : cols, p.db_ks = cols == 1 ? 0 : 1;
  return acc;
}

// The op's dbias output: the bias gradient in the mask's shape and dtype, the buffer `acc` of
// alloc_bias_grad (each dim full or already of the mask's size) summed over the dims the mask
// broadcasts; an empty tensor (q's options) when acc is undefined (no bias_grad).
inline at::Tensor reduce_bias_grad(const at::Tensor& acc, const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!acc.defined()) return at::empty({0}, q.options());
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < 4; ++d) {
    if (mask->size(d) == 1 && acc.size(d) != 1) dims.push_back(d);
  }
  const at::Tensor summed = dims.empty() ? acc : at::sum(acc, dims, /*keepdim=*/true);
  return summed.to(mask->scalar_type()).contiguous();
}

}  // namespace fusedlayers::attention_host
