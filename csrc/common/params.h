// The parameter structs of the kernels of both devices, one per op family: raw pointers,
// sizes and element strides, no tensors. Filled by the op glue (attention_host.h,
// layer_norm_host.h and the op files), read by the CPU kernels (csrc/cpu/kernels.h) and by
// the CUDA kernels (attention_cuda.h, layer_norm_cuda.h). Plain C++: compiled by the host
// compiler and by nvcc. Fields read by one device's kernels only say so.
// Semantics: fusedlayers/registration.py.
#pragma once

#include <cstdint>

namespace fusedlayers {

// Storage type of a tensor the kernels read or write (the codes of FL_FLOAT_SWITCH).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// softmax(scale * Q K^T + mask) V, dense (B, H, N, D) or varlen (packed tokens, cu_seqlens),
// float32 accumulation. Element strides; the last dim of every tensor is contiguous. Row r of
// sequence b, head h of tensor X lives at X + b * X_bs + h * X_hs + (start_b + r) * X_rs, where
// start_b is 0 (dense) or cu_seqlens[b] (varlen, then X_bs = 0).
// Index: the type of the sizes, int64_t for the CPU kernels, int for the CUDA kernels (their
// index arithmetic stays 32-bit; the CUDA glue bounds the sizes).
template <typename Index>
struct AttentionParamsOf {
  DType dtype;  // of q, k, v, out, dout, dq, dk, dv (CUDA: f16 or bf16)
  Index batch, heads_q, heads_kv;
  Index head_dim, head_dim_v;             // D of q / k, D of v
  Index seqlen_q, seqlen_k;               // dense lengths; varlen: the max lengths
  const int32_t* cu_seqlens_q = nullptr;  // varlen offsets (batch + 1) where the kernels read them, or null
  const int32_t* cu_seqlens_k = nullptr;

  const void *q, *k, *v;
  int64_t q_bs, q_hs, q_rs, k_bs, k_hs, k_rs, v_bs, v_hs, v_rs;
  // CUDA: q, k, v, dout rows may be copied with 16-byte cp.async: base pointers and every
  // stride 16-byte aligned, D and Dv multiples of 8 (else element-wise copies).
  bool aligned = false;

  // attn_mask: kind 0 none, 1 bool (true = attend), 2 float32 bias, 3 bias of `dtype`;
  // strides 0 on broadcast dims (never materialised). Dense only.
  int mask_kind = 0;
  const void* mask = nullptr;
  int64_t m_bs = 0, m_hs = 0, m_qs = 0, m_ks = 0;

  // CPU: query rows per task, keys per inner block (set by the glue).
  int64_t block_q = 64, block_k = 256;

  float scale;
  bool causal, bottom_right;  // bottom_right: key j visible from query i iff j <= i + Nk - Nq
  // Score variants, read by the CPU kernels only (the CUDA glue accepts the defaults alone).
  // Row i of a sequence sits at key position p(i) = i (+ Nk - Nq when bottom_right) and sees
  // keys p(i) - window_left <= j <= p(i) + window_right (-1: that side unbounded); the scaled
  // score becomes softcap * tanh(s / softcap) when softcap > 0, then gets
  // -slope * |p(i) - j| with slope = alibi[b * alibi_bs + h * alibi_hs] (float32, or null: no
  // ALiBi), then the mask.
  int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
  const float* alibi = nullptr;
  int64_t alibi_bs = 0, alibi_hs = 0;
  float dropout_p;
  uint64_t seed;
  // Dropout mask index of (b, h, query row r, key col c), r and c counted from the start of
  // the packed tensors: drop_offset + b * drop_bs + h * drop_hs + r * drop_rs + c (the index of
  // every kernel and of dropout_keep_mask_kernel). drop_offset is 0 except for a dense call
  // with a dropout layout (set_dropout_layout in attention_host.h): a block of a larger call's
  // mask. The CUDA kernels read no drop_offset (their glue accepts no layout).
  int64_t drop_bs, drop_hs, drop_rs;
  int64_t drop_offset = 0;

  // out (Dv columns; dout has the same strides) in `dtype`; lse float32 at
  // lse + b * lse_bs + h * lse_hs + row.
  void* out;
  int64_t o_bs, o_hs, o_rs;
  float* lse;
  int64_t lse_bs, lse_hs;

