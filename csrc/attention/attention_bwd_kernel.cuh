// The CUDA attention backward kernels, included by attention_bwd_cuda.cu. No torch header.
//
// attention_dkdv_kernel  one block per (key block, KV head, batch); each warp owns 16 keys;
//     loops over the query heads of the GQA group and their query blocks (Q / dO tiles
//     double-buffered), recomputes P from lse; dK, dV in registers (in chunks of kDChunk
//     columns when kD = 256); writes dbias. Every dK, dV, dbias element has one writer:
//     deterministic.
// attention_dq_kernel    dQ in a second pass (deterministic, no atomics): one block per
//     query block, each warp owns 16 query rows and accumulates dQ = dS K in registers.
//     Accumulating dQ by atomics inside the dK / dV kernel instead would need more
//     registers there than it has at kD >= 128 without spilling, and would not be
//     deterministic.
// Tiles: DkdvTile, DqTile (attention_kernel_utils.cuh).
// Math (names as in fusedlayers/reference_backend.py):
//   P = exp(S - lse), dP = dropout(dO V^T), dS = P * (dP - Delta + dlse),
//   dV = dropout(P)^T dO, dK = scale * dS^T Q, dQ = scale * dS K, dbias = dS.
#pragma once

#include "attention/attention_kernel_utils.cuh"

namespace fusedlayers::cuda::attn {

// The row terms of query row r of head h: lse in natural units (+inf where the row saw no
// key or is past the end, so that P = 0 there) and Delta - dlse (0 past the end).
// P = exp2((S - lse) * log2(e)): subtracted first (see the forward), so that an lse near
// -FLT_MAX does not overflow.
__device__ __forceinline__ void row_terms(const AttentionParams& p, const Seq& sq, int b, int h, int r, float& lse_r,
                                          float& delta) {
  float l = INFINITY, d = 0.0f;
  if (r < sq.len_q) {
    const int64_t at = b * p.lse_bs + h * p.lse_hs + sq.q_start + r;
    const float lse = p.lse[at];
    l = lse == -INFINITY ? INFINITY : lse;
    d = p.delta[at];
  }
  lse_r = l;
  delta = d;
}

// The row terms of query rows m0 .. m0 + kBlockM of head h into shared memory.
template <int kBlockM>
__device__ __forceinline__ void load_row_terms(const AttentionParams& p, const Seq& sq, int b, int h, int m0,
                                               float* s_lse, float* s_delta) {
  for (int i = threadIdx.x; i < kBlockM; i += blockDim.x) {
    float lse_r, delta;
    row_terms(p, sq, b, h, m0 + i, lse_r, delta);
    s_lse[i] = lse_r;
    s_delta[i] = delta;
  }
}

// One score of a backward tile, query row r and key c: from the raw score s (q . k) and dp (dO . v) to
// P = exp(logit - lse) and dS = P * (dropout(dP) - Delta); s becomes dropout(P) (for dV), dS is returned.
template <typename T>
__device__ __forceinline__ float score_grad(const AttentionParams& p, const Seq& sq, int b, int h, int r, int c,
                                            bool check, bool keep, float inv_keep, float lse, float delta, float& s,
                                            float dp) {
  const float x = check ? masked_logit<T>(p, sq, b, h, r, c, s) : s * p.scale;
  const float prob = exp2f((x - lse) * kLog2e);
  s = prob;
  if (p.dropout_p > 0.0f) {
    dp = keep ? dp * inv_keep : 0.0f;
    s = keep ? prob * inv_keep : 0.0f;
  }
  return prob * (dp - delta);
}

// score_grad over every element of a warp's accumulator tiles: s (the raw q . k) becomes dropout(P), dp (dO . v)
// becomes dS. `pos` (a FragPos) maps (nt, e) to the element's (query r, key c); terms(nt, e, lse, delta) gives
// its row's lse and Delta; each(r, c, ds) sees every dS (the bias gradient).
template <typename T, int kTiles, bool kQueryRows, typename Terms, typename Each>
__device__ __forceinline__ void tile_score_grads(const AttentionParams& p, const Seq& sq, int b, int h,
                                                 FragPos<kQueryRows> pos, bool check, float inv_keep, Terms terms,
                                                 Each each, float (&s)[kTiles][4], float (&dp)[kTiles][4]) {
  const uint32_t keep_bits = dropout_bits<kTiles>(p, sq, b, h, pos);
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int r, c;
      pos(nt, e, r, c);
      float lse, delta;
      terms(nt, e, lse, delta);
      const bool keep = (keep_bits >> (4 * nt + e)) & 1u;
      dp[nt][e] = score_grad<T>(p, sq, b, h, r, c, check, keep, inv_keep, lse, delta, s[nt][e], dp[nt][e]);
      each(r, c, dp[nt][e]);
    }
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
    zero_acc(dk);
    zero_acc(dv);
    if (steps > 0) load_q_step(0, 0);
    cp_async_commit();

