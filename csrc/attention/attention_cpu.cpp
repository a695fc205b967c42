// CPU implementations of the attention kernel ops (schemas in csrc/ext.cpp):
//   attention_fwd_kernel  (dense (B, H, N, D) or varlen (T, H, D) with cu_seqlens) -> out, lse
//   attention_bwd_kernel  -> dq, dk, dv, dbias (mask's shape, or empty)
// This file makes the CPU-specific checks (device, dtypes, cu_seqlens on the host), picks the
// tiles and calls the kernel of the machine's SIMD level (attention_cpu_kernel.h, compiled per
// level by csrc/cpu/kernels_*.cpp). The shape checks, layouts and allocations it shares with
// the CUDA op are in attention_host.h.
// Python adapter: fusedlayers/csrc_backend.py. Semantics: fusedlayers/registration.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention/attention_host.h"
#include "cpu/kernels.h"
#include "cpu/ops_common.h"

namespace fusedlayers::cpu {
namespace {

using namespace fusedlayers::attention_host;

constexpr const char* kFwd = "attention_fwd_kernel";
constexpr const char* kBwd = "attention_bwd_kernel";

// Everything but the outputs: shapes, input pointers and strides, mask, dropout indexing, tiles.
AttentionParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                            const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, int64_t seed,
                            double scale, bool causal, bool bottom_right, double dropout_p, int64_t window_left,
                            int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi) {
  for (auto* t : {&q, &k, &v}) check_cpu(*t, op, "q, k, v");
  AttentionParams p{};
  p.dtype = dtype_of(q, op, "q");
  for (const auto* cu : {&cu_q, &cu_k}) {
    TORCH_CHECK(!cu->has_value() || ((*cu)->scalar_type() == at::kInt && (*cu)->dim() == 1 &&
                                     (*cu)->is_contiguous() && (*cu)->device().is_cpu()),
                "fusedlayers::", op, ": cu_seqlens must be contiguous 1-D int32 CPU tensors");
  }
  set_qkv(p, op, q, k, v, cu_q ? &*cu_q : nullptr, cu_k ? &*cu_k : nullptr, max_q, max_k);
  if (cu_q.has_value()) {  // the kernels index q, k, v, out with these offsets: check every value
    const int64_t totals[2] = {q.size(0), k.size(0)}, maxes[2] = {max_q, max_k};
    const char* names[2] = {"cu_seqlens_q", "cu_seqlens_k"};
    const int32_t* offs[2] = {p.cu_seqlens_q, p.cu_seqlens_k};
    for (int t = 0; t < 2; ++t) {
      TORCH_CHECK(offs[t][0] == 0 && offs[t][p.batch] == totals[t], "fusedlayers::", op, ": ", names[t],
                  " must start at 0 and end at the token count ", totals[t]);
      for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t len = static_cast<int64_t>(offs[t][b + 1]) - offs[t][b];
        TORCH_CHECK(len >= 0 && len <= maxes[t], "fusedlayers::", op, ": ", names[t], " holds a sequence of length ",
                    len, " (must be in [0, max_seqlen = ", maxes[t], "])");
      }
    }
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_cpu(m, op, "attn_mask");
    if (m.scalar_type() == at::kBool) {
      p.mask_kind = 1;
    } else if (m.scalar_type() == at::kFloat) {
      p.mask_kind = 2;
    } else {
      TORCH_CHECK(m.scalar_type() == q.scalar_type(), "fusedlayers::", op,
                  ": attn_mask must be bool, float32 or q's dtype, got ", m.scalar_type());
      p.mask_kind = 3;
    }
    set_mask(p, op, m);
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
  set_scalars(p, op, scale, causal, bottom_right, dropout_p, seed);
  if (alibi.has_value()) check_cpu(*alibi, op, "alibi_slopes");
  set_variants(p, op, window_left, window_right, softcap, alibi);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& cu_q,
                                                     const std::optional<at::Tensor>& cu_k, int64_t max_q,
                                                     int64_t max_k, int64_t seed, double scale, bool causal,
                                                     bool bottom_right, double dropout_p, int64_t window_left,
                                                     int64_t window_right, double softcap,
                                                     const std::optional<at::Tensor>& alibi,
                                                     at::OptionalIntArrayRef dropout_layout) {
  const at::Tensor q = qkv_rows(q_in), k = qkv_rows(k_in), v = qkv_rows(v_in);
  AttentionParams p = make_params(kFwd, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right,
                                  dropout_p, window_left, window_right, softcap, alibi);
  set_dropout_layout(p, kFwd, dropout_layout);
  auto [out, lse] = alloc_out(p, q);
  kernels().attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& dlse_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t seed, double scale, bool causal, bool bottom_right, double dropout_p,
    bool bias_grad, int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi,
    at::OptionalIntArrayRef dropout_layout) {
  for (auto* t : {&dout_in, &dlse_in, &out_in, &lse_in}) check_cpu(*t, kBwd, "dout, dlse, out, lse");
  const at::Tensor q = qkv_rows(q_in), k = qkv_rows(k_in), v = qkv_rows(v_in);
  AttentionParams p = make_params(kBwd, q, k, v, mask, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right,
                                  dropout_p, window_left, window_right, softcap, alibi);
  set_dropout_layout(p, kBwd, dropout_layout);
  const auto [out, dout, lse, dlse] = bwd_inputs(p, kBwd, q, out_in, dout_in, lse_in, dlse_in);
  p.dlse = dlse.const_data_ptr<float>();
  auto [dq, dk, dv] = alloc_grads(p, q, k, v);

  at::Tensor dbias_acc;
  if (bias_grad) {
    check_bias_grad(kBwd, mask);
    // float32 accumulator with full B and Hq dims (each task owns its (b, h) slice) and
    // the mask's own q / k dims (broadcast ones summed in place)
    const int64_t mq = mask->size(2), mk = mask->size(3);
    dbias_acc = at::zeros({p.batch, p.heads_q, mq, mk}, q.options().dtype(at::kFloat));
    p.dbias = dbias_acc.mutable_data_ptr<float>();
    p.db_bs = p.heads_q * mq * mk, p.db_hs = mq * mk, p.db_qs = mq == 1 ? 0 : mk, p.db_ks = mk == 1 ? 0 : 1;
  }
  kernels().attention_bwd(p);
  at::Tensor dbias = bias_grad ? reduce_bias_grad(dbias_acc, *mask) : at::empty({0}, q.options());
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("attention_fwd_kernel", &fusedlayers::cpu::attention_fwd_cpu);
  m.impl("attention_bwd_kernel", &fusedlayers::cpu::attention_bwd_cpu);
}
