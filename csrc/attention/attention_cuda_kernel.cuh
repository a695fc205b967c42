// Device code of the CUDA attention kernels (FlashAttention-2 style), included by
// attention_fwd_cuda.cu and attention_bwd_cuda.cu. No torch header.
//
// Building blocks, all warp-level, sm_80+:
//   mma.sync.m16n8k16 (fp16 / bf16 in, fp32 accumulate), operands from shared memory
//   through ldmatrix (.trans for the operands stored k-major), tiles copied from global
//   memory with 16-byte cp.async (zero-filled past the ends; element-wise copies when
//   rows are not 16-byte aligned), shared-memory rows padded by 16 bytes so that the 8
//   row addresses of an ldmatrix hit 8 different bank groups (no conflicts, no swizzle).
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16 x 16, row)  a[0] = (g, 2t..2t+1)  a[1] = (g+8, 2t..)  a[2] = (g, 2t+8..)  a[3] = (g+8, 2t+8..)
//   B (16 x 8, col)   b[0] = (k 2t..2t+1, n g)  b[1] = (k 2t+8.., n g)
//   C (16 x 8, f32)   c[0..1] = (g, 2t..2t+1)  c[2..3] = (g+8, 2t..2t+1)
// so the C fragments of two adjacent n-tiles, packed to 16 bits, are the A fragment of a
// 16-wide k-chunk: the P of S = Q K^T feeds P V without leaving registers.
//
// Kernels (one instantiation per (dtype, head-dim bucket kD in {64, 128, 256})):
//   attention_fwd_kernel   one block per (query block, head, batch); each warp owns 16
//       query rows; loops over key blocks (causal: only up to the diagonal), K / V tiles
//       double-buffered, online softmax in registers with exp2, lse saved.
//   attention_dkdv_kernel  one block per (key block, KV head, batch); each warp owns 16
//       keys; loops over the query heads of the GQA group and their query blocks (Q / dO
//       tiles double-buffered), recomputes P from lse; dK, dV in registers (in chunks of
//       kDChunk columns when kD = 256); writes dbias. Every dK, dV, dbias element has one
//       writer: deterministic.
//   attention_dq_kernel    dQ in a second pass (deterministic, no atomics): one block per
//       query block, each warp owns 16 query rows and accumulates dQ = dS K in registers.
//       (A dQ-by-atomics variant inside the dK / dV kernel was written and dropped: its
//       registers made that kernel spill at kD >= 128, and the op schema has no
//       `deterministic` flag to choose it.)
// Backward math (names as in fusedlayers/reference_backend.py):
//   P = exp(S - lse), dP = dropout(dO V^T), dS = P * (dP - Delta + dlse),
//   dV = dropout(P)^T dO, dK = scale * dS^T Q, dQ = scale * dS K, dbias = dS.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention/attention_cuda.h"
#include "common/cuda_utils.cuh"
#include "common/online_softmax.h"

namespace fusedlayers::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kPad = 8;  // shared-memory row padding, elements (16 bytes)

// ------------------------------------------------------------------------------ PTX

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronous; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared-memory address `addr`; lane l gives the row address
// of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b, m16n8k16, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one 32-bit register of two T (lo = the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// The A fragment of k-chunk kk from the C fragments of n-tiles 2kk and 2kk+1.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack<T>(c0[0], c0[1]);
  a[1] = pack<T>(c0[2], c0[3]);
  a[2] = pack<T>(c1[0], c1[1]);
  a[3] = pack<T>(c1[2], c1[3]);
}