    for (int it = 0; it < steps; ++it) {
      const int h = hk * group + it / m_count, m0 = (m_first + it % m_count) * kBlockM, stage = it & 1;
      pipeline_step(it, steps, load_q_step);
      const uint32_t stage_off = stage * kStageBytes;
      const float* cLse = sLse + stage * kBlockM;
      const float* cDelta = sDelta + stage * kBlockM;

      // S^T = K Q^T and dP^T = V dO^T (16 keys x kBlockM queries per warp)
      float s[kMT][4], dp[kMT][4];
      gemm_s_dp<T, kD, kLd>(s, dp, k_a, q_b + stage_off, v_a, do_b + stage_off, p);

      // P^T = exp(S^T - lse), dS^T = P^T * (dP^T - Delta + dlse); s <- dropout(P)^T, dp <- dS^T
      const bool check = tile_needs_mask(p, sq, m0, n0, kBlockN);
      tile_score_grads<T>(
          p, sq, b, h, FragPos<false>{key_a, m0, tq}, check, inv_keep,
          [&](int nt, int e, float& lse, float& delta) {
            const int qi = nt * 8 + 2 * tq + (e % 2);  // the query's row in this step's block
            lse = cLse[qi];
            delta = cDelta[qi];
          },
          [&](int r, int key, float ds) {
            if (p.dbias != nullptr && c0 == 0 && r < sq.len_q && key < sq.len_k) {
              p.dbias[b * p.db_bs + h * p.db_hs + r * p.db_qs + key * p.db_ks] = ds;
            }
          },
          s, dp);

      // dV += dropout(P)^T dO and dK += dS^T Q, columns c0 .. c0 + kDChunk
      gemm_rs<T, kLd>(dv, s, do_bt + stage_off + off<kLd>(0, c0), p.head_dim_v - c0);
      gemm_rs<T, kLd>(dk, dp, q_bt + stage_off + off<kLd>(0, c0), p.head_dim - c0);

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

  const auto [h, b, hk, m0, warp, lane, tq, row_a, sq] = query_block<kBlockM>(p);
  if (m0 >= sq.len_q) return;

  const T* gQ = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + (sq.q_start + m0) * p.q_rs;
  const T* gdO = static_cast<const T*>(p.dout) + b * p.o_bs + h * p.o_hs + (sq.q_start + m0) * p.o_rs;
  const KvStream<T, kBlockM, kBlockN, kD, kThreads> load_kv(p, sq, b, hk, m0, sK, sV);
  const int n_blocks = load_kv.n_blocks;
  copy_tile<T, kBlockM, kD, kThreads>(sQ, gQ, p.q_rs, sq.len_q - m0, p.head_dim, p.aligned);
  copy_tile<T, kBlockM, kD, kThreads>(sdO, gdO, p.o_rs, sq.len_q - m0, p.head_dim_v, p.aligned);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  // this thread's row terms
  float lse_r[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) row_terms(p, sq, b, h, row_a + 8 * i, lse_r[i], delta[i]);
  const float inv_keep = p.dropout_p > 0.0f ? 1.0f / (1.0f - p.dropout_p) : 1.0f;

  float dq[kDT][4];
  zero_acc(dq);
  const uint32_t q_a = smem_u32(sQ) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t do_a = smem_u32(sdO) + lane_rm<kLd>(lane) + off<kLd>(warp * 16, 0);
  const uint32_t k_b = smem_u32(sK) + lane_nm<kLd>(lane), k_bt = smem_u32(sK) + lane_rm<kLd>(lane);
  const uint32_t v_b = smem_u32(sV) + lane_nm<kLd>(lane);
  constexpr uint32_t kStageBytes = off<kLd>(kBlockN, 0);

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    pipeline_step(j, n_blocks, load_kv);
    const uint32_t stage_off = (j & 1) * kStageBytes;

    // S = Q K^T, dP = dO V^T
    float s[kNT][4], dp[kNT][4];
    gemm_s_dp<T, kD, kLd>(s, dp, q_a, k_b + stage_off, do_a, v_b + stage_off, p);

    // dS = P * (dropout(dP) - Delta + dlse)
    const bool check = tile_needs_mask(p, sq, m0, n0, kBlockN);
    tile_score_grads<T>(
        p, sq, b, h, FragPos<true>{row_a, n0, tq}, check, inv_keep,
        [&](int, int e, float& lse, float& d) {
          lse = lse_r[e / 2];  // rows row_a, row_a + 8
          d = delta[e / 2];
        },
        [](int, int, float) {}, s, dp);  // s: dropout(P), which dQ does not use

    // dQ += dS K
    gemm_rs<T, kLd>(dq, dp, k_bt + stage_off, p.head_dim);
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
