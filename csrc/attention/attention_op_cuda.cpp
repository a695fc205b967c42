// CUDA implementations of the attention kernel ops (schemas in csrc/ext.cpp, the same as
// the CPU ones in attention_cpu.cpp):
//   attention_fwd_kernel  (dense (B, H, N, D) or varlen (T, H, D) with cu_seqlens) -> out, lse
//   attention_bwd_kernel  -> dq, dk, dv, dbias (mask's shape, or empty)
// Checks the tensors, allocates the outputs (new contiguous tensors), fills
// cuda::AttentionParams and calls the launchers of attention_{fwd,bwd}_cuda.cu. Host code
// only (g++): includes c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h.
// fp16 / bf16 only: the kernels are tensor-core kernels; fusedlayers/cuda_backend.py
// refuses float32 calls before they get here, with the reason.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention/attention_cuda.h"

namespace fusedlayers::cuda {
namespace {

constexpr const char* kFwd = "attention_fwd_kernel";
constexpr const char* kBwd = "attention_bwd_kernel";
constexpr int64_t kMaxGrid = 65535;  // gridDim.y / gridDim.z limit (heads, batch)

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1) ? t : t.contiguous();
}

// Stride of dim d of the mask, 0 where it broadcasts (size 1).
int64_t bstride(const at::Tensor& m, int64_t d) { return m.size(d) == 1 ? 0 : m.stride(d); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fusedlayers::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fusedlayers::", op, ": ", name, " is on ", t.device(), ", q on ",
              like.device());
}

