// Device building blocks of the CUDA attention kernels (FlashAttention-2 style), shared by
// attention_fwd_kernel.cuh and attention_bwd_kernel.cuh. No torch header.
//
// All warp-level, sm_80+: mma.sync.m16n8k16 (fp16 / bf16 in, fp32 accumulate) with operands
// from shared memory through ldmatrix (.trans for the operands stored k-major), two warp
// GEMMs built on them (gemm: both operands in shared memory; gemm_rs: A in registers), tiles
// copied from global memory with 16-byte cp.async (zero-filled past the ends; element-wise
// copies when rows are not 16-byte aligned), shared-memory rows padded by 16 bytes so that
// the 8 row addresses of an ldmatrix hit 8 different bank groups (no conflicts, no swizzle).
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16 x 16, row)  a[0] = (g, 2t..2t+1)  a[1] = (g+8, 2t..)  a[2] = (g, 2t+8..)  a[3] = (g+8, 2t+8..)
//   B (16 x 8, col)   b[0] = (k 2t..2t+1, n g)  b[1] = (k 2t+8.., n g)
//   C (16 x 8, f32)   c[0..1] = (g, 2t..2t+1)  c[2..3] = (g+8, 2t..2t+1)
// so the C fragments of two adjacent n-tiles, packed to 16 bits, are the A fragment of a
// 16-wide k-chunk: the P of S = Q K^T feeds P V without leaving registers (gemm_rs).
//
// Every kernel is instantiated per (dtype, head-dim bucket kD in {64, 128, 256}).
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

// ------------------------------------------------------------------------- warp GEMMs

// acc += A B for one warp: A 16 rows x kK (k-chunks of 16) in shared memory, row-major,
// read with ldsm_x4 from a_addr (lane_rm of the tile, at the warp's first row); B kNT
// n-tiles of 8 x kK in shared memory, n-major (s[n][k]), read with ldsm_x4 from b_addr
// (lane_nm of the tile, at its first n row). k-chunks at or past k_valid are skipped (their
// columns are zero-filled padding of the head-dim bucket).
template <typename T, int kK, int kLd, int kNT>
__device__ __forceinline__ void gemm(float (&acc)[kNT][4], uint32_t a_addr, uint32_t b_addr, int k_valid) {
  static_assert(kNT % 2 == 0, "gemm: n-tiles come in pairs (one ldsm_x4 holds two)");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    if (kk * 16 < k_valid) {
      uint32_t a[4];
      ldsm_x4(a, a_addr + off<kLd>(0, kk * 16));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, b_addr + off<kLd>(np * 16, kk * 16));
        mma<T>(acc[2 * np], a, bb[0], bb[1]);
        mma<T>(acc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
  }
}

// acc += A B for one warp, A in registers: the C fragments `c` of a 16 x (8 kKT) product
// (P, dS, ...) packed to T by c_to_a, k-chunk kk from n-tiles 2 kk and 2 kk + 1; B kNT
// n-tiles of kKT * 8 x 8 in shared memory, k-major (s[k][n]), read with ldsm_x4_t from b_addr
// (lane_rm of the tile, at its first k row and first n column). n-tile pairs at or past
// n_valid columns are skipped.
template <typename T, int kLd, int kNT, int kKT>
__device__ __forceinline__ void gemm_rs(float (&acc)[kNT][4], const float (&c)[kKT][4], uint32_t b_addr,
                                        int n_valid) {
  static_assert(kNT % 2 == 0 && kKT % 2 == 0, "gemm_rs: tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < kKT / 2; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      if (np * 16 < n_valid) {
        uint32_t bb[4];
        ldsm_x4_t(bb, b_addr + off<kLd>(kk * 16, np * 16));
        mma<T>(acc[2 * np], a, bb[0], bb[1]);
        mma<T>(acc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
  }
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

}  // namespace fusedlayers::cuda::attn
