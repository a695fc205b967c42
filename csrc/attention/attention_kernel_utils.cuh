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
// Every kernel is instantiated per (dtype, head-dim bucket kD in {64, 128, 256}); the tiles of
// every (kernel, bucket) are one table, kTileShapes, and one struct template, AttnTile.
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

// ---------------------------------------------------------------------------- tiles

// The three kernels: the forward, and the backward's dK / dV and dQ passes.
enum class Pass { kFwd, kDkdv, kDq };

// The tile choice of a (pass, head-dim bucket): warps per block, rows of the streamed side
// per loop step, and the output columns held in registers at a time.
struct TileShape {
  int warps, step, d_chunk;
};

// One table of every tile choice. Rows: forward (step = kBlockN keys), dK / dV (step =
// kBlockM queries; dK and dV in chunks of d_chunk columns, the query loop run
// kD / d_chunk times), dQ (step = kBlockN keys). Columns: head-dim buckets 64, 128, 256.
// The forward and dQ hold all kD columns of O / dQ (d_chunk = kD).
constexpr TileShape kTileShapes[3][3] = {
    {{4, 64, 64}, {8, 64, 128}, {8, 32, 256}},  // Pass::kFwd
    {{4, 32, 64}, {4, 16, 128}, {4, 16, 128}},  // Pass::kDkdv
    {{4, 64, 64}, {4, 64, 128}, {4, 32, 256}},  // Pass::kDq
};

constexpr TileShape tile_shape(Pass pass, int kD) {
  return kTileShapes[static_cast<int>(pass)][kD == 64 ? 0 : (kD == 128 ? 1 : 2)];
}

// The tile of a kernel: each of kWarps warps owns 16 rows of the block's own side (kRows:
// queries for the forward and dQ, keys for dK / dV), and each loop step copies kStep rows
// of the other side into one of two shared-memory stages. Shared memory, in this order:
// the own side's tiles (forward: Q; dK / dV: K, V; dQ: Q, dO), kRows x kLd each; the
// streamed tiles (forward, dQ: K, V; dK / dV: Q, dO), two stages of kStep x kLd each; dK /
// dV only: the float32 row terms lse and Delta, two stages of kStep each.
template <typename T, int kD, Pass kPass>
struct AttnTile {
  static_assert(kD == 64 || kD == 128 || kD == 256, "AttnTile: head-dim buckets are 64, 128 and 256");
  static constexpr TileShape kShape = tile_shape(kPass, kD);
  static constexpr int kWarps = kShape.warps, kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps, kStep = kShape.step, kDChunk = kShape.d_chunk;
  static constexpr int kBlockM = kPass == Pass::kDkdv ? kStep : kRows;  // queries per block / step
  static constexpr int kBlockN = kPass == Pass::kDkdv ? kRows : kStep;  // keys per step / block
  static_assert(kD % kDChunk == 0, "AttnTile: the column chunk must divide the head-dim bucket");
  static constexpr int kLd = kD + kPad;
  static constexpr int kOwnTiles = kPass == Pass::kFwd ? 1 : 2, kStreamedTiles = 2;
  static constexpr int kRowTerms = kPass == Pass::kDkdv ? 2 : 0;
  static constexpr int kSmem = (kOwnTiles * kRows + 2 * kStreamedTiles * kStep) * kLd * static_cast<int>(sizeof(T)) +
                               2 * kRowTerms * kStep * static_cast<int>(sizeof(float));
};
template <typename T, int kD>
using FwdTile = AttnTile<T, kD, Pass::kFwd>;
template <typename T, int kD>
using DkdvTile = AttnTile<T, kD, Pass::kDkdv>;
template <typename T, int kD>
using DqTile = AttnTile<T, kD, Pass::kDq>;

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