// Everything but the outputs: shapes, input pointers and strides, mask, dropout indexing.
// `keep` holds the tensors the params point into that were made here (contiguous copies,
// converted masks, device copies of cu_seqlens).
AttentionParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                            const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, int64_t seed,
                            double scale, bool causal, bool bottom_right, double dropout_p,
                            std::vector<at::Tensor>& keep) {
  check_device(q, q, op, "q");
  check_device(k, q, op, "k");
  check_device(v, q, op, "v");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "fusedlayers::", op,
              ": the cuda backend takes float16 or bfloat16 q, k, v (tensor-core kernels), got ", q.scalar_type(),
              "; use backend='triton' for float32");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "fusedlayers::", op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  AttentionParams p{};
  p.bf16 = q.scalar_type() == at::kBFloat16;
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(varlen == cu_k.has_value(), "fusedlayers::", op, ": give both cu_seqlens_q and cu_seqlens_k or neither");
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4) && k.dim() == q.dim() && v.dim() == q.dim(), "fusedlayers::", op,
              ": q, k, v must be ", varlen ? "3-D (T, H, D)" : "4-D (B, H, N, D)", ", got q ", q.sizes(), " k ",
              k.sizes(), " v ", v.sizes());
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(q.size(-1));
  p.head_dim_v = static_cast<int>(v.size(-1));
  TORCH_CHECK(k.size(-1) == p.head_dim && p.heads_kv > 0 && p.heads_q % p.heads_kv == 0 && v.size(1) == p.heads_kv,
              "fusedlayers::", op, ": bad shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(),
              " (need Hq % Hkv == 0 and k, v with Hkv heads)");
  TORCH_CHECK(p.head_dim >= 1 && p.head_dim <= 256 && p.head_dim_v >= 1 && p.head_dim_v <= 256, "fusedlayers::", op,
              ": head dims must be in 1..256 on the cuda backend, got D=", p.head_dim, " Dv=", p.head_dim_v);
  TORCH_CHECK(p.heads_q <= kMaxGrid, "fusedlayers::", op, ": at most ", kMaxGrid, " heads, got ", p.heads_q);
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  if (varlen) {  // (T, H, D): no batch stride, rows are tokens
    at::Tensor cq = *cu_q, ck = *cu_k;
    for (auto* cu : {&cq, &ck}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1, "fusedlayers::", op,
                  ": cu_seqlens must be 1-D int32 tensors, got ", cu->scalar_type(), " ", cu->sizes());
      *cu = cu->to(q.device()).contiguous();  // the kernels read the offsets on the device
      keep.push_back(*cu);
    }
    TORCH_CHECK(cq.numel() == ck.numel() && cq.numel() >= 2, "fusedlayers::", op,
                ": cu_seqlens_q and cu_seqlens_k must hold B + 1 >= 2 offsets each");
    p.batch = static_cast<int>(cq.numel() - 1);
    p.seqlen_q = static_cast<int>(max_q);
    p.seqlen_k = static_cast<int>(max_k);
    p.cu_seqlens_q = cq.const_data_ptr<int32_t>();
    p.cu_seqlens_k = ck.const_data_ptr<int32_t>();
    p.q_bs = p.k_bs = p.v_bs = 0;
    p.q_hs = q.stride(1), p.q_rs = q.stride(0);
    p.k_hs = k.stride(1), p.k_rs = k.stride(0);
    p.v_hs = v.stride(1), p.v_rs = v.stride(0);
    const int64_t tq = q.size(0), tk = k.size(0);
    p.drop_bs = 0, p.drop_hs = tq * tk, p.drop_rs = tk;  // keep-mask (Hq, Tq, Tk), as the cpu backend
  } else {
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(2));
    p.seqlen_k = static_cast<int>(k.size(2));
    TORCH_CHECK(k.size(0) == p.batch && v.size(0) == p.batch && v.size(2) == p.seqlen_k, "fusedlayers::", op,
                ": bad shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
    p.q_bs = q.stride(0), p.q_hs = q.stride(1), p.q_rs = q.stride(2);
    p.k_bs = k.stride(0), p.k_hs = k.stride(1), p.k_rs = k.stride(2);
    p.v_bs = v.stride(0), p.v_hs = v.stride(1), p.v_rs = v.stride(2);
    const int64_t nq = p.seqlen_q, nk = p.seqlen_k;
    p.drop_bs = p.heads_q * nq * nk, p.drop_hs = nq * nk, p.drop_rs = nk;  // keep-mask (B, Hq, Nq, Nk)
  }
  TORCH_CHECK(p.batch <= kMaxGrid, "fusedlayers::", op, ": at most ", kMaxGrid, " sequences, got ", p.batch);
  p.aligned = p.head_dim % 8 == 0 && p.head_dim_v % 8 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
  for (int64_t s : {p.q_bs, p.q_hs, p.q_rs, p.k_bs, p.k_hs, p.k_rs, p.v_bs, p.v_hs, p.v_rs}) {
    p.aligned = p.aligned && s % 8 == 0;
  }
  if (mask.has_value()) {
    at::Tensor m = *mask;
    TORCH_CHECK(!varlen, "fusedlayers::", op, ": attn_mask is not supported with cu_seqlens");
    check_device(m, q, op, "attn_mask");
    TORCH_CHECK(m.dim() == 4, "fusedlayers::", op, ": attn_mask must be 4-D, got ", m.sizes());
    const int64_t full[4] = {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(m.size(d) == 1 || m.size(d) == full[d], "fusedlayers::", op, ": attn_mask of shape ", m.sizes(),
                  " does not broadcast to (B, Hq, Nq, Nk)");
    }
    if (m.scalar_type() == at::kBool) {
      p.mask_kind = 1;
    } else if (m.scalar_type() == q.scalar_type()) {
      p.mask_kind = 3;
    } else {
      TORCH_CHECK(m.is_floating_point(), "fusedlayers::", op, ": attn_mask must be bool or floating, got ",
                  m.scalar_type());
      m = m.to(at::kFloat);  // float32 bias (a copy unless it already is float32)
      keep.push_back(m);
      p.mask_kind = 2;
    }
    p.mask = m.const_data_ptr();
    p.m_bs = bstride(m, 0), p.m_hs = bstride(m, 1), p.m_qs = bstride(m, 2), p.m_ks = bstride(m, 3);
  }
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.bottom_right = bottom_right;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fusedlayers::", op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  return p;
}

