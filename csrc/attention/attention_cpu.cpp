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
// q, k, v: a's, through qkv_rows.
AttentionParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionArgs& a) {
  for (auto* t : {&q, &k, &v}) check_cpu(*t, op, "q, k, v");
  AttentionParams p{};
  p.dtype = dtype_of(q, op, "q");
  for (const auto* cu : {&a.cu_q, &a.cu_k}) {
    TORCH_CHECK(!cu->has_value() || ((*cu)->scalar_type() == at::kInt && (*cu)->dim() == 1 &&
                                     (*cu)->is_contiguous() && (*cu)->device().is_cpu()),
                "fusedlayers::", op, ": cu_seqlens must be contiguous 1-D int32 CPU tensors");
  }
  set_qkv(p, op, q, k, v, a.cu_q ? &*a.cu_q : nullptr, a.cu_k ? &*a.cu_k : nullptr, a.max_q, a.max_k);
  if (a.cu_q.has_value()) {  // the kernels index q, k, v, out with these offsets: check every value
    const int64_t totals[2] = {q.size(0), k.size(0)}, maxes[2] = {a.max_q, a.max_k};
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
  if (a.mask.has_value()) {
    const at::Tensor& m = *a.mask;
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
  set_scalars(p, op, a.scale, a.causal, a.bottom_right, a.dropout_p, a.seed);
  if (a.alibi.has_value()) check_cpu(*a.alibi, op, "alibi_slopes");
  set_variants(p, op, a.window_left, a.window_right, a.softcap, a.alibi);
  // Tiles: large ones keep the GEMMs efficient (256 x 512 measured best on a 2-core AVX-512
  // machine, ~10% over 64 x 256); the query block shrinks while the forward would have
  // fewer than 4 tasks per thread. Under a window of E keys per row a block of block_q rows
  // spans block_q + E - 1 keys, so the block shrinks to E / 4 (at least 32): at most 1.25 E
  // keys computed per row instead of up to 2 E.
  p.block_k = 512;
  p.block_q = 256;
  const int64_t threads = at::get_num_threads();
  while (p.block_q > 32 && p.batch * p.heads_q * ((p.seqlen_q + p.block_q - 1) / p.block_q) < 4 * threads) {
    p.block_q /= 2;
  }
  const int64_t right = p.causal ? 0 : p.window_right;
  if (p.window_left >= 0 && right >= 0) {
    while (p.block_q > 32 && 4 * p.block_q > p.window_left + right + 1) p.block_q /= 2;
  }
  set_dropout_layout(p, op, a.dropout_layout);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const AttentionArgs& a) {
  const at::Tensor q = qkv_rows(a.q), k = qkv_rows(a.k), v = qkv_rows(a.v);
  AttentionParams p = make_params(kFwd, q, k, v, a);
  auto [out, lse] = alloc_out(p, q, &empty_output);
  kernels().attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const AttentionArgs& a,
                                                                             const AttentionBwdArgs& g) {
  for (auto* t : {&g.dout, &g.dlse, &g.out, &g.lse}) check_cpu(*t, kBwd, "dout, dlse, out, lse");
  const at::Tensor q = qkv_rows(a.q), k = qkv_rows(a.k), v = qkv_rows(a.v);
  AttentionParams p = make_params(kBwd, q, k, v, a);
  const auto [out, dout, lse, dlse] = bwd_inputs(p, kBwd, q, g.out, g.dout, g.lse, g.dlse);
  p.dlse = dlse.const_data_ptr<float>();
  auto [dq, dk, dv] = alloc_grads(p, q, k, v, &empty_output);
  // dbias: each task owns a (b, h) slice of the buffer and adds a broadcast q / k dim of the
  // mask up in place
  const at::Tensor dbias_acc = alloc_bias_grad(p, kBwd, g.bias_grad, a.mask, q, /*mask_qk=*/true);
  kernels().attention_bwd(p);
  return {dq, dk, dv, reduce_bias_grad(dbias_acc, a.mask, q)};
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  using namespace fusedlayers::attention_host;
  m.impl("attention_fwd_kernel", &fwd_op<&fusedlayers::cpu::attention_fwd_cpu>);
  m.impl("attention_bwd_kernel", &bwd_op<&fusedlayers::cpu::attention_bwd_cpu>);
}