// ldmatrix addressing. A thread computes its lane's byte address in a tile once (a base
// register); every fragment is then that base plus a compile-time offset, which ptxas
// folds into the instruction ([reg + imm]) instead of keeping one register per fragment.
// Byte offset of element (row, col) of a tile of 16-bit elements with row stride kLd:
template <int kLd>
__device__ __forceinline__ constexpr uint32_t off(int row, int col) {
  return static_cast<uint32_t>((row * kLd + col) * 2);
}
// Lane pattern "row-major": row lane % 16, col (lane / 16) * 8. Gives, at offset
// off(r0, k0): the A fragment of rows r0.. / k-chunk k0 of a row-major tile (ldsm_x4);
// at offset off(k0, n0): the B fragments of n-tiles n0, n0 + 8 / k-chunk k0 of a k-major
// tile (s[k][n], e.g. V for P V; ldsm_x4_t), r[0..1] = n-tile n0, r[2..3] = n-tile n0 + 8.
template <int kLd>
__device__ __forceinline__ uint32_t lane_rm(int lane) {
  return off<kLd>(lane % 16, (lane / 16) * 8);
}
// Lane pattern "n-major": row lane % 8 + (lane / 16) * 8, col ((lane / 8) % 2) * 8. Gives,
// at offset off(n0, k0): the B fragments of n-tiles n0, n0 + 8 of an n-major tile (s[n][k],
// e.g. K for S = Q K^T; ldsm_x4), same register order; at offset off(k0, r0): the A
// fragment of rows r0.. of a k-major tile (s[k][row]; ldsm_x4_t).
template <int kLd>
__device__ __forceinline__ uint32_t lane_nm(int lane) {
  return off<kLd>(lane % 8 + (lane / 16) * 8, ((lane / 8) % 2) * 8);
}

// ------------------------------------------------------------------ geometry, masks

// Where sequence b starts and how long it is (dense: 0 and the full lengths); shift is
// the causal diagonal offset (Nk - Nq for bottom-right alignment).
struct Seq {
  int64_t q_start, k_start;
  int len_q, len_k, shift;
};

__device__ __forceinline__ Seq seq_of(const AttentionParams& p, int b) {
  Seq s{0, 0, p.seqlen_q, p.seqlen_k, 0};
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.len_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.k_start = p.cu_seqlens_k[b];
    s.len_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  }
  s.shift = p.bottom_right ? s.len_k - s.len_q : 0;
  return s;
}

// Keys [0, end) that queries [m0, m0 + rows) may see.
__device__ __forceinline__ int key_end(const AttentionParams& p, const Seq& sq, int m0, int rows) {
  if (!p.causal) return sq.len_k;
  const int e = m0 + rows + sq.shift;
  return e < 0 ? 0 : (e < sq.len_k ? e : sq.len_k);
}

// Whether a (query block, key block) tile needs element-wise masking: a mask, the key
// tail, or keys above the causal diagonal of the tile's first query row.
__device__ __forceinline__ bool tile_needs_mask(const AttentionParams& p, const Seq& sq, int m0, int n0, int block_n) {
  return p.mask_kind != 0 || n0 + block_n > sq.len_k || (p.causal && n0 + block_n - 1 > m0 + sq.shift);
}

// scale * s + bias of query r, key c (positions in their sequence), or -inf where the
// key is hidden from the query (past the end, causal, bool mask false).
template <typename T>
__device__ __forceinline__ float masked_logit(const AttentionParams& p, const Seq& sq, int b, int h, int r, int c,
                                              float s) {
  if (c >= sq.len_k || (p.causal && c > r + sq.shift)) return -INFINITY;
  float x = s * p.scale;
  if (p.mask_kind != 0 && r < sq.len_q) {
    const int64_t off = b * p.m_bs + h * p.m_hs + r * p.m_qs + c * p.m_ks;
    if (p.mask_kind == 1) {
      if (!static_cast<const bool*>(p.mask)[off]) return -INFINITY;
    } else if (p.mask_kind == 2) {
      x += static_cast<const float*>(p.mask)[off];
    } else {
      x += to_float(static_cast<const T*>(p.mask)[off]);
    }
  }
  return x;
}

__device__ __forceinline__ uint64_t drop_index(const AttentionParams& p, const Seq& sq, int b, int h, int r, int c) {
  return static_cast<uint64_t>(b * p.drop_bs + h * p.drop_hs + (sq.q_start + r) * p.drop_rs + sq.k_start + c);
}

