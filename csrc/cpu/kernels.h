// The CPU kernels' interface: parameter structs (raw pointers and strides, no tensors)
// and the table of kernel entry points of one SIMD level. The op glue
// (csrc/attention/attention_cpu.cpp, csrc/layer_norm/layer_norm_cpu.cpp) fills the
// params and calls kernels(); each csrc/cpu/kernels_<level>.cpp compiles the kernel
// headers for its level and defines its table.
#pragma once

#include <cstdint>

namespace fusedlayers::cpu {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Attention, dense (B, H, N, D) or varlen (packed tokens, cu_seqlens). Element strides;
// the last dim of every tensor is contiguous. Row r of sequence b, head h of tensor X
// lives at X + b * X_bs + h * X_hs + (start_b + r) * X_rs, where start_b is 0 (dense) or
// cu_seqlens[b] (varlen, then X_bs = 0).
struct AttentionParams {
  DType dtype;  // of q, k, v, out, dout, dq, dk, dv
  int64_t batch, heads_q, heads_kv, head_dim, head_dim_v;
  int64_t seqlen_q, seqlen_k;          // dense lengths; varlen: the max lengths
  const int32_t* cu_seqlens_q = nullptr;  // varlen offsets (batch + 1), or null: dense
  const int32_t* cu_seqlens_k = nullptr;

  const void *q, *k, *v;
  int64_t q_bs, q_hs, q_rs, k_bs, k_hs, k_rs, v_bs, v_hs, v_rs;

  // attn_mask: kind 0 none, 1 bool (true = attend), 2 float32 bias, 3 bias of `dtype`;
  // strides 0 on broadcast dims (never materialised). Dense only.
  int mask_kind = 0;
  const void* mask = nullptr;
  int64_t m_bs = 0, m_hs = 0, m_qs = 0, m_ks = 0;

  int64_t block_q = 64, block_k = 256;  // query rows per task, keys per inner block (set by the glue)

  float scale;
  bool causal, bottom_right;
  float dropout_p;
  uint64_t seed;
  // Dropout element index of (b, h, query row r, key col c), r and c counted from the
  // start of the packed tensors: b * drop_bs + h * drop_hs + r * drop_rs + c.
  int64_t drop_bs, drop_hs, drop_rs;

  // out (and dout, same strides) in `dtype`; lse float32 at lse + b * lse_bs + h * lse_hs + row.
  void* out;
  int64_t o_bs, o_hs, o_rs;
  float* lse;
  int64_t lse_bs, lse_hs;

  // backward only
  const void* dout = nullptr;
  const float* dlse = nullptr;  // same layout as lse
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;  // layouts of q, k, v with these strides:
  int64_t dq_bs, dq_hs, dq_rs, dk_bs, dk_hs, dk_rs, dv_bs, dv_hs, dv_rs;
  // float32 accumulator of the bias gradient, zero-initialised, or null; strides 0 on
  // the q / k dims the mask broadcasts (summed in place); b and h dims always full.
  float* dbias = nullptr;
  int64_t db_bs = 0, db_hs = 0, db_qs = 0, db_ks = 0;
};

// (Residual-add +) layer / RMS norm over rows of `hidden` elements.
struct NormParams {
  int64_t rows, hidden;
  float eps, dropout_p;
  uint64_t seed;  // dropout element (row, col) has index row * hidden + col
  bool rms;

  const void* x;  // forward input rows (row stride x_rs)
  DType x_dtype;
  int64_t x_rs;
  const void* residual = nullptr;
  DType residual_dtype = DType::f32;
  int64_t residual_rs = 0;
  const void* weight = nullptr;
  DType weight_dtype = DType::f32;
  const void* bias = nullptr;
  DType bias_dtype = DType::f32;

  void* y = nullptr;  // (rows, hidden) contiguous, x_dtype
  void* z = nullptr;  // the residual stream, contiguous, z_dtype, or null
  DType z_dtype = DType::f32;
  float* mean = nullptr;  // (rows,), null for RMS norm
  float* rstd = nullptr;

  // backward: zin (the saved stream, or x) rows with row stride zin_rs; dy, dz contiguous.
  const void* zin = nullptr;
  DType zin_dtype = DType::f32;
  int64_t zin_rs = 0;
  const void* dy = nullptr;  // x_dtype
  const void* dz = nullptr;  // dz_dtype, or null
  DType dz_dtype = DType::f32;
  void* dx = nullptr;        // x_dtype
  void* dresidual = nullptr; // residual_dtype, or null
  float* dweight = nullptr;  // (hidden,) float32 results, or null
  float* dbias = nullptr;
};

struct Kernels {
  const char* name;  // "AVX512", "AVX2", "DEFAULT"
  void (*attention_fwd)(const AttentionParams&);
  void (*attention_bwd)(const AttentionParams&);
  void (*norm_fwd)(const NormParams&);
  void (*norm_bwd)(const NormParams&);
};

// The table of the SIMD level ATen uses on this machine (ATEN_CPU_CAPABILITY honoured).
const Kernels& kernels();

}  // namespace fusedlayers::cpu
