// CPU implementations of the attention kernel ops (schemas in csrc/ext.cpp):
//   attention_fwd_kernel  (dense (B, H, N, D) or varlen (T, H, D) with cu_seqlens) -> out, lse
//   attention_bwd_kernel  -> dq, dk, dv, dbias (mask's shape, or empty)
// This file checks the tensors, allocates the outputs (new contiguous tensors), fills
// cpu::AttentionParams and calls the kernel of the machine's SIMD level
// (attention_cpu_kernel.h, compiled per level by csrc/cpu/kernels_*.cpp).
// Python adapter: fusedlayers/csrc_backend.py. Semantics: fusedlayers/registration.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/ops_common.h"

namespace fusedlayers::cpu {
namespace {

constexpr const char* kFwd = "attention_fwd_kernel";
constexpr const char* kBwd = "attention_bwd_kernel";

// Stride of dim d of the mask, 0 where it broadcasts (size 1).
int64_t bstride(const at::Tensor& m, int64_t d) { return m.size(d) == 1 ? 0 : m.stride(d); }

// Everything but the outputs: shapes, input pointers and strides, mask, dropout indexing.
AttentionParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                            const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, int64_t seed,
                            double scale, bool causal, bool bottom_right, double dropout_p) {
  for (auto* t : {&q, &k, &v}) check_cpu(*t, op, "q, k, v");
  AttentionParams p{};
  p.dtype = dtype_of(q, op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "fusedlayers::", op,
              ": q, k, v must share one dtype");
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(varlen == cu_k.has_value(), "fusedlayers::", op, ": give both cu_seqlens or neither");
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4) && k.dim() == q.dim() && v.dim() == q.dim(), "fusedlayers::", op,
              ": q, k, v must be ", varlen ? "3-D (T, H, D)" : "4-D (B, H, N, D)");
  const int64_t hd = 1;  // the head dim of (B, H, N, D) and of (T, H, D)
  p.heads_q = q.size(hd);
  p.heads_kv = k.size(hd);
  p.head_dim = q.size(-1);
  p.head_dim_v = v.size(-1);
  TORCH_CHECK(k.size(-1) == p.head_dim && p.heads_kv > 0 && p.heads_q % p.heads_kv == 0 && v.size(hd) == p.heads_kv,
              "fusedlayers::", op, ": bad shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  if (varlen) {  // (T, H, D): no batch stride, rows are tokens
    for (auto* cu : {&*cu_q, &*cu_k}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->device().is_cpu(),
                  "fusedlayers::", op, ": cu_seqlens must be contiguous 1-D int32 CPU tensors");
    }
    TORCH_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 2, "fusedlayers::", op,
                ": cu_seqlens_q and cu_seqlens_k must hold B + 1 >= 2 offsets each");
    p.batch = cu_q->numel() - 1;
    p.seqlen_q = max_q;
    p.seqlen_k = max_k;
    p.cu_seqlens_q = cu_q->const_data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k->const_data_ptr<int32_t>();
    p.q_bs = p.k_bs = p.v_bs = 0;
    p.q_hs = q.stride(1), p.q_rs = q.stride(0);
    p.k_hs = k.stride(1), p.k_rs = k.stride(0);
    p.v_hs = v.stride(1), p.v_rs = v.stride(0);
    const int64_t tq = q.size(0), tk = k.size(0);
    p.drop_bs = 0, p.drop_hs = tq * tk, p.drop_rs = tk;  // keep-mask (Hq, Tq, Tk)
  } else {
    p.batch = q.size(0);
    p.seqlen_q = q.size(2);
    p.seqlen_k = k.size(2);
    TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch && v.size(2) == p.seqlen_k, "fusedlayers::", op,
                ": bad shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
    p.q_bs = q.stride(0), p.q_hs = q.stride(1), p.q_rs = q.stride(2);
    p.k_bs = k.stride(0), p.k_hs = k.stride(1), p.k_rs = k.stride(2);
    p.v_bs = v.stride(0), p.v_hs = v.stride(1), p.v_rs = v.stride(2);
    const int64_t nq = p.seqlen_q, nk = p.seqlen_k;
    p.drop_bs = p.heads_q * nq * nk, p.drop_hs = nq * nk, p.drop_rs = nk;  // keep-mask (B, Hq, Nq, Nk)
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(!varlen, "fusedlayers::", op, ": attn_mask is not supported with cu_seqlens");
    check_cpu(m, op, "attn_mask");
    TORCH_CHECK(m.dim() == 4, "fusedlayers::", op, ": attn_mask must be 4-D, got ", m.sizes());
    const int64_t full[4] = {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(m.size(d) == 1 || m.size(d) == full[d], "fusedlayers::", op, ": attn_mask of shape ", m.sizes(),
                  " does not broadcast to (B, Hq, Nq, Nk)");
    }
    if (m.scalar_type() == at::kBool) {
      p.mask_kind = 1;
    } else if (m.scalar_type() == at::kFloat) {
      p.mask_kind = 2;
    } else {
      TORCH_CHECK(m.scalar_type() == q.scalar_type(), "fusedlayers::", op,
                  ": attn_mask must be bool, float32 or q's dtype, got ", m.scalar_type());
      p.mask_kind = 3;
    }
    p.mask = m.const_data_ptr();
    p.m_bs = bstride(m, 0), p.m_hs = bstride(m, 1), p.m_qs = bstride(m, 2), p.m_ks = bstride(m, 3);
  }
  // Tiles: large ones keep the GEMMs efficient (256 x 512 measured best on a 2-core AVX-512
  // machine, ~10% over 64 x 256); the query block shrinks while the forward would have
  // fewer than 4 tasks per thread.
  p.block_k = 512;
  p.block_q = 256;
  const int64_t threads = at::get_num_threads();
  while (p.block_q > 32 && p.batch * p.heads_q * ((p.seqlen_q + p.block_q - 1) / p.block_q) < 4 * threads) {
    p.block_q /= 2;
  }
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.bottom_right = bottom_right;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", op, ": dropout_p must be in [0, 1)");
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  return p;
}