// Keep bits of a warp tile's accumulator elements under dropout: bit 4 * nt + e is element
// e of n-tile nt (<= 8 n-tiles), 1 = kept. The element at (n-tile nt, e) is query row
// `row0 + (e / 2) * 8` (+ col_step_r * column) and key ... as given by `rc`, which maps
// (nt, e) to (query r, key c). Computed in a loop that is not unrolled, so that only one
// copy of Philox is compiled and its registers are not multiplied by the tile size.
template <int kTiles, typename RowCol>
__device__ __forceinline__ uint32_t dropout_bits(const AttentionParams& p, const Seq& sq, int b, int h, RowCol rc) {
  static_assert(kTiles * 4 <= 32, "dropout_bits: at most 8 n-tiles");
  uint32_t bits = 0;
#pragma unroll 1
  for (int idx = 0; idx < kTiles * 4; ++idx) {
    int r, c;
    rc(idx / 4, idx % 4, r, c);
    if (r < sq.len_q && c < sq.len_k && dropout_keep_one(p.seed, drop_index(p, sq, b, h, r, c), p.dropout_p)) {
      bits |= 1u << idx;
    }
  }
  return bits;
}

// ------------------------------------------------------------------------- copies

// Rows [0, kRows) x cols [0, kD) of a tile into shared memory (row stride kD + kPad):
// rows >= nrows and cols >= ncols are zero. `aligned`: 16-byte cp.async (ncols % 8 == 0,
// rows 16-byte aligned); else element-wise loads and stores (synchronous).
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void copy_tile(T* __restrict__ s, const T* __restrict__ g, int64_t rs, int nrows, int ncols,
                                          bool aligned) {
  constexpr int kLd = kD + kPad;
  if (aligned) {
    constexpr int kChunks = kD / 8, kTotal = kRows * kChunks;
#pragma unroll
    for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
      const int i = threadIdx.x + it * kThreads;
      if (kTotal % kThreads == 0 || i < kTotal) {
        const int r = i / kChunks, c = (i % kChunks) * 8;
        const bool valid = r < nrows && c < ncols;
        cp_async_16(s + r * kLd + c, valid ? g + r * rs + c : g, valid);
      }
    }
  } else {
    for (int i = threadIdx.x; i < kRows * kD; i += kThreads) {
      const int r = i / kD, c = i % kD;
      s[r * kLd + c] = (r < nrows && c < ncols) ? g[r * rs + c] : from_float<T>(0.0f);
    }
  }
}

// Stores two adjacent columns (c, c + 1) of a row, as one 32-bit store when allowed.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int c, int ncols, float x0, float x1, bool pairs) {
  if (c + 1 < ncols && pairs) {
    *reinterpret_cast<uint32_t*>(row + c) = pack<T>(x0, x1);
  } else {
    if (c < ncols) row[c] = from_float<T>(x0);
    if (c + 1 < ncols) row[c + 1] = from_float<T>(x1);
  }
}

// ====================================================================== forward

template <int kD>
struct FwdCfg;
template <>
struct FwdCfg<64> {
  static constexpr int kWarps = 4, kBlockN = 64;
};
template <>
struct FwdCfg<128> {
  static constexpr int kWarps = 8, kBlockN = 64;
};
template <>
struct FwdCfg<256> {
  static constexpr int kWarps = 8, kBlockN = 32;
};

