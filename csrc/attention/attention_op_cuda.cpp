// CUDA implementations of the attention kernel ops (schemas in csrc/ext.cpp, the same as
// the CPU ones in attention_cpu.cpp):
//   attention_fwd_kernel  (dense (B, H, N, D) or varlen (T, H, D) with cu_seqlens) -> out, lse
//   attention_bwd_kernel  -> dq, dk, dv, dbias (mask's shape, or empty)
// Makes the CUDA-specific checks (device, dtypes, head dims, grid limits; cu_seqlens moved to
// the device), computes Delta and calls the launchers of attention_{fwd,bwd}_cuda.cu; the shape
// checks, layouts and allocations it shares with the CPU op are in attention_host.h. Host code
// only (g++): includes c10/cuda/CUDAStream.h, not ATen/cuda/CUDAContext.h.
// fp16 / bf16 only: the kernels are tensor-core kernels; fusedlayers/cuda_backend.py
// refuses float32 calls before they get here, with the reason.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "attention/attention_cuda.h"
#include "attention/attention_host.h"

namespace fusedlayers::cuda {
namespace {

using namespace fusedlayers::attention_host;

constexpr const char* kFwd = "attention_fwd_kernel";
constexpr const char* kBwd = "attention_bwd_kernel";
constexpr int64_t kMaxGrid = 65535;  // gridDim.y / gridDim.z limit (heads, batch)

void check_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fusedlayers::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fusedlayers::", op, ": ", name, " is on ", t.device(), ", q on ",
              like.device());
}

// The CUDA kernels compute no score variant and take no dropout layout: a call must carry the
// defaults (the Python backend never sends others; dispatch refuses them for it).
void check_no_variants(const char* op, const AttentionArgs& a) {
  TORCH_CHECK(!a.dropout_layout.has_value(), "fusedlayers::", op,
              ": the CUDA kernels take no dropout_layout (the keep-mask of a block of a larger call); use "
              "backend='cpu' or 'reference'");
  TORCH_CHECK(a.window_left == -1 && a.window_right == -1 && a.softcap == 0.0 && !a.alibi.has_value(),
              "fusedlayers::", op, ": the CUDA kernels serve no window_size, softcap or alibi_slopes (got window (",
              a.window_left, ", ", a.window_right, "), softcap ", a.softcap, ", alibi_slopes ",
              a.alibi.has_value() ? "given" : "none", "); use backend='triton' or 'cpu'");
}