// out / lse (and dout / dlse) layout: dense (B, Hq, Nq, Dv) / (B, Hq, Nq); varlen (Tq, Hq, Dv) / (Hq, Tq).
void set_out_layout(AttentionParams& p, bool varlen, int64_t rows_q) {
  const int64_t hq = p.heads_q, dv = p.head_dim_v;
  if (varlen) {
    p.o_bs = 0, p.o_hs = dv, p.o_rs = hq * dv;
    p.lse_bs = 0, p.lse_hs = rows_q;
  } else {
    p.o_bs = hq * p.seqlen_q * dv, p.o_hs = p.seqlen_q * dv, p.o_rs = dv;
    p.lse_bs = hq * p.seqlen_q, p.lse_hs = p.seqlen_q;
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& cu_q,
                                                     const std::optional<at::Tensor>& cu_k, int64_t max_q,
                                                     int64_t max_k, int64_t seed, double scale, bool causal,
                                                     bool bottom_right, double dropout_p) {
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  AttentionParams p = make_params(kFwd, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right,
                                  dropout_p);
  const bool varlen = cu_q.has_value();
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.head_dim_v;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = varlen ? at::empty({p.heads_q, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({p.batch, p.heads_q, p.seqlen_q}, q.options().dtype(at::kFloat));
  set_out_layout(p, varlen, q.size(0));
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  kernels().attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& dlse_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t seed, double scale, bool causal, bool bottom_right, double dropout_p,
    bool bias_grad) {
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  AttentionParams p = make_params(kBwd, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right,
                                  dropout_p);
  const bool varlen = cu_q.has_value();
  const at::Tensor out = out_in.contiguous().to(q.scalar_type());
  const at::Tensor dout = dout_in.contiguous().to(q.scalar_type());
  const at::Tensor lse = lse_in.contiguous().to(at::kFloat);
  const at::Tensor dlse = dlse_in.contiguous().to(at::kFloat);
  TORCH_CHECK(out.sizes() == dout.sizes() && lse.sizes() == dlse.sizes(), "fusedlayers::", kBwd,
              ": out / dout or lse / dlse shapes differ");
  set_out_layout(p, varlen, q.size(0));
  p.out = const_cast<void*>(out.const_data_ptr());
  p.dout = dout.const_data_ptr();
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.dlse = dlse.const_data_ptr<float>();

  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const int64_t r = varlen ? 0 : 2;  // row dim
  p.dq = dq.mutable_data_ptr(), p.dk = dk.mutable_data_ptr(), p.dv = dv.mutable_data_ptr();
  p.dq_bs = varlen ? 0 : dq.stride(0), p.dq_hs = dq.stride(1), p.dq_rs = dq.stride(r);
  p.dk_bs = varlen ? 0 : dk.stride(0), p.dk_hs = dk.stride(1), p.dk_rs = dk.stride(r);
  p.dv_bs = varlen ? 0 : dv.stride(0), p.dv_hs = dv.stride(1), p.dv_rs = dv.stride(r);

  at::Tensor dbias_acc;
  if (bias_grad) {
    TORCH_CHECK(mask.has_value() && mask->is_floating_point(), "fusedlayers::", kBwd,
                ": bias_grad needs a float attn_mask");
    // float32 accumulator with full B and Hq dims (each task owns its (b, h) slice) and
    // the mask's own q / k dims (broadcast ones summed in place)
    const int64_t mq = mask->size(2), mk = mask->size(3);
    dbias_acc = at::zeros({p.batch, p.heads_q, mq, mk}, q.options().dtype(at::kFloat));
    p.dbias = dbias_acc.mutable_data_ptr<float>();
    p.db_bs = p.heads_q * mq * mk, p.db_hs = mq * mk, p.db_qs = mq == 1 ? 0 : mk, p.db_ks = mk == 1 ? 0 : 1;
  }
  kernels().attention_bwd(p);

  at::Tensor dbias;
  if (bias_grad) {
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < 2; ++d) {
      if (mask->size(d) == 1 && dbias_acc.size(d) != 1) dims.push_back(d);
    }
    dbias = dims.empty() ? dbias_acc : at::sum(dbias_acc, dims, /*keepdim=*/true);
    dbias = dbias.to(mask->scalar_type()).contiguous();
  } else {
    dbias = at::empty({0}, q.options());
  }
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("attention_fwd_kernel", &fusedlayers::cpu::attention_fwd_cpu);
  m.impl("attention_bwd_kernel", &fusedlayers::cpu::attention_bwd_cpu);
}