template <int kNT>
__device__ __forceinline__ void zero_acc(float (&acc)[kNT][4]) {
#pragma unroll
  for (int i = 0; i < kNT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

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

// The two products a backward tile starts from, into zeroed accumulators: s = A_s B_s over
// the head dim D (S = Q K^T, or S^T = K Q^T in the dK / dV pass) and dp = A_dp B_dp over Dv
// (dP = dO V^T, or dP^T = V dO^T). Addresses as for gemm.
template <typename T, int kK, int kLd, int kNT>
__device__ __forceinline__ void gemm_s_dp(float (&s)[kNT][4], float (&dp)[kNT][4], uint32_t s_a, uint32_t s_b,
                                          uint32_t dp_a, uint32_t dp_b, const AttentionParams& p) {
  zero_acc(s);
  zero_acc(dp);
  gemm<T, kK, kLd>(s, s_a, s_b, p.head_dim);
  gemm<T, kK, kLd>(dp, dp_a, dp_b, p.head_dim_v);
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

// The query block of a forward or dQ thread block (grid: query blocks in reverse order, so the heaviest
// causal blocks start first; query heads; sequences) and this thread's place in it: rows row_a and
// row_a + 8 of its warp's 16, tq its quad lane. The block has nothing to do when m0 >= sq.len_q.
struct QueryBlock {
  int h, b, hk, m0, warp, lane, tq, row_a;
  Seq sq;
};

template <int kBlockM>
__device__ __forceinline__ QueryBlock query_block(const AttentionParams& p) {
  QueryBlock qb;
  qb.h = blockIdx.y;
  qb.b = blockIdx.z;
  qb.hk = qb.h / (p.heads_q / p.heads_kv);
  qb.m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  qb.warp = threadIdx.x / 32;
  qb.lane = threadIdx.x % 32;
  qb.tq = qb.lane % 4;
  qb.row_a = qb.m0 + qb.warp * 16 + qb.lane / 4;
  qb.sq = seq_of(p, qb.b);
  return qb;
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

// (query r, key c) of element e of n-tile nt of a warp's S tile (C fragments: row g + (e / 2)
// * 8, column nt * 8 + 2 t + e % 2), the `rc` of dropout_bits. row_a: this thread's first
// row (g = lane / 4 included), col0: the tile's first column, tq = lane % 4. kQueryRows: the
// rows are queries and the columns keys (forward, dQ: S); else keys and queries (dK / dV: S^T).
template <bool kQueryRows>
struct FragPos {
  int row_a, col0, tq;
  __device__ __forceinline__ void operator()(int nt, int e, int& r, int& c) const {
    const int row = row_a + (e / 2) * 8, col = col0 + nt * 8 + 2 * tq + (e % 2);
    r = kQueryRows ? row : col;
    c = kQueryRows ? col : row;
  }
};

// Keep bits of a warp tile's accumulator elements under dropout: bit 4 * nt + e is element
// e of n-tile nt (<= 8 n-tiles), 1 = kept; every bit set when p.dropout_p is 0. `rc` maps
// (nt, e) to the element's (query r, key c): a FragPos. Computed in a loop that is not unrolled, so
// that only one copy of Philox is compiled and its registers are not multiplied by the
// tile size.
template <int kTiles, typename RowCol>
__device__ __forceinline__ uint32_t dropout_bits(const AttentionParams& p, const Seq& sq, int b, int h, RowCol rc) {
  static_assert(kTiles * 4 <= 32, "dropout_bits: at most 8 n-tiles");
  uint32_t bits = ~0u;
  if (p.dropout_p > 0.0f) {
    bits = 0;
#pragma unroll 1
    for (int idx = 0; idx < kTiles * 4; ++idx) {
      int r, c;
      rc(idx / 4, idx % 4, r, c);
      if (r < sq.len_q && c < sq.len_k && dropout_keep_one(p.seed, drop_index(p, sq, b, h, r, c), p.dropout_p)) {
        bits |= 1u << idx;
      }
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

// The streamed side of a forward or dQ block: the keys [0, n_end) that its query rows
// [m0, m0 + kBlockM) may see (KV head hk of sequence sq), n_blocks blocks of kBlockN keys.
// kv(j, stage) copies key block j of K and V into stage `stage` of sK and sV
// ([2][kBlockN][kLd] each; keys >= n_end zero).
template <typename T, int kBlockM, int kBlockN, int kD, int kThreads>
struct KvStream {
  const AttentionParams& p;
  T *sK, *sV;
  const T *gK, *gV;
  int n_end, n_blocks;

  __device__ __forceinline__ KvStream(const AttentionParams& p_, const Seq& sq, int b, int hk, int m0, T* sK_, T* sV_)
      : p(p_),
        sK(sK_),
        sV(sV_),
        gK(static_cast<const T*>(p_.k) + b * p_.k_bs + hk * p_.k_hs + sq.k_start * p_.k_rs),
        gV(static_cast<const T*>(p_.v) + b * p_.v_bs + hk * p_.v_hs + sq.k_start * p_.v_rs),
        n_end(key_end(p_, sq, m0, kBlockM)),
        n_blocks((n_end + kBlockN - 1) / kBlockN) {}

  __device__ __forceinline__ void operator()(int j, int stage) const {
    constexpr int kLd = kD + kPad;
    const int n0 = j * kBlockN;
    copy_tile<T, kBlockN, kD, kThreads>(sK + stage * kBlockN * kLd, gK + n0 * p.k_rs, p.k_rs, n_end - n0, p.head_dim,
                                        p.aligned);
    copy_tile<T, kBlockN, kD, kThreads>(sV + stage * kBlockN * kLd, gV + n0 * p.v_rs, p.v_rs, n_end - n0,
                                        p.head_dim_v, p.aligned);
  }
};

// Top of step `it` of a two-stage copy pipeline of `steps` steps (step it in stage it & 1,
// its copies committed): starts step it + 1's copies into the other stage through
// load(it + 1, stage), waits for step it's, and syncs the block.
template <typename Load>
__device__ __forceinline__ void pipeline_step(int it, int steps, Load&& load) {
  if (it + 1 < steps) {
    load(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
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