// Everything but the outputs: shapes, input pointers and strides, mask, dropout indexing.
// q, k, v: a's, through rows_contiguous. `keep` holds the tensors the params point into that
// were made here (converted masks, device copies of cu_seqlens).
AttentionParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionArgs& a, std::vector<at::Tensor>& keep) {
  check_no_variants(op, a);
  check_device(q, q, op, "q");
  check_device(k, q, op, "k");
  check_device(v, q, op, "v");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "fusedlayers::", op,
              ": the cuda backend takes float16 or bfloat16 q, k, v (tensor-core kernels), got ", q.scalar_type(),
              "; use backend='triton' for float32");
  AttentionParams p{};
  p.dtype = q.scalar_type() == at::kBFloat16 ? DType::bf16 : DType::f16;
  std::optional<at::Tensor> cq, ck;  // the offsets, on q's device (the kernels read them there)
  for (auto [cu, dev] : {std::pair{&a.cu_q, &cq}, std::pair{&a.cu_k, &ck}}) {
    if (!cu->has_value()) continue;
    TORCH_CHECK((*cu)->scalar_type() == at::kInt && (*cu)->dim() == 1, "fusedlayers::", op,
                ": cu_seqlens must be 1-D int32 tensors, got ", (*cu)->scalar_type(), " ", (*cu)->sizes());
    *dev = (*cu)->to(q.device()).contiguous();
    keep.push_back(**dev);
  }
  set_qkv(p, op, q, k, v, cq ? &*cq : nullptr, ck ? &*ck : nullptr, a.max_q, a.max_k);
  TORCH_CHECK(p.head_dim >= 1 && p.head_dim <= 256 && p.head_dim_v >= 1 && p.head_dim_v <= 256, "fusedlayers::", op,
              ": head dims must be in 1..256 on the cuda backend, got D=", p.head_dim, " Dv=", p.head_dim_v);
  TORCH_CHECK(p.heads_q <= kMaxGrid, "fusedlayers::", op, ": at most ", kMaxGrid, " heads, got ", p.heads_q);
  TORCH_CHECK(p.batch <= kMaxGrid, "fusedlayers::", op, ": at most ", kMaxGrid, " sequences, got ", p.batch);
  p.aligned = p.head_dim % 8 == 0 && p.head_dim_v % 8 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
  for (int64_t s : {p.q_bs, p.q_hs, p.q_rs, p.k_bs, p.k_hs, p.k_rs, p.v_bs, p.v_hs, p.v_rs}) {
    p.aligned = p.aligned && s % 8 == 0;
  }
  if (a.mask.has_value()) {
    at::Tensor m = *a.mask;
    check_device(m, q, op, "attn_mask");
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
    set_mask(p, op, m);
  }
  set_scalars(p, op, a.scale, a.causal, a.bottom_right, a.dropout_p, a.seed);
  return p;
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const AttentionArgs& a) {
  const c10::cuda::CUDAGuard guard(a.q.device());
  const at::Tensor q = rows_contiguous(a.q), k = rows_contiguous(a.k), v = rows_contiguous(a.v);
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(kFwd, q, k, v, a, keep);
  auto [out, lse] = alloc_out(p, q, &plain_empty);
  if (out.numel() > 0) attention_fwd_launch(p, stream_of(q));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const AttentionArgs& a,
                                                                              const AttentionBwdArgs& g) {
  const c10::cuda::CUDAGuard guard(a.q.device());
  const at::Tensor q = rows_contiguous(a.q), k = rows_contiguous(a.k), v = rows_contiguous(a.v);
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(kBwd, q, k, v, a, keep);
  check_device(g.dout, q, kBwd, "dout");
  check_device(g.out, q, kBwd, "out");
  const auto [out, dout, lse, dlse] = bwd_inputs(p, kBwd, q, g.out, g.dout, g.lse, g.dlse);
  p.aligned = p.aligned && aligned16(p.dout) && p.o_rs % 8 == 0 && p.o_hs % 8 == 0 && p.o_bs % 8 == 0;
  // the row term of dS = P * (dP - Delta + dlse): Delta_i - dlse_i, Delta_i = sum_d dO_id O_id,
  // in lse's layout ((B, Hq, Nq), or (Hq, Tq) for varlen)
  at::Tensor delta = at::sum(at::mul(dout.to(at::kFloat), out.to(at::kFloat)), {-1});
  if (a.cu_q.has_value()) delta = delta.t();
  delta = at::sub(delta, dlse).contiguous();
  p.delta = delta.const_data_ptr<float>();
  auto [dq, dk, dv] = alloc_grads(p, q, k, v, &plain_empty);
  // dbias: dS written once per (b, h, query, key) into a full-size buffer (zero where causal
  // skipping never visits), then summed over the mask's broadcast dims
  const at::Tensor dbias_full = alloc_bias_grad(p, kBwd, g.bias_grad, a.mask, q, /*mask_qk=*/false);
  if (q.numel() > 0 || k.numel() > 0) {
    attention_bwd_launch(p, stream_of(q));
  }
  return {dq, dk, dv, reduce_bias_grad(dbias_full, a.mask, q)};
}

int64_t attention_cuda_smem(int64_t head_dim) {
  TORCH_CHECK(head_dim >= 1 && head_dim <= 256, "fusedlayers::_attention_cuda_smem: head_dim must be in 1..256, got ",
              head_dim);
  const int d = static_cast<int>(head_dim);
  return std::max(attention_fwd_smem(d), attention_bwd_smem(d));
}

}  // namespace
}  // namespace fusedlayers::cuda

// No tensor argument, so no backend key: CompositeExplicitAutograd serves every call.
TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  m.impl("_attention_cuda_smem", &fusedlayers::cuda::attention_cuda_smem);
}

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  using namespace fusedlayers::attention_host;
  m.impl("attention_fwd_kernel", &fwd_op<&fusedlayers::cuda::attention_fwd_cuda>);
  m.impl("attention_bwd_kernel", &bwd_op<&fusedlayers::cuda::attention_bwd_cuda>);
}