template <typename T, int kD>
struct FwdTile {
  static constexpr int kWarps = FwdCfg<kD>::kWarps, kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps, kBlockN = FwdCfg<kD>::kBlockN;
  static constexpr int kLd = kD + kPad;
  // Q, then K and V in two stages each
  static constexpr int kSmem = (kBlockM + 4 * kBlockN) * kLd * static_cast<int>(sizeof(T));
};

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

  const int m_block = gridDim.x - 1 - blockIdx.x;  // the heaviest (causal) blocks first
  const int h = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_of(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= sq.len_q) return;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tq = lane % 4;
  const int row_a = m0 + warp * 16 + lane / 4;  // this thread's rows: row_a, row_a + 8

  const T* gQ = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + (sq.q_start + m0) * p.q_rs;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs + sq.k_start * p.k_rs;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs + sq.k_start * p.v_rs;
  const int n_end = key_end(p, sq, m0, kBlockM);
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;
  auto load_kv = [&](int j, int stage) {
    const int n0 = j * kBlockN;
    copy_tile<T, kBlockN, kD, kThreads>(sK + stage * kBlockN * kLd, gK + n0 * p.k_rs, p.k_rs, n_end - n0,
                                        p.head_dim, p.aligned);
    copy_tile<T, kBlockN, kD, kThreads>(sV + stage * kBlockN * kLd, gV + n0 * p.v_rs, p.v_rs, n_end - n0,
                                        p.head_dim_v, p.aligned);
  };

  copy_tile<T, kBlockM, kD, kThreads>(sQ, gQ, p.q_rs, sq.len_q - m0, p.head_dim, p.aligned);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  SoftmaxState st[2] = {softmax_init(), softmax_init()};
  const uint32_t q_a = smem_u32(sQ) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t k_b = smem_u32(sK) + lane_nm<kLd>(lane);
  const uint32_t v_b = smem_u32(sV) + lane_rm<kLd>(lane);
  constexpr uint32_t kStageBytes = off<kLd>(kBlockN, 0);

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    if (j + 1 < n_blocks) {
      load_kv(j + 1, (j + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t cK = k_b + (j & 1) * kStageBytes, cV = v_b + (j & 1) * kStageBytes;

    // S = Q K^T (16 rows x kBlockN per warp)
    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk * 16 < p.head_dim) {
        uint32_t a[4];
        ldsm_x4(a, q_a + off<kLd>(0, kk * 16));
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, cK + off<kLd>(np * 16, kk * 16));
          mma<T>(s[2 * np], a, bb[0], bb[1]);
          mma<T>(s[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }

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
      const uint32_t keep = dropout_bits<kNT>(p, sq, b, h, [&](int nt, int e, int& r, int& c) {
        r = row_a + (e / 2) * 8;
        c = n0 + nt * 8 + 2 * tq + (e % 2);
      });
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!((keep >> (4 * nt + e)) & 1u)) s[nt][e] = 0.0f;
        }
      }
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        if (dp * 16 < p.head_dim_v) {
          uint32_t bb[4];
          ldsm_x4_t(bb, cV + off<kLd>(kk * 16, dp * 16));
          mma<T>(o[2 * dp], a, bb[0], bb[1]);
          mma<T>(o[2 * dp + 1], a, bb[2], bb[3]);
        }
      }
    }
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

// ====================================================================== backward

// dK / dV kernel tiles: kWarps * 16 keys per block, kBlockM queries per inner step, dK and
// dV held in registers kDChunk columns at a time (the query loop runs kD / kDChunk times).
template <int kD>
struct BwdCfg;
template <>
struct BwdCfg<64> {
  static constexpr int kWarps = 4, kBlockM = 32, kDChunk = 64;
};
template <>
struct BwdCfg<128> {
  static constexpr int kWarps = 4, kBlockM = 16, kDChunk = 128;
};
template <>
struct BwdCfg<256> {
  static constexpr int kWarps = 4, kBlockM = 16, kDChunk = 128;
};

template <typename T, int kD>
struct DkdvTile {
  static constexpr int kWarps = BwdCfg<kD>::kWarps, kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps, kBlockM = BwdCfg<kD>::kBlockM, kDChunk = BwdCfg<kD>::kDChunk;
  static constexpr int kLd = kD + kPad;
  // K, V; Q and dO in two stages; lse and Delta in two stages
  static constexpr int kSmem = (2 * kBlockN + 4 * kBlockM) * kLd * static_cast<int>(sizeof(T)) + 4 * kBlockM * 4;
};