// out / lse (and dout) layout: dense (B, Hq, Nq, Dv) / (B, Hq, Nq); varlen (Tq, Hq, Dv) / (Hq, Tq).
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

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                                      const std::optional<at::Tensor>& cu_q,
                                                      const std::optional<at::Tensor>& cu_k, int64_t max_q,
                                                      int64_t max_k, int64_t seed, double scale, bool causal,
                                                      bool bottom_right, double dropout_p) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(kFwd, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right,
                                  dropout_p, keep);
  const bool varlen = cu_q.has_value();
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.head_dim_v;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = varlen ? at::empty({p.heads_q, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({p.batch, p.heads_q, p.seqlen_q}, q.options().dtype(at::kFloat));
  set_out_layout(p, varlen, q.size(0));
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  if (out.numel() > 0) attention_fwd_launch(p, stream_of(q));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& dlse_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t seed, double scale, bool causal, bool bottom_right, double dropout_p,
    bool bias_grad) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(kBwd, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right,
                                  dropout_p, keep);
  const bool varlen = cu_q.has_value();
  check_device(dout_in, q, kBwd, "dout");
  check_device(out_in, q, kBwd, "out");
  const at::Tensor out = out_in.contiguous().to(q.scalar_type());
  const at::Tensor dout = dout_in.contiguous().to(q.scalar_type());
  const at::Tensor lse = lse_in.contiguous().to(at::kFloat);
  const at::Tensor dlse = dlse_in.contiguous().to(at::kFloat);
  TORCH_CHECK(out.sizes() == dout.sizes() && lse.sizes() == dlse.sizes(), "fusedlayers::", kBwd,
              ": out ", out.sizes(), " / dout ", dout.sizes(), " or lse ", lse.sizes(), " / dlse ", dlse.sizes(),
              " shapes differ");
  set_out_layout(p, varlen, q.size(0));
  p.out = const_cast<void*>(out.const_data_ptr());
  p.dout = dout.const_data_ptr();
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.aligned = p.aligned && aligned16(p.dout) && p.o_rs % 8 == 0 && p.o_hs % 8 == 0 && p.o_bs % 8 == 0;
  // the row term of dS = P * (dP - Delta + dlse): Delta_i - dlse_i, Delta_i = sum_d dO_id O_id,
  // in lse's layout ((B, Hq, Nq), or (Hq, Tq) for varlen)
  at::Tensor delta = at::sum(at::mul(dout.to(at::kFloat), out.to(at::kFloat)), {-1});
  if (varlen) delta = delta.t();
  delta = at::sub(delta, dlse).contiguous();
  p.delta = delta.const_data_ptr<float>();

  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const int64_t r = varlen ? 0 : 2;  // row dim
  p.dq = dq.mutable_data_ptr(), p.dk = dk.mutable_data_ptr(), p.dv = dv.mutable_data_ptr();
  p.dq_bs = varlen ? 0 : dq.stride(0), p.dq_hs = dq.stride(1), p.dq_rs = dq.stride(r);
  p.dk_bs = varlen ? 0 : dk.stride(0), p.dk_hs = dk.stride(1), p.dk_rs = dk.stride(r);
  p.dv_bs = varlen ? 0 : dv.stride(0), p.dv_hs = dv.stride(1), p.dv_rs = dv.stride(r);

  at::Tensor dbias_full;
  if (bias_grad) {
    TORCH_CHECK(mask.has_value() && mask->is_floating_point(), "fusedlayers::", kBwd,
                ": bias_grad needs a float attn_mask");
    // dS written once per (b, h, query, key) into a full-size float32 buffer (zero where
    // causal skipping never visits), then summed over the mask's broadcast dims
    dbias_full = at::zeros({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k}, q.options().dtype(at::kFloat));
    p.dbias = dbias_full.mutable_data_ptr<float>();
    p.db_bs = dbias_full.stride(0), p.db_hs = dbias_full.stride(1), p.db_qs = dbias_full.stride(2), p.db_ks = 1;
  }
  if (q.numel() > 0 || k.numel() > 0) {
    attention_bwd_launch(p, stream_of(q));
  }

  at::Tensor dbias;
  if (bias_grad) {
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < 4; ++d) {
      if (mask->size(d) == 1 && dbias_full.size(d) != 1) dims.push_back(d);
    }
    dbias = dims.empty() ? dbias_full : at::sum(dbias_full, dims, /*keepdim=*/true);
    dbias = dbias.to(mask->scalar_type()).contiguous();
  } else {
    dbias = at::empty({0}, q.options());
  }
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace fusedlayers::cuda

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  m.impl("attention_fwd_kernel", &fusedlayers::cuda::attention_fwd_cuda);
  m.impl("attention_bwd_kernel", &fusedlayers::cuda::attention_bwd_cuda);
}
