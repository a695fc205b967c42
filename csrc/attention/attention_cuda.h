// Interface between the CUDA attention kernels (attention_{fwd,bwd}_cuda.cu, no torch
// header) and their op glue (attention_op_cuda.cpp, host compiler): a parameter struct of
// raw pointers and strides, and the launchers. Semantics: fusedlayers/registration.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedlayers::cuda {

// softmax(scale * Q K^T + mask) V for fp16 / bf16 q, k, v (float32 accumulation), dense
// (B, H, N, D) or varlen (packed tokens, cu_seqlens). Element strides; the last dim of
// every tensor is contiguous. Row r of sequence b, head h of tensor X lives at
// X + b * X_bs + h * X_hs + (start_b + r) * X_rs, where start_b is 0 (dense) or
// cu_seqlens[b] (varlen, then X_bs = 0).
struct AttentionParams {
  bool bf16;  // else fp16
  int batch, heads_q, heads_kv;
  int head_dim, head_dim_v;               // D of q / k, D of v (both <= 256)
  int seqlen_q, seqlen_k;                 // dense lengths; varlen: the max lengths
  const int32_t* cu_seqlens_q = nullptr;  // varlen offsets (batch + 1) on the device, or null
  const int32_t* cu_seqlens_k = nullptr;

  const void *q, *k, *v;
  int64_t q_bs, q_hs, q_rs, k_bs, k_hs, k_rs, v_bs, v_hs, v_rs;
  // q, k, v, dout rows may be copied with 16-byte cp.async: base pointers and every
  // stride 16-byte aligned, D and Dv multiples of 8 (else element-wise copies).
  bool aligned;

  // attn_mask: kind 0 none, 1 bool (true = attend), 2 float32 bias, 3 bias in q's dtype;
  // strides 0 on broadcast dims. Dense only.
  int mask_kind = 0;
  const void* mask = nullptr;
  int64_t m_bs = 0, m_hs = 0, m_qs = 0, m_ks = 0;

  float scale;
  bool causal, bottom_right;  // bottom_right: key j visible from query i iff j <= i + Nk - Nq
  float dropout_p;
  uint64_t seed;
  // Dropout mask index of (b, h, query row r, key col c), rows and cols counted from the
  // start of the packed tensors: b * drop_bs + h * drop_hs + r * drop_rs + c (the index
  // the CPU kernels and dropout_keep_mask_kernel use).
  int64_t drop_bs, drop_hs, drop_rs;

  // out (Dv columns) in q's dtype; lse float32 at lse + b * lse_bs + h * lse_hs + row.
  void* out;
  int64_t o_bs, o_hs, o_rs;
  float* lse;
  int64_t lse_bs, lse_hs;

  // ---- backward only
  const void* dout = nullptr;  // layout of out (o_* strides)
  // Delta_i - dlse_i with Delta_i = sum_d dO_id O_id, float32, layout of lse: the row
  // term of dS = P * (dP - Delta + dlse).
  const float* delta = nullptr;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;  // in q's dtype, these strides:
  int64_t dq_bs, dq_hs, dq_rs, dk_bs, dk_hs, dk_rs, dv_bs, dv_hs, dv_rs;
  // float32 dS written once per (b, h, query, key), or null. Full (B, Hq, Nq, Nk) strides
  // (the glue sums the broadcast dims of the mask afterwards).
  float* dbias = nullptr;
  int64_t db_bs = 0, db_hs = 0, db_qs = 0, db_ks = 0;
};

// Shared memory (bytes) the forward / backward kernels need for head dims <= head_dim.
int attention_fwd_smem(int head_dim);
int attention_bwd_smem(int head_dim);

// Launch on `stream`; every launch is checked (C10_CUDA_KERNEL_LAUNCH_CHECK).
void attention_fwd_launch(const AttentionParams& p, cudaStream_t stream);
// dk, dv, dbias (one pass over query blocks per key block), then dq (one pass over key
// blocks per query block): deterministic, no atomics.
void attention_bwd_launch(const AttentionParams& p, cudaStream_t stream);

}  // namespace fusedlayers::cuda