// Row terms of query rows m0 .. m0 + kBlockM of head h into shared memory: lse in natural
// units (+inf where the row saw no key or is past the end, so that P = 0 there) and
// Delta - dlse (0 past the end). P = exp2((S - lse) * log2(e)): subtracted first (see the
// forward), so that an lse near -FLT_MAX does not overflow.
template <int kBlockM>
__device__ __forceinline__ void load_row_terms(const AttentionParams& p, const Seq& sq, int b, int h, int m0,
                                               float* s_lse, float* s_delta) {
  for (int i = threadIdx.x; i < kBlockM; i += blockDim.x) {
    const int r = m0 + i;
    float lse_r = INFINITY, delta = 0.0f;
    if (r < sq.len_q) {
      const int64_t at = b * p.lse_bs + h * p.lse_hs + sq.q_start + r;
      const float lse = p.lse[at];
      lse_r = lse == -INFINITY ? INFINITY : lse;
      delta = p.delta[at];
    }
    s_lse[i] = lse_r;
    s_delta[i] = delta;
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(DkdvTile<T, kD>::kThreads, 1) attention_dkdv_kernel(const AttentionParams p) {
  using Tile = DkdvTile<T, kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kLd = Tile::kLd;
  constexpr int kThreads = Tile::kThreads, kDChunk = Tile::kDChunk;
  constexpr int kMT = kBlockM / 8;       // n-tiles of S^T (queries) per warp
  constexpr int kCT = kDChunk / 8;       // n-tiles of the dK / dV chunk
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kLd;
  T* sQ = sV + kBlockN * kLd;           // [2][kBlockM][kLd]
  T* sdO = sQ + 2 * kBlockM * kLd;      // [2][kBlockM][kLd]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBlockM * kLd);  // [2][kBlockM]
  float* sDelta = sLse + 2 * kBlockM;                             // [2][kBlockM]

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_of(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= sq.len_k) return;
  const int group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tq = lane % 4;
  const int key_a = n0 + warp * 16 + lane / 4;  // this thread's keys: key_a, key_a + 8

  const T* gK = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs + (sq.k_start + n0) * p.k_rs;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs + (sq.k_start + n0) * p.v_rs;
  copy_tile<T, kBlockN, kD, kThreads>(sK, gK, p.k_rs, sq.len_k - n0, p.head_dim, p.aligned);
  copy_tile<T, kBlockN, kD, kThreads>(sV, gV, p.v_rs, sq.len_k - n0, p.head_dim_v, p.aligned);
  cp_async_commit();

  // query blocks that see any of these keys: from the first row on or below the causal
  // diagonal of key n0 to the end
  int m_first = 0;
  if (p.causal) {
    const int r = n0 - sq.shift;
    m_first = r > 0 ? r / kBlockM : 0;
  }
  const int m_count = (sq.len_q + kBlockM - 1) / kBlockM - m_first;
  const int steps = m_count > 0 ? group * m_count : 0;  // (query head, query block) pairs
  auto load_q_step = [&](int it, int stage) {
    const int h = hk * group + it / m_count, m0 = (m_first + it % m_count) * kBlockM;
    const T* gQ = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + (sq.q_start + m0) * p.q_rs;
    const T* gdO = static_cast<const T*>(p.dout) + b * p.o_bs + h * p.o_hs + (sq.q_start + m0) * p.o_rs;
    copy_tile<T, kBlockM, kD, kThreads>(sQ + stage * kBlockM * kLd, gQ, p.q_rs, sq.len_q - m0, p.head_dim, p.aligned);
    copy_tile<T, kBlockM, kD, kThreads>(sdO + stage * kBlockM * kLd, gdO, p.o_rs, sq.len_q - m0, p.head_dim_v,
                                        p.aligned);
    load_row_terms<kBlockM>(p, sq, b, h, m0, sLse + stage * kBlockM, sDelta + stage * kBlockM);
  };
  const float inv_keep = p.dropout_p > 0.0f ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const int d_max = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  const uint32_t k_a = smem_u32(sK) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t v_a = smem_u32(sV) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t q_b = smem_u32(sQ) + lane_nm<kLd>(lane), q_bt = smem_u32(sQ) + lane_rm<kLd>(lane);
  const uint32_t do_b = smem_u32(sdO) + lane_nm<kLd>(lane), do_bt = smem_u32(sdO) + lane_rm<kLd>(lane);
  constexpr uint32_t kStageBytes = off<kLd>(kBlockM, 0);

  for (int c0 = 0; c0 < d_max; c0 += kDChunk) {
    float dk[kCT][4], dv[kCT][4];
#pragma unroll
    for (int i = 0; i < kCT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.0f;
    }
    if (steps > 0) load_q_step(0, 0);
    cp_async_commit();

    for (int it = 0; it < steps; ++it) {
      const int h = hk * group + it / m_count, m0 = (m_first + it % m_count) * kBlockM, stage = it & 1;
      if (it + 1 < steps) {
        load_q_step(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const uint32_t stage_off = stage * kStageBytes;
      const float* cLse = sLse + stage * kBlockM;
      const float* cDelta = sDelta + stage * kBlockM;

      // S^T = K Q^T and dP^T = V dO^T (16 keys x kBlockM queries per warp)
      float s[kMT][4], dp[kMT][4];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        if (kk * 16 < p.head_dim) {
          uint32_t a[4];
          ldsm_x4(a, k_a + off<kLd>(0, kk * 16));
#pragma unroll
          for (int np = 0; np < kMT / 2; ++np) {
            uint32_t bb[4];
            ldsm_x4(bb, q_b + stage_off + off<kLd>(np * 16, kk * 16));
            mma<T>(s[2 * np], a, bb[0], bb[1]);
            mma<T>(s[2 * np + 1], a, bb[2], bb[3]);
          }
        }
        if (kk * 16 < p.head_dim_v) {
          uint32_t a[4];
          ldsm_x4(a, v_a + off<kLd>(0, kk * 16));
#pragma unroll
          for (int np = 0; np < kMT / 2; ++np) {
            uint32_t bb[4];
            ldsm_x4(bb, do_b + stage_off + off<kLd>(np * 16, kk * 16));
            mma<T>(dp[2 * np], a, bb[0], bb[1]);
            mma<T>(dp[2 * np + 1], a, bb[2], bb[3]);
          }
        }
      }

      // P^T = exp(S^T - lse), dS^T = P^T * (dP^T - Delta + dlse); s <- dropout(P)^T, dp <- dS^T
      const bool check = tile_needs_mask(p, sq, m0, n0, kBlockN);
      uint32_t keep_bits = ~0u;
      if (p.dropout_p > 0.0f) {
        keep_bits = dropout_bits<kMT>(p, sq, b, h, [&](int nt, int e, int& r, int& c) {
          r = m0 + nt * 8 + 2 * tq + (e % 2);
          c = key_a + (e / 2) * 8;
        });
      }
#pragma unroll
      for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_a + (e / 2) * 8, qi = nt * 8 + 2 * tq + (e % 2), r = m0 + qi;
          const float x = check ? masked_logit<T>(p, sq, b, h, r, key, s[nt][e]) : s[nt][e] * p.scale;
          const float prob = exp2f((x - cLse[qi]) * kLog2e);
          float dpv = dp[nt][e], pd = prob;
          if (p.dropout_p > 0.0f) {
            const bool keep = (keep_bits >> (4 * nt + e)) & 1u;
            dpv = keep ? dpv * inv_keep : 0.0f;
            pd = keep ? prob * inv_keep : 0.0f;
          }
          const float ds = prob * (dpv - cDelta[qi]);
          s[nt][e] = pd;
          dp[nt][e] = ds;
          if (p.dbias != nullptr && c0 == 0 && r < sq.len_q && key < sq.len_k) {
            p.dbias[b * p.db_bs + h * p.db_hs + r * p.db_qs + key * p.db_ks] = ds;
          }
        }
      }

      // dV += dropout(P)^T dO and dK += dS^T Q, columns c0 .. c0 + kDChunk
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        uint32_t ap[4], as[4];
        c_to_a<T>(ap, s[2 * kk], s[2 * kk + 1]);
        c_to_a<T>(as, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
        for (int cp = 0; cp < kDChunk / 16; ++cp) {
          const int col = c0 + cp * 16;
          if (col < p.head_dim_v) {
            uint32_t bb[4];
            ldsm_x4_t(bb, do_bt + stage_off + off<kLd>(kk * 16, c0) + off<kLd>(0, cp * 16));
            mma<T>(dv[2 * cp], ap, bb[0], bb[1]);
            mma<T>(dv[2 * cp + 1], ap, bb[2], bb[3]);
          }
          if (col < p.head_dim) {
            uint32_t bb[4];
            ldsm_x4_t(bb, q_bt + stage_off + off<kLd>(kk * 16, c0) + off<kLd>(0, cp * 16));
            mma<T>(dk[2 * cp], as, bb[0], bb[1]);
            mma<T>(dk[2 * cp + 1], as, bb[2], bb[3]);
          }
        }
      }

      __syncthreads();  // the stage read here is refilled two steps on
    }

    // dK = scale * sum dS^T Q, dV = sum dropout(P)^T dO over the group's heads
    const bool pairs = (p.head_dim % 2 == 0) && (p.head_dim_v % 2 == 0) && (p.dk_rs % 2 == 0) &&
                       (p.dk_hs % 2 == 0) && (p.dk_bs % 2 == 0) && (p.dv_rs % 2 == 0) && (p.dv_hs % 2 == 0) &&
                       (p.dv_bs % 2 == 0);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int key = key_a + 8 * i;
      if (key >= sq.len_k) continue;
      T* dk_row = static_cast<T*>(p.dk) + b * p.dk_bs + hk * p.dk_hs + (sq.k_start + key) * p.dk_rs;
      T* dv_row = static_cast<T*>(p.dv) + b * p.dv_bs + hk * p.dv_hs + (sq.k_start + key) * p.dv_rs;
#pragma unroll
      for (int ct = 0; ct < kCT; ++ct) {
        const int col = c0 + ct * 8 + 2 * tq;
        store_pair(dk_row, col, p.head_dim, dk[ct][2 * i] * p.scale, dk[ct][2 * i + 1] * p.scale, pairs);
        store_pair(dv_row, col, p.head_dim_v, dv[ct][2 * i], dv[ct][2 * i + 1], pairs);
      }
    }
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits (no query step)
}

// The deterministic dQ pass: tiles as the forward's.
template <int kD>
struct DqCfg;
template <>
struct DqCfg<64> {
  static constexpr int kWarps = 4, kBlockN = 64;
};
template <>
struct DqCfg<128> {
  static constexpr int kWarps = 4, kBlockN = 64;
};
template <>
struct DqCfg<256> {
  static constexpr int kWarps = 4, kBlockN = 32;
};

template <typename T, int kD>
struct DqTile {
  static constexpr int kWarps = DqCfg<kD>::kWarps, kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps, kBlockN = DqCfg<kD>::kBlockN;
  static constexpr int kLd = kD + kPad;
  // Q, dO; K and V in two stages each
  static constexpr int kSmem = (2 * kBlockM + 4 * kBlockN) * kLd * static_cast<int>(sizeof(T));
};

template <typename T, int kD>
__global__ void __launch_bounds__(DqTile<T, kD>::kThreads, 1) attention_dq_kernel(const AttentionParams p) {
  using Tile = DqTile<T, kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kLd = Tile::kLd, kThreads = Tile::kThreads;
  constexpr int kNT = kBlockN / 8, kDT = kD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kLd;
  T* sK = sdO + kBlockM * kLd;     // [2][kBlockN][kLd]
  T* sV = sK + 2 * kBlockN * kLd;  // [2][kBlockN][kLd]

  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_of(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= sq.len_q) return;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tq = lane % 4;
  const int row_a = m0 + warp * 16 + lane / 4;

  const T* gQ = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + (sq.q_start + m0) * p.q_rs;
  const T* gdO = static_cast<const T*>(p.dout) + b * p.o_bs + h * p.o_hs + (sq.q_start + m0) * p.o_rs;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs + sq.k_start * p.k_rs;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs + sq.k_start * p.v_rs;
  const int n_end = key_end(p, sq, m0, kBlockM);
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;
  auto load_kv = [&](int j, int stage) {
    const int n0 = j * kBlockN;
    copy_tile<T, kBlockN, kD, kThreads>(sK + stage * kBlockN * kLd, gK + n0 * p.k_rs, p.k_rs, n_end - n0,
                                        p.head_dim, p.aligned);
    copy_tile<T, kBlockN, kD, kThreads>(sV + stage * kBlockN * kLd, gV + n0 * p.v_rs, p.v_rs, n_end - n0,
                                        p.head_dim_v, p.aligned);
  };
  copy_tile<T, kBlockM, kD, kThreads>(sQ, gQ, p.q_rs, sq.len_q - m0, p.head_dim, p.aligned);
  copy_tile<T, kBlockM, kD, kThreads>(sdO, gdO, p.o_rs, sq.len_q - m0, p.head_dim_v, p.aligned);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  // this thread's row terms (see load_row_terms)
  float lse_r[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row_a + 8 * i;
    lse_r[i] = INFINITY;
    delta[i] = 0.0f;
    if (r < sq.len_q) {
      const int64_t at = b * p.lse_bs + h * p.lse_hs + sq.q_start + r;
      const float lse = p.lse[at];
      lse_r[i] = lse == -INFINITY ? INFINITY : lse;
      delta[i] = p.delta[at];
    }
  }
  const float inv_keep = p.dropout_p > 0.0f ? 1.0f / (1.0f - p.dropout_p) : 1.0f;

  float dq[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
  const uint32_t q_a = smem_u32(sQ) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t do_a = smem_u32(sdO) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t k_b = smem_u32(sK) + lane_nm<kLd>(lane), k_bt = smem_u32(sK) + lane_rm<kLd>(lane);
  const uint32_t v_b = smem_u32(sV) + lane_nm<kLd>(lane);
  constexpr uint32_t kStageBytes = off<kLd>(kBlockN, 0);

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    if (j + 1 < n_blocks) {
      load_kv(j + 1, (j + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t stage_off = (j & 1) * kStageBytes;

    // S = Q K^T, dP = dO V^T
    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk * 16 < p.head_dim) {
        uint32_t a[4];
        ldsm_x4(a, q_a + off<kLd>(0, kk * 16));
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, k_b + stage_off + off<kLd>(np * 16, kk * 16));
          mma<T>(s[2 * np], a, bb[0], bb[1]);
          mma<T>(s[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      if (kk * 16 < p.head_dim_v) {
        uint32_t a[4];
        ldsm_x4(a, do_a + off<kLd>(0, kk * 16));
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, v_b + stage_off + off<kLd>(np * 16, kk * 16));
          mma<T>(dp[2 * np], a, bb[0], bb[1]);
          mma<T>(dp[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }

    // dS = P * (dropout(dP) - Delta + dlse)
    const bool check = tile_needs_mask(p, sq, m0, n0, kBlockN);
    uint32_t keep_bits = ~0u;
    if (p.dropout_p > 0.0f) {
      keep_bits = dropout_bits<kNT>(p, sq, b, h, [&](int nt, int e, int& r, int& c) {
        r = row_a + (e / 2) * 8;
        c = n0 + nt * 8 + 2 * tq + (e % 2);
      });
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2, r = row_a + 8 * i, c = n0 + nt * 8 + 2 * tq + (e % 2);
        const float x = check ? masked_logit<T>(p, sq, b, h, r, c, s[nt][e]) : s[nt][e] * p.scale;
        const float prob = exp2f((x - lse_r[i]) * kLog2e);
        const bool keep = (keep_bits >> (4 * nt + e)) & 1u;
        const float dpv = p.dropout_p > 0.0f ? (keep ? dp[nt][e] * inv_keep : 0.0f) : dp[nt][e];
        s[nt][e] = prob * (dpv - delta[i]);
      }
    }

    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp2 = 0; dp2 < kD / 16; ++dp2) {
        if (dp2 * 16 < p.head_dim) {
          uint32_t bb[4];
          ldsm_x4_t(bb, k_bt + stage_off + off<kLd>(kk * 16, dp2 * 16));
          mma<T>(dq[2 * dp2], a, bb[0], bb[1]);
          mma<T>(dq[2 * dp2 + 1], a, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  const bool pairs = (p.head_dim % 2 == 0) && (p.dq_rs % 2 == 0) && (p.dq_hs % 2 == 0) && (p.dq_bs % 2 == 0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row_a + 8 * i;
    if (r >= sq.len_q) continue;
    T* row = static_cast<T*>(p.dq) + b * p.dq_bs + h * p.dq_hs + (sq.q_start + r) * p.dq_rs;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      store_pair(row, dt * 8 + 2 * tq, p.head_dim, dq[dt][2 * i] * p.scale, dq[dt][2 * i + 1] * p.scale, pairs);
    }
  }
}

}  // namespace fusedlayers::cuda::attn