  // ---- backward only
  const void* dout = nullptr;
  const float* dlse = nullptr;   // CPU: the lse gradient, layout of lse
  // CUDA: Delta_i - dlse_i with Delta_i = sum_d dO_id O_id, float32, layout of lse: the row
  // term of dS = P * (dP - Delta + dlse), computed by the glue.
  const float* delta = nullptr;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;  // layouts of q, k, v with these strides:
  int64_t dq_bs, dq_hs, dq_rs, dk_bs, dk_hs, dk_rs, dv_bs, dv_hs, dv_rs;
  // float32 bias gradient, or null. CPU: a zero-initialised accumulator, strides 0 on the
  // q / k dims the mask broadcasts (summed in place), b and h dims full. CUDA: dS written once
  // per (b, h, query, key) with full (B, Hq, Nq, Nk) strides (the glue sums the broadcast
  // dims afterwards).
  float* dbias = nullptr;
  int64_t db_bs = 0, db_hs = 0, db_qs = 0, db_ks = 0;
};

// (Residual-add +) layer / RMS norm over `rows` rows of `hidden` elements.
//   forward:  z = dropout(x) + residual;  y = (z - mean) * rstd * weight + bias
//             (RMS: mean = 0, rstd = 1 / sqrt(mean(z^2) + eps))
//   backward: xhat = (z - mean) * rstd, wdy = dy * weight,
//             dz = rstd * (wdy - mean(wdy) - xhat * mean(xhat * wdy)) + dz_in  (RMS: no mean(wdy)),
//             dresidual = dz, dx = dropout(dz), dweight = sum_rows dy * xhat, dbias = sum_rows dy
struct NormParams {
  int64_t rows, hidden;
  float eps, dropout_p;
  uint64_t seed;  // dropout element (row, col) has mask index row * hidden + col
  bool rms;

  // forward inputs: rows of x / residual with row strides; last dim contiguous
  const void* x = nullptr;
  DType x_dtype = DType::f32;  // also the dtype of y, dy and dx
  int64_t x_rs = 0;
  const void* residual = nullptr;  // or null
  DType residual_dtype = DType::f32;
  int64_t residual_rs = 0;
  const void* weight = nullptr;  // (hidden,) contiguous, or null (1)
  DType weight_dtype = DType::f32;
  const void* bias = nullptr;  // (hidden,) contiguous, or null (0)
  DType bias_dtype = DType::f32;

  // forward outputs: y (rows, hidden) contiguous in x_dtype; z the same in z_dtype or null. z_dtype is the
  // stream's dtype even where z is null: the cpu kernel normalises z rounded to it either way
  void* y = nullptr;
  void* z = nullptr;
  DType z_dtype = DType::f32;
  float* mean = nullptr;  // (rows,), null for RMS norm
  float* rstd = nullptr;  // (rows,)

  // backward: zin rows (the saved stream, or x) with row stride zin_rs; dy, dz contiguous
  const void* zin = nullptr;
  DType zin_dtype = DType::f32;
  int64_t zin_rs = 0;
  const void* dy = nullptr;  // x_dtype
  const void* dz = nullptr;  // dz_dtype, or null (no prenorm gradient)
  DType dz_dtype = DType::f32;
  void* dx = nullptr;         // x_dtype, contiguous
  void* dresidual = nullptr;  // residual_dtype, contiguous, or null
  // CPU: the float32 (hidden,) dweight / dbias sums, or null when not wanted.
  float* dweight = nullptr;
  float* dbias = nullptr;
  // CUDA: float32 (teams, hidden) partial sums of dweight / dbias, one row per team of
  // threads, zero-initialised, summed over teams by the glue; null when not wanted.
  float* dweight_partial = nullptr;
  float* dbias_partial = nullptr;
  int64_t teams = 0;  // rows of the partial-sum buffers: norm_bwd_teams(rows, hidden, device)
  // CUDA: every row start of every tensor is 16-byte aligned and hidden % 8 == 0: rows move
  // in 16-byte accesses (else element by element).
  bool vec = false;
};

}  // namespace fusedlayers
