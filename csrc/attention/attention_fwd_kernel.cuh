// The CUDA attention forward kernel, included by attention_fwd_cuda.cu. No torch header.
//
// attention_fwd_kernel: one block per (query block, head, batch); each warp owns 16 query
// rows; loops over key blocks (causal: only up to the diagonal), K / V tiles
// double-buffered, online softmax in registers with exp2, lse saved. Tiles: FwdTile
// (attention_kernel_utils.cuh).
#pragma once

#include "attention/attention_kernel_utils.cuh"

namespace fusedlayers::cuda::attn {

template <typename T, int kD>
__global__ void __launch_bounds__(FwdTile<T, kD>::kThreads, 1) attention_fwd_kernel(const AttentionParams p) {
  using Tile = FwdTile<T, kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kLd = Tile::kLd, kThreads = Tile::kThreads;
  constexpr int kNT = kBlockN / 8;  // n-tiles of S per warp
  constexpr int kDT = kD / 8;       // n-tiles of O per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kLd;      // [2][kBlockN][kLd]
  T* sV = sK + 2 * kBlockN * kLd;  // [2][kBlockN][kLd]

  const auto [h, b, hk, m0, warp, lane, tq, row_a, sq] = query_block<kBlockM>(p);
  if (m0 >= sq.len_q) return;

  const T* gQ = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + (sq.q_start + m0) * p.q_rs;
  const KvStream<T, kBlockM, kBlockN, kD, kThreads> load_kv(p, sq, b, hk, m0, sK, sV);
  const int n_blocks = load_kv.n_blocks;
  copy_tile<T, kBlockM, kD, kThreads>(sQ, gQ, p.q_rs, sq.len_q - m0, p.head_dim, p.aligned);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  float o[kDT][4];
  zero_acc(o);
  SoftmaxState st[2] = {softmax_init(), softmax_init()};
  const uint32_t q_a = smem_u32(sQ) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t k_b = smem_u32(sK) + lane_nm<kLd>(lane);
  const uint32_t v_b = smem_u32(sV) + lane_rm<kLd>(lane);
  constexpr uint32_t kStageBytes = off<kLd>(kBlockN, 0);

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    pipeline_step(j, n_blocks, load_kv);
    const uint32_t cK = k_b + (j & 1) * kStageBytes, cV = v_b + (j & 1) * kStageBytes;

    // S = Q K^T (16 rows x kBlockN per warp)
    float s[kNT][4];
    zero_acc(s);
    gemm<T, kD, kLd>(s, q_a, cK, p.head_dim);

    // scale, bias, masks: logits in natural units
    if (tile_needs_mask(p, sq, m0, n0, kBlockN)) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = masked_logit<T>(p, sq, b, h, row_a + (e / 2) * 8, n0 + nt * 8 + 2 * tq + (e % 2), s[nt][e]);
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= p.scale;
      }
    }

    // online softmax (common/online_softmax.h): the row max over the quad of 4 lanes that
    // shares a row; each lane keeps its partial l (summed over the quad at the end)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = softmax_new_max(st[i], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet: P = exp(-inf) = 0
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 2 * i; e < 2 * i + 2; ++e) {
          // P = exp(S - m), subtracted before scaling to base 2: S and m near -FLT_MAX (an additive
          // padding bias such as finfo.min) times log2(e) would overflow to -inf, and -inf - -inf is NaN
          s[nt][e] = exp2f((s[nt][e] - m_use) * kLog2e);
          sum += s[nt][e];
        }
      }
      const float alpha = softmax_update(st[i], m_new, sum);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        o[dt][2 * i] *= alpha;
        o[dt][2 * i + 1] *= alpha;
      }
    }

    // dropout of P (l keeps the undropped sum; 1 / (1 - p) is applied at the end)
    if (p.dropout_p > 0.0f) {
      const uint32_t keep = dropout_bits<kNT>(p, sq, b, h, FragPos<true>{row_a, n0, tq});
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!((keep >> (4 * nt + e)) & 1u)) s[nt][e] = 0.0f;
        }
      }
    }

    // O += P V
    gemm_rs<T, kLd>(o, s, cV, p.head_dim_v);
    __syncthreads();  // the stage read here is refilled two iterations on
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits (n_blocks == 0)

  // out = O / l (times 1 / (1 - p) under dropout), lse = m + log l; rows that saw no key: 0, -inf
  const float inv_keep = p.dropout_p > 0.0f ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const bool pairs = (p.head_dim_v % 2 == 0) && (p.o_rs % 2 == 0) && (p.o_hs % 2 == 0) && (p.o_bs % 2 == 0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    st[i].l += __shfl_xor_sync(0xffffffffu, st[i].l, 1);
    st[i].l += __shfl_xor_sync(0xffffffffu, st[i].l, 2);
    const int r = row_a + 8 * i;
    if (r >= sq.len_q) continue;
    const float inv = softmax_inv_sum(st[i]) * inv_keep;
    T* orow = static_cast<T*>(p.out) + b * p.o_bs + h * p.o_hs + (sq.q_start + r) * p.o_rs;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      store_pair(orow, dt * 8 + 2 * tq, p.head_dim_v, o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv, pairs);
    }
    if (tq == 0) p.lse[b * p.lse_bs + h * p.lse_hs + sq.q_start + r] = softmax_lse(st[i]);
  }
}

}  // namespace fusedlayers::cuda::attn
