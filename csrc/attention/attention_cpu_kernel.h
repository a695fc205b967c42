// Fused attention on the CPU: forward and backward of softmax(scale * Q K^T + mask) V,
// FlashAttention-style, compiled per SIMD level (see common/cpu_capability_begin.h).
//
// Forward: one task per (sequence b, query head h, block of block_q query rows), spread
// over the OpenMP threads (dynamic schedule, causal blocks heaviest first). A task walks
// the key blocks of block_k keys its rows can see, from the left window edge of its first
// row to the causal diagonal / right window edge of its last (key_span: other blocks are
// skipped, so a sliding window of W keys costs O(N W); only the blocks that straddle an
// edge are masked element-wise) and keeps the online-softmax state of its rows
// (common/online_softmax.h):
//     S = scale * Q K_blk^T           GEMM (common/cpu_gemm.h)
//     S = softcap * tanh(S / softcap), S -= slope * |p(i) - j| (ALiBi), S += bias,
//     -inf where masked               at::vec row loops, mask read through its strides (score_row)
//     m_new = max(m, rowmax S); P = exp(S - m_new); l = alpha * l + rowsum P
//     O = alpha * O + dropout(P) V    GEMM (P in the inputs' dtype for fp16 / bf16)
// then out = O / l, lse = m + log l (0 and -inf for rows that saw no key). A key block on a causal / window
// edge runs its rows in runs of kEdgeRows, each over the keys it can see. Where the GEMMs have packed
// products (common/cpu_gemm.h: packs<T>) K^T and V of each (sequence, KV head) are packed once, before the
// tasks, for every query block that reads them.
//
// Backward: one task per (sequence b, KV head hk): it owns dK, dV of that head (float32
// accumulators, summed over the query heads of its GQA group in a fixed order) and the
// dQ of each of its query blocks, so no two threads ever write the same element:
// deterministic by construction, no atomics. For each query block and the key blocks of its
// key_span:
//     P  = exp(score(scale * Q K^T) - lse)          (score_row as in forward, recomputed from the
//                                                    saved lse; rows whose |lse| >= kLseExact: from
//                                                    their own max and sum)
//     dP = dropout(dO V^T)                           Delta_i = rowsum(dO_i * O_i)
//     dV += dropout(P)^T dO
//     dS = P * (dP - Delta + dlse)                   (dlse: lse's own gradient)
//     dbias += dS (in the mask's shape);  dS' = dS * (1 - tanh^2(raw / softcap)) with a softcap, else dS
//     dQ += scale * dS' K,  dK += scale * dS'^T Q
// With packed products, a task packs K^T, V^T and K of its KV head once and Q, dO of each query block once.
// The forward and the backward compute S with the same GEMM, so P = exp(S - lse) sees the forward's scores.
//
// Tiles (block_q x block_k, 256 x 512 by default) are chosen by the op glue
// (attention_cpu.cpp). fp16 / bf16 inputs go to the GEMM as they are (low-precision operands, float32
// accumulation), with P and dS rounded to the input dtype as FlashAttention does; everything else is float32.
// Dropout regenerates the Philox mask of (seed, element index) (common/philox.h).
// Checked by tests/test_attention.py and tests/test_cpu_kernels.py (backend "cpu"),
// benchmarked by benchmarks/bench_cpu.py.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/online_softmax.h"
#include "cpu/vec_utils.h"

namespace fusedlayers::cpu {
inline namespace CPU_CAPABILITY {
namespace attn {


// C (m x n, float32) = alpha * op(A) op(B) + beta * C for A, B in the inputs' dtype (common/cpu_gemm.h):
// low-precision operands where a GEMM takes them, else a float32 copy. `ahead`: gemm's Prefetch (float32).
template <typename T>
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* b,
        int64_t ldb, float beta, float* c, int64_t ldc, const Prefetch& ahead = {}) {
  if constexpr (std::is_same_v<T, float>) {
    gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ahead);
  } else {
    if (gemm_lowp(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
    const int64_t ra = ta ? k : m, ca = ta ? m : k, rb = tb ? n : k, cb = tb ? k : n;
    std::vector<float> af(ra * ca), bf(rb * cb);
    for (int64_t i = 0; i < ra; ++i) load_row(a + i * lda, ca, af.data() + i * ca);
    for (int64_t i = 0; i < rb; ++i) load_row(b + i * ldb, cb, bf.data() + i * cb);
    gemm(ta, tb, m, n, k, alpha, af.data(), ca, bf.data(), cb, beta, c, ldc);
  }
}

// gemm's Prefetch of `rows` rows of `cols` elements, `rs` elements apart, from `first` (none when null).
template <typename T>
Prefetch prefetch_rows(const T* first, int64_t rows, int64_t cols, int64_t rs) {
  const int64_t size = static_cast<int64_t>(sizeof(T));
  return {first, first != nullptr ? rows : 0, cols * size, rs * size};
}

// sum_d a[d] * b[d] in double.
inline double dot_double(const float* a, const float* b, int64_t n) {
  double acc = 0.0;
  for (int64_t d = 0; d < n; ++d) acc += static_cast<double>(a[d]) * b[d];
  return acc;
}

// |lse| from which the backward recomputes a row's max and sum instead of trusting lse: there
// a float32 lse is coarser than 2^-11, and past ~2^25 log(l) vanishes from it entirely.
constexpr float kLseExact = 4096.0f;

// Where sequence b starts and how long it is (dense: 0 and the full length).
struct Seq {
  int64_t q_start, len_q, k_start, len_k, shift;  // shift: causal diagonal offset
};

inline Seq seq_of(const AttentionParams& p, int64_t b) {
  Seq s{0, p.seqlen_q, 0, p.seqlen_k, 0};
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.len_q = p.cu_seqlens_q[b + 1] - s.q_start;
    s.k_start = p.cu_seqlens_k[b];
    s.len_k = p.cu_seqlens_k[b + 1] - s.k_start;
  }
  s.shift = p.bottom_right ? s.len_k - s.len_q : 0;
  return s;
}

// The keys row r (position in its sequence) may see: [row_lo, row_hi), empty when row_lo >=
// row_hi. Both are nondecreasing in r, so a block of rows [i0, i0 + mq) sees at most the keys
// [row_lo(i0), row_hi(i0 + mq - 1)) and every key in [row_lo(i0 + mq - 1), row_hi(i0)).
inline int64_t row_lo(const AttentionParams& p, const Seq& s, int64_t r) {
  if (p.window_left < 0) return 0;
  return std::clamp<int64_t>(r + s.shift - p.window_left, 0, s.len_k);
}

inline int64_t row_hi(const AttentionParams& p, const Seq& s, int64_t r) {
  int64_t hi = s.len_k;
  if (p.causal) hi = std::min(hi, r + s.shift + 1);
  if (p.window_right >= 0) hi = std::min(hi, r + s.shift + p.window_right + 1);
  return std::max<int64_t>(hi, 0);
}

// The key blocks of a query block: keys [first, end) in steps of block_k; a key block
// [kb, kb + nk) needs the causal / window rule element-wise iff it straddles an edge of some
// row's range (the diagonal blocks under causal, the two window edges).
struct KeySpan {
  int64_t first, end, lo_max, hi_min;
  bool edge(int64_t kb, int64_t nk) const { return kb < lo_max || kb + nk > hi_min; }
};

inline KeySpan key_span(const AttentionParams& p, const Seq& s, int64_t i0, int64_t mq) {
  return {row_lo(p, s, i0), row_hi(p, s, i0 + mq - 1), row_lo(p, s, i0 + mq - 1), row_hi(p, s, i0)};
}

// tanh(x) / x for |x| < kTanhNear as P(x^2): P of degree 5 with P(0) = 1, fitted to tanh(x) / x in relative error
// (8.4e-9 with the coefficients rounded to float32); x P(x^2) in float32 is within 1.2 ulp of tanh(x).
inline Vec tanh_over_x(const Vec& x2) {
  Vec p = at::vec::fmadd(x2, Vec(-5.70499618e-3f), Vec(2.06390955e-2f));
  p = at::vec::fmadd(p, x2, Vec(-5.37397191e-2f));
  p = at::vec::fmadd(p, x2, Vec(1.33314416e-1f));
  p = at::vec::fmadd(p, x2, Vec(-3.33332807e-1f));
  return at::vec::fmadd(p, x2, Vec(1.0f));
}

constexpr float kTanhNear = 0.625f;

// Whether every lane of a lies below b (false where one is NaN).
inline bool all_below(const Vec& a, float b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(a, _mm512_set1_ps(b), _CMP_LT_OQ) == 0xFFFF;
#else
  return (a < Vec(b)).zero_mask() == 0;
#endif
}

// tanh(x) into t and its derivative 1 - tanh(x)^2 into d, both within a few ulp of their own size. Where
// |x| < kTanhNear: x tanh_over_x(x^2) and d = 1 - t^2. Elsewhere r = 2 / (exp(2|x|) + 1) = 1 - |tanh(x)|,
// t = sign(x) (1 - r) and d = r (2 - r), which keeps d's relative accuracy where t rounds to +-1 and 1 - t^2
// would cancel. NaN gives NaN. Without kSlope, d is left alone (the forward needs only t). p is tanh_over_x(x^2),
// which the caller uses too.
template <bool kSlope>
inline void tanh_slope(const Vec& x, const Vec& p, Vec& t, Vec& d) {
  const Vec one(1.0f), two(2.0f), ax = x.abs();
  const Vec small = x * p, near = ax < Vec(kTanhNear);
  const Vec r = two / ((ax + ax).exp() + one);
  const Vec big = Vec::blendv(one - r, r - one, x < Vec(0.0f));
  t = Vec::blendv(big, small, near);
  if constexpr (kSlope) d = Vec::blendv(r * (two - r), one - small * small, near);
}

// s[j] = c * tanh(s[j] / c), and the derivative 1 - tanh^2(s[j] / c) in d[j] when d is not null; the row's tail
// through a partial vector, and s tanh_over_x((s / c)^2) wherever |s / c| < kTanhNear, so every score takes the
// same arithmetic. The vectors with every lane below kTanhNear go first, in a loop without the exp (whose call
// would make the loop keep its values on the stack); the others are left as they are and found again after it: a
// capped score has |c tanh(x) / c| < tanh(kTanhNear) = 0.555.
template <bool kSlope>
inline void softcap_row_impl(float* s, int64_t n, float c, float* d) {
  const Vec vc(c), inv(1.0f / c);
  auto near = [&](int64_t j, int64_t m) {  // false where a lane lies past kTanhNear
    const Vec raw = m == kVec ? Vec::loadu(s + j) : Vec::loadu(s + j, m), x = raw * inv;
    if (!all_below(x.abs(), kTanhNear)) return false;
    const Vec p = tanh_over_x(x * x);
    if constexpr (kSlope) {
      const Vec t = x * p;
      (Vec(1.0f) - t * t).store(d + j, m);
    }
    (raw * p).store(s + j, m);
    return true;
  };
  bool far = false;
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) far |= !near(j, kVec);
  if (j < n) far |= !near(j, n - j);
  if (!far) return;
  for (j = 0; j < n; j += kVec) {
    const int64_t m = std::min<int64_t>(kVec, n - j);
    const Vec raw = Vec::loadu(s + j, m), x = raw * inv;
    if (all_below(x.abs(), kTanhNear)) continue;
    const Vec p = tanh_over_x(x * x);
    Vec t, slope;
    tanh_slope<kSlope>(x, p, t, slope);
    if constexpr (kSlope) slope.store(d + j, m);
    Vec::blendv(t * vc, raw * p, x.abs() < Vec(kTanhNear)).store(s + j, m);
  }
}

inline void softcap_row(float* s, int64_t n, float c, float* d) {
  if (d != nullptr) {
    softcap_row_impl<true>(s, n, c, d);
  } else {
    softcap_row_impl<false>(s, n, c, nullptr);
  }
}

// Turns one row of raw scores s[0 .. nk) = scale * q_r . k_j, keys j = kb .. kb + nk of query
// row r (position in its sequence), into the scores of the softmax: softcap (its derivative
// 1 - tanh^2 into `cap` when not null), ALiBi, bias / bool mask, and, on an edge block, -inf outside the row's
// causal / window range.
template <typename T>
inline void score_row(const AttentionParams& p, const Seq& sq, int64_t b, int64_t h, int64_t r, int64_t kb,
                      int64_t nk, bool edge, float* s, float* cap) {
  if (p.softcap > 0.0f) softcap_row(s, nk, p.softcap, cap);
  if (p.alibi != nullptr) {
    const float slope = p.alibi[b * p.alibi_bs + h * p.alibi_hs];
    const int64_t d0 = r + sq.shift - kb;  // p(r) - key kb
    for (int64_t j = 0; j < nk; ++j) s[j] -= slope * static_cast<float>(std::abs(d0 - j));
  }
  if (p.mask_kind != 0) {
    const int64_t off = b * p.m_bs + h * p.m_hs + r * p.m_qs + kb * p.m_ks;
    if (p.mask_kind == 1) {
      const bool* m = static_cast<const bool*>(p.mask) + off;
      for (int64_t j = 0; j < nk; ++j) {
        if (!m[j * p.m_ks]) s[j] = -INFINITY;
      }
    } else if (p.mask_kind == 2) {
      const float* m = static_cast<const float*>(p.mask) + off;
      if (p.m_ks == 1) {
        int64_t j = 0;
        for (; j + kVec <= nk; j += kVec) (Vec::loadu(s + j) + Vec::loadu(m + j)).store(s + j);
        for (; j < nk; ++j) s[j] += m[j];
      } else {
        for (int64_t j = 0; j < nk; ++j) s[j] += m[j * p.m_ks];
      }
    } else {
      const T* m = static_cast<const T*>(p.mask) + off;
      for (int64_t j = 0; j < nk; ++j) s[j] += static_cast<float>(m[j * p.m_ks]);
    }
  }
  if (edge) {
    const int64_t lo = std::min(row_lo(p, sq, r) - kb, nk), hi = std::max<int64_t>(row_hi(p, sq, r) - kb, 0);
    for (int64_t j = 0; j < lo; ++j) s[j] = -INFINITY;
    for (int64_t j = hi; j < nk; ++j) s[j] = -INFINITY;
  }
}

// The query rows of one forward task: rows i0 .. i0 + mq of one head, or, in decode (Nq <= kDecodeRows), every
// row of each of the `heads` query heads of one KV head, stacked head-major (row g * mq + i: head h0 + g, row i),
// so that the group reads its K and V once.
struct TaskRows {
  int64_t b, h0, heads, i0, mq;
  int64_t count() const { return heads * mq; }
  int64_t head(int64_t i) const { return h0 + i / mq; }
  int64_t row(int64_t i) const { return i0 + i % mq; }  // position in the sequence
};

// Rows per run on a block that straddles a causal / window edge (the forward cuts such a block by rows).
constexpr int64_t kEdgeRows = 32;

// Nq up to which the forward runs as decode: query heads stacked per KV head, keys split across threads.
constexpr int64_t kDecodeRows = 16;

// Element types with packed products (common/cpu_gemm.h: gemm_packed).
template <typename T>
constexpr bool kPackable = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// pack_b, gemm_packed and packs for the element types that have them (kPackable); never reached for others.
template <typename T>
bool can_pack() {
  if constexpr (kPackable<T>) return packs<T>();
  return false;
}
template <typename T>
void pack_into(bool tb, int64_t n, int64_t k, const T* b, int64_t ldb, T* out) {
  if constexpr (kPackable<T>) pack_b<T>(tb, n, k, b, ldb, out);
}
template <typename T>
void mm_packed(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* bp,
               int64_t panel, float beta, float* c, int64_t ldc, float* row_max = nullptr) {
  if constexpr (kPackable<T>) gemm_packed<T>(ta, m, n, k, alpha, a, lda, bp, panel, beta, c, ldc, row_max);
}

// Whether a product over the keys [kb, kb + nk) of a packing of len_k keys reads it (packed_offset: whole
// panels of keys; bf16 pairs of keys).
template <typename T>
bool packed_keys(int64_t kb, int64_t nk, int64_t len_k) {
  return kb % 16 == 0 && (std::is_same_v<T, float> || nk % 2 == 0 || kb + nk == len_k);
}

// Whether a packed S = scale Q K^T is stored unscaled and each row scaled after (scale_row): bf16 on AMX at a head
// dim of whole AMX steps (32), where the product's own epilogue (scale, row max) costs several times the tile
// product and a product with none stores its tiles into S as they are. Each score is the same rounding of the same
// sum either way, forward and backward.
template <typename T>
bool scales_rows(int64_t D) {
  return std::is_same_v<T, c10::BFloat16> && D % 32 == 0 && bf16_on_amx();
}

// Largest packing of K and V the forward makes (beside the inputs) for its products; past it, each product packs
// its own block.
constexpr int64_t kPackBytes = int64_t{1} << 30;

// K^T (n = keys, k = D) and V (k = keys, n = Dv) of one (sequence, KV head), packed once for the products of all
// its query blocks; k null when the forward does not pack.
template <typename T>
struct PackedKV {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t k_panel = 0, v_panel = 0, len_k = 0;
  bool serves(int64_t kb, int64_t nk) const { return k != nullptr && packed_keys<T>(kb, nk, len_k); }
};

// The Philox index of the score of query row r and key j (positions in their sequence) of query head h.
inline uint64_t drop_index(const AttentionParams& p, const Seq& sq, int64_t b, int64_t h, int64_t r, int64_t j) {
  return static_cast<uint64_t>(p.drop_offset + b * p.drop_bs + h * p.drop_hs + (sq.q_start + r) * p.drop_rs +
                               sq.k_start + j);
}

// A forward thread's scratch for one key block of task_rows rows: S (block_k floats per row), then P; P in T for
// fp16 / bf16 (block_k per row); each row's lane-wise maximum of S (kRowMaxLanes floats per row).
template <typename T>
struct ForwardScratch {
  float* S;
  T* p_lowp;
  float* lane_max;
};

// One key block [kb, kb + nk) of a task: S = scale Q K^T, each row's scores (score_row), the online softmax
// (state), dropout, and O += P V (P in T for fp16 / bf16). Q: the task's rows, lda apart. Where score_row at most
// caps the product (no ALiBi or mask, a block inside every row's range) and the product is packed, the product's
// epilogue gives each row's max (capped by the same arithmetic: tanh is increasing). Unpacked in float32 (the
// AVX-512 tiles, 4 rows or more), the Q K^T product brings this block's V into the L2 cache and the P V product
// the K of the task's next next_nk keys (from kb + nk), so that the products that pack them read the cache rather
// than DRAM.
template <typename T>
void forward_block(const AttentionParams& p, const Seq& sq, const TaskRows& rows, const T* Q, int64_t lda,
                   const T* K, const T* V, const PackedKV<T>& kv, int64_t kb, int64_t nk, int64_t next_nk, bool edge,
                   const ForwardScratch<T>& scratch, float* o_acc, SoftmaxState* state) {
  const int64_t kBlockK = p.block_k, D = p.head_dim, Dv = p.head_dim_v, m = rows.count();
  constexpr bool lowp = !std::is_same_v<T, float>;
  float* const S = scratch.S;
  T* const p_lowp = scratch.p_lowp;
  const bool packed = kv.serves(kb, nk);
  const bool raw = !edge && p.alibi == nullptr && p.mask_kind == 0;
  const bool scale_rows = packed && scales_rows<T>(D);
  float* const lane_max = packed && raw && !scale_rows ? scratch.lane_max : nullptr;
  if (packed) {
    if (lane_max != nullptr) std::fill(lane_max, lane_max + m * kRowMaxLanes, -INFINITY);
    mm_packed<T>(false, m, nk, D, scale_rows ? 1.0f : p.scale, Q, lda, kv.k + packed_offset(kb, 0, kv.k_panel),
                 kv.k_panel, 0.0f, S, kBlockK, lane_max);
  } else {
    mm<T>(false, true, m, nk, D, p.scale, Q, lda, K + kb * p.k_rs, p.k_rs, 0.0f, S, kBlockK,
          prefetch_rows(V + kb * p.v_rs, nk, Dv, p.v_rs));
  }
  for (int64_t i = 0; i < m; ++i) {
    float* s = S + i * kBlockK;
    const int64_t h = rows.head(i), r = rows.row(i);
    float block_max = lane_max != nullptr ? row_max(lane_max + i * kRowMaxLanes, kRowMaxLanes) : 0.0f;
    bool have_max = lane_max != nullptr;
    if (scale_rows && raw) {  // (raw: score_row at most caps the scores, as for lane_max)
      block_max = scale_row_max(s, nk, p.scale);
      have_max = true;
    } else if (scale_rows) {
      scale_row(s, nk, p.scale);
    }
    score_row<T>(p, sq, rows.b, h, r, kb, nk, edge, s, nullptr);
    if (have_max && p.softcap > 0.0f) softcap_row(&block_max, 1, p.softcap, nullptr);
    // (-inf from the epilogue: the row is -inf but for NaN it may have dropped, so read the row itself)
    if (!have_max || block_max == -INFINITY) block_max = row_max(s, nk);
    SoftmaxState& st = state[i];
    const float m_new = softmax_new_max(st, block_max);
    if (m_new == -INFINITY) {  // nothing visible yet: P = 0
      std::fill(s, s + nk, 0.0f);
    } else {
      // (fp16 / bf16: the exp for rows that go on in 8 or 11 bits, as the backward recomputes P)
      const float alpha = softmax_update(st, m_new, exp_sub_sum<lowp>(s, nk, m_new));
      if (alpha != 1.0f) scale_row(o_acc + i * Dv, Dv, alpha);
      if (p.dropout_p > 0) {
        dropout_row(s, nk, p.seed, drop_index(p, sq, rows.b, h, r, kb), p.dropout_p, 1.0f / (1.0f - p.dropout_p));
      }
    }
    if constexpr (lowp) store_row(s, nk, p_lowp + i * kBlockK);  // P in T for the P V product
  }
  const T* P = lowp ? p_lowp : reinterpret_cast<const T*>(S);
  if (packed) {
    mm_packed<T>(false, m, Dv, nk, 1.0f, P, kBlockK, kv.v + packed_offset(0, kb, kv.v_panel), kv.v_panel, 1.0f, o_acc,
                 Dv);
  } else {
    mm<T>(false, false, m, Dv, nk, 1.0f, P, kBlockK, V + kb * p.v_rs, p.v_rs, 1.0f, o_acc, Dv,
          prefetch_rows(next_nk > 0 ? K + (kb + nk) * p.k_rs : nullptr, next_nk, D, p.k_rs));
  }
}

// out and lse of a task's rows from their accumulator and state.
template <typename T>
void forward_store(const AttentionParams& p, const Seq& sq, const TaskRows& rows, const float* o_acc,
                   const SoftmaxState* state) {
  const int64_t Dv = p.head_dim_v;
  for (int64_t i = 0; i < rows.count(); ++i) {
    const int64_t h = rows.head(i), r = sq.q_start + rows.row(i);
    T* o_row = static_cast<T*>(p.out) + rows.b * p.o_bs + h * p.o_hs + r * p.o_rs;
    if (state[i].l == 0.0f) {  // no allowed key: exactly 0, even where P V met a NaN / inf of v (0 * NaN)
      std::fill(o_row, o_row + Dv, T(0));
    } else {
      store_row(o_acc + i * Dv, Dv, o_row, softmax_inv_sum(state[i]));
    }
    p.lse[rows.b * p.lse_bs + h * p.lse_hs + r] = softmax_lse(state[i]);
  }
}

// Forward. Tasks: (sequence, query head, block of block_q query rows), or in decode (Nq <= kDecodeRows) (sequence,
// KV head, split of the keys): the query heads of a KV head stacked into one task (one read of K and V for the
// group), the keys of a row cut into `splits` ranges of whole key blocks when there would be fewer than two
// tasks per thread; each split leaves its rows' partial (O, m, l), merged by their maxima afterwards.
template <typename T>
void forward(const AttentionParams& p) {
  const int64_t kBlockK = p.block_k, D = p.head_dim, Dv = p.head_dim_v, group = p.heads_q / p.heads_kv;
  const bool decode = p.seqlen_q <= kDecodeRows;
  const int64_t kBlockQ = decode ? p.seqlen_q : p.block_q;            // rows per head and task
  const int64_t task_rows = decode ? group * p.seqlen_q : p.block_q;  // rows per task
  const int64_t heads = decode ? p.heads_kv : p.heads_q;
  const int64_t n_qblocks = decode ? 1 : (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t threads = at::get_num_threads(), key_blocks = (p.seqlen_k + kBlockK - 1) / kBlockK;
  const int64_t pairs = std::max<int64_t>(p.batch * heads, 1);  // (an empty batch has no task)
  const int64_t splits = decode ? std::max<int64_t>(1, std::min(key_blocks, 2 * threads / pairs)) : 1;
  const int64_t n_tasks = p.batch * heads * n_qblocks * splits;
  const T* qp = static_cast<const T*>(p.q);
  const T* kp = static_cast<const T*>(p.k);
  const T* vp = static_cast<const T*>(p.v);
  // split-KV partials: per task, each row's O accumulator and state
  auto part_o = aligned_array<float>(splits > 1 ? n_tasks * task_rows * Dv : 1);
  std::unique_ptr<SoftmaxState[]> part_st(new SoftmaxState[splits > 1 ? n_tasks * task_rows : 1]);
  // K and V packed once per (sequence, KV head) where several query blocks read them (per_head elements each)
  const int64_t k_panel = panel_stride<T>(D);
  const int64_t per_head =
      packed_size(p.seqlen_k, D, k_panel) + packed_size(Dv, p.seqlen_k, panel_stride<T>(p.seqlen_k));
  const bool prepack = !decode && n_qblocks > 1 && can_pack<T>() &&
                       p.batch * p.heads_kv * per_head * static_cast<int64_t>(sizeof(T)) <= kPackBytes;
  auto kv_pack = aligned_array<T>(prepack ? p.batch * p.heads_kv * per_head : 1);

// one thread when the scores are fewer than kParallelGrain
#pragma omp parallel num_threads(threads) \
    if (n_tasks > 1 && p.batch * p.heads_q * p.seqlen_q * p.seqlen_k >= kParallelGrain && !omp_in_parallel())
  {
    auto s_buf = aligned_array<float>(task_rows * kBlockK);  // S, then P
    auto o_buf = aligned_array<float>(task_rows * Dv);       // O accumulator
    auto p_lowp = aligned_array<T>(std::is_same_v<T, float> ? 1 : task_rows * kBlockK);  // P in T
    auto lane_max = aligned_array<float>(task_rows * kRowMaxLanes);
    const ForwardScratch<T> scratch{s_buf.get(), p_lowp.get(), lane_max.get()};
    auto q_stack = aligned_array<T>(decode && group > 1 ? task_rows * D : 1);  // decode: the group's rows
    std::vector<SoftmaxState> state(task_rows);

    if (prepack) {  // (the loop ends in a barrier: every packing is done before the first task)
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < p.batch * p.heads_kv; ++bh) {
        const int64_t b = bh / p.heads_kv, hk = bh % p.heads_kv;
        const Seq sq = seq_of(p, b);
        T* slot = kv_pack.get() + bh * per_head;
        pack_into<T>(true, sq.len_k, D, kp + b * p.k_bs + hk * p.k_hs + sq.k_start * p.k_rs, p.k_rs, slot);
        pack_into<T>(false, Dv, sq.len_k, vp + b * p.v_bs + hk * p.v_hs + sq.k_start * p.v_rs, p.v_rs,
                     slot + packed_size(p.seqlen_k, D, k_panel));
      }
    }

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t split = task % splits, qb = n_qblocks - 1 - task / splits % n_qblocks;  // heaviest first
      const int64_t bh = task / splits / n_qblocks, b = bh / heads, hh = bh % heads;
      const Seq sq = seq_of(p, b);
      const TaskRows rows{b, decode ? hh * group : hh, decode ? group : 1, qb * kBlockQ,
                          std::min(kBlockQ, sq.len_q - qb * kBlockQ)};
      float* o_acc = splits > 1 ? part_o.get() + task * task_rows * Dv : o_buf.get();
      SoftmaxState* st = splits > 1 ? part_st.get() + task * task_rows : state.data();
      std::fill(st, st + task_rows, softmax_init());
      if (rows.mq <= 0) continue;
      const int64_t hk = rows.h0 / group;
      PackedKV<T> kv;
      if (prepack) {
        const T* slot = kv_pack.get() + (b * p.heads_kv + hk) * per_head;
        kv = {slot, slot + packed_size(p.seqlen_k, D, k_panel), k_panel, panel_stride<T>(sq.len_k), sq.len_k};
      }
      const T* K = kp + b * p.k_bs + hk * p.k_hs + sq.k_start * p.k_rs;
      const T* V = vp + b * p.v_bs + hk * p.v_hs + sq.k_start * p.v_rs;
      const T* Q = qp + b * p.q_bs + rows.h0 * p.q_hs + (sq.q_start + rows.i0) * p.q_rs;
      int64_t lda = p.q_rs;
      if (rows.heads > 1) {  // the rows of different heads are not one stride apart: copy them
        for (int64_t i = 0; i < rows.count(); ++i) {
          const T* src = qp + b * p.q_bs + rows.head(i) * p.q_hs + (sq.q_start + rows.row(i)) * p.q_rs;
          std::copy(src, src + D, q_stack.get() + i * D);
        }
        Q = q_stack.get();
        lda = D;
      }
      std::fill(o_acc, o_acc + rows.count() * Dv, 0.0f);
      const KeySpan span = key_span(p, sq, rows.i0, rows.mq);
      // this split's key blocks: [first, end) cut into `splits` runs of whole blocks
      const int64_t span_blocks = (std::max(span.end - span.first, int64_t{0}) + kBlockK - 1) / kBlockK;
      const int64_t per_split = (span_blocks + splits - 1) / splits;
      const int64_t first = span.first + split * per_split * kBlockK;
      const int64_t end = std::min(span.end, first + per_split * kBlockK);
      for (int64_t kb = first; kb < end; kb += kBlockK) {
        const int64_t nk = std::min(kBlockK, end - kb);
        if (!span.edge(kb, nk) || rows.heads > 1 || rows.mq <= kEdgeRows) {
          const int64_t next_nk = std::min(kBlockK, std::max<int64_t>(end - kb - nk, 0));
          forward_block<T>(p, sq, rows, Q, lda, K, V, kv, kb, nk, next_nk, span.edge(kb, nk), scratch, o_acc, st);
          continue;
        }
        // A block on a causal / window edge: its rows in runs of kEdgeRows, each over the keys of [kb, kb + nk)
        // that its own rows can see (a causal diagonal block costs about half).
        for (int64_t r0 = 0; r0 < rows.mq; r0 += kEdgeRows) {
          const TaskRows run{rows.b, rows.h0, 1, rows.i0 + r0, std::min(kEdgeRows, rows.mq - r0)};
          const KeySpan rs = key_span(p, sq, run.i0, run.mq);
          const int64_t lo = std::max(kb, rs.first), hi = std::min(kb + nk, rs.end);
          if (lo >= hi) continue;  // no key of this block for these rows: their state stays
          forward_block<T>(p, sq, run, Q + r0 * lda, lda, K, V, kv, lo, hi - lo, 0, rs.edge(lo, hi - lo), scratch,
                           o_acc + r0 * Dv, st + r0);
        }
      }
      if (splits == 1) forward_store<T>(p, sq, rows, o_acc, st);
    }

    if (splits > 1) {  // merge each (sequence, KV head)'s splits (the loop above ends in a barrier)
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < p.batch * heads; ++bh) {
        const int64_t b = bh / heads;
        const Seq sq = seq_of(p, b);
        const TaskRows rows{b, bh % heads * group, group, 0, std::min(kBlockQ, sq.len_q)};
        float* o_acc = o_buf.get();
        for (int64_t i = 0; i < rows.count(); ++i) {
          SoftmaxState merged = softmax_init();
          for (int64_t s = 0; s < splits; ++s) merged = softmax_merge(merged, part_st[(bh * splits + s) * task_rows + i]);
          std::fill(o_acc + i * Dv, o_acc + (i + 1) * Dv, 0.0f);
          for (int64_t s = 0; s < splits && merged.m != -INFINITY; ++s) {
            const SoftmaxState& ps = part_st[(bh * splits + s) * task_rows + i];
            const float w = softmax_rescale(ps.m, merged.m);
            if (w == 0.0f) continue;  // a split that saw no key of this row adds nothing
            axpy_row(w, part_o.get() + ((bh * splits + s) * task_rows + i) * Dv, Dv, o_acc + i * Dv);
          }
          state[i] = merged;
        }
        forward_store<T>(p, sq, rows, o_acc, state.data());
      }
    }
  }
}

template <typename T>
void backward(const AttentionParams& p) {
  const int64_t kBlockQ = p.block_q, kBlockK = p.block_k;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, group = p.heads_q / p.heads_kv;
  const int64_t n_tasks = p.batch * p.heads_kv;
  const float inv_keep = p.dropout_p > 0 ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const T* qp = static_cast<const T*>(p.q);
  const T* kp = static_cast<const T*>(p.k);
  const T* vp = static_cast<const T*>(p.v);
  const T* outp = static_cast<const T*>(p.out);
  const T* doutp = static_cast<const T*>(p.dout);
  constexpr bool lowp = !std::is_same_v<T, float>;

// one thread when the scores are fewer than kParallelGrain
#pragma omp parallel num_threads(at::get_num_threads()) \
    if (n_tasks > 1 && p.batch * p.heads_q * p.seqlen_q * p.seqlen_k >= kParallelGrain && !omp_in_parallel())
  {
    const int64_t nk_max = p.seqlen_k;
    auto dk_acc = aligned_array<float>(nk_max * D);   // dK of this KV head, unscaled
    auto dv_acc = aligned_array<float>(nk_max * Dv);  // dV of this KV head
    auto dq_acc = aligned_array<float>(kBlockQ * D);  // dQ of one query block, unscaled
    auto P = aligned_array<float>(kBlockQ * kBlockK);   // P, then dropout(P)
    auto dP = aligned_array<float>(kBlockQ * kBlockK);  // dP, then dS
    auto t_buf = aligned_array<T>(lowp ? kBlockQ * kBlockK : 1);  // GEMM operand in T
    const bool softcap = p.softcap > 0.0f;
    auto cap = aligned_array<float>(softcap ? kBlockQ * kBlockK : 1);  // 1 - tanh^2(s / softcap)
    auto row_a = aligned_array<float>(std::max(D, Dv)), row_b = aligned_array<float>(std::max(D, Dv));
    std::vector<double> delta_d(kBlockQ);
    std::vector<float> lse(kBlockQ), delta(kBlockQ), dlse(kBlockQ), row_m(kBlockQ), row_inv_l(kBlockQ);
    std::vector<char> exact(kBlockQ);
    std::vector<SoftmaxState> stats(kBlockQ);
    // packed product operands (can_pack): K^T, V^T and K of the task's KV head, Q and dO of one query block
    const bool pack = can_pack<T>();
    const int64_t kt_panel = panel_stride<T>(D), vt_panel = panel_stride<T>(Dv);
    auto kt_pack = aligned_array<T>(pack ? packed_size(nk_max, D, kt_panel) : 1);
    auto vt_pack = aligned_array<T>(pack ? packed_size(nk_max, Dv, vt_panel) : 1);
    auto k_pack = aligned_array<T>(pack ? packed_size(D, nk_max, panel_stride<T>(nk_max)) : 1);
    auto q_pack = aligned_array<T>(pack ? packed_size(D, kBlockQ, panel_stride<T>(kBlockQ)) : 1);
    auto do_pack = aligned_array<T>(pack ? packed_size(Dv, kBlockQ, panel_stride<T>(kBlockQ)) : 1);

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      const Seq sq = seq_of(p, b);
      const T* K = kp + b * p.k_bs + hk * p.k_hs + sq.k_start * p.k_rs;
      const T* V = vp + b * p.v_bs + hk * p.v_hs + sq.k_start * p.v_rs;
      std::fill(dk_acc.get(), dk_acc.get() + sq.len_k * D, 0.0f);
      std::fill(dv_acc.get(), dv_acc.get() + sq.len_k * Dv, 0.0f);
      const int64_t k_panel = panel_stride<T>(sq.len_k);
      if (pack) {
        pack_into<T>(true, sq.len_k, D, K, p.k_rs, kt_pack.get());
        pack_into<T>(true, sq.len_k, Dv, V, p.v_rs, vt_pack.get());
        pack_into<T>(false, D, sq.len_k, K, p.k_rs, k_pack.get());
      }

      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < sq.len_q; i0 += kBlockQ) {
          const int64_t mq = std::min(kBlockQ, sq.len_q - i0);
          const int64_t row0 = sq.q_start + i0;  // first row in the packed tensors
          const T* Q = qp + b * p.q_bs + h * p.q_hs + row0 * p.q_rs;
          const T* dO = doutp + b * p.o_bs + h * p.o_hs + row0 * p.o_rs;
          std::fill(dq_acc.get(), dq_acc.get() + mq * D, 0.0f);
          const int64_t q_panel = panel_stride<T>(mq);
          if (pack) {
            pack_into<T>(false, D, mq, Q, p.q_rs, q_pack.get());
            pack_into<T>(false, Dv, mq, dO, p.o_rs, do_pack.get());
          }
          for (int64_t i = 0; i < mq; ++i) {
            const int64_t at = b * p.lse_bs + h * p.lse_hs + row0 + i;
            lse[i] = p.lse[at];
            dlse[i] = p.dlse[at];
            // Delta_i = sum_j P_ij dP_ij = dO_i . O_i (in double for the dominant keys, below)
            load_row(dO + i * p.o_rs, Dv, row_a.get());
            load_row(outp + b * p.o_bs + h * p.o_hs + (row0 + i) * p.o_rs, Dv, row_b.get());
            delta_d[i] = dot_double(row_a.get(), row_b.get(), Dv);
            delta[i] = static_cast<float>(delta_d[i]);
          }
          const KeySpan span = key_span(p, sq, i0, mq);
          // A row whose finite lse is large (a huge bias such as finfo.min padding) has lost
          // log(l) to float32 rounding, and P = exp(S - lse) would be off by up to the factor l:
          // its max m and sum l are recomputed from the same scores, and P = exp(S - m) / l.
          bool any_exact = false;
          for (int64_t i = 0; i < mq; ++i) {
            exact[i] = std::isfinite(lse[i]) && std::fabs(lse[i]) >= kLseExact;
            any_exact = any_exact || exact[i];
            stats[i] = softmax_init();
          }
          for (int64_t kb = span.first; any_exact && kb < span.end; kb += kBlockK) {
            const int64_t nk = std::min(kBlockK, span.end - kb);
            mm<T>(false, true, mq, nk, D, p.scale, Q, p.q_rs, K + kb * p.k_rs, p.k_rs, 0.0f, P.get(), kBlockK);
            const bool edge = span.edge(kb, nk);
            for (int64_t i = 0; i < mq; ++i) {
              if (!exact[i]) continue;
              float* s = P.get() + i * kBlockK;
              score_row<T>(p, sq, b, h, i0 + i, kb, nk, edge, s, nullptr);
              const float m_new = softmax_new_max(stats[i], row_max(s, nk));
              if (m_new != -INFINITY) softmax_update(stats[i], m_new, exp_sub_sum(s, nk, m_new));
            }
          }
          for (int64_t i = 0; any_exact && i < mq; ++i) row_m[i] = stats[i].m, row_inv_l[i] = softmax_inv_sum(stats[i]);
          for (int64_t kb = span.first; kb < span.end; kb += kBlockK) {
            const int64_t nk = std::min(kBlockK, span.end - kb);
            float* Pb = P.get();
            float* dPb = dP.get();
            const bool packed = pack && packed_keys<T>(kb, nk, sq.len_k);
            const bool scale_rows = packed && scales_rows<T>(D);
            if (packed) {
              mm_packed<T>(false, mq, nk, D, scale_rows ? 1.0f : p.scale, Q, p.q_rs,
                           kt_pack.get() + packed_offset(kb, 0, kt_panel), kt_panel, 0.0f, Pb, kBlockK);
              mm_packed<T>(false, mq, nk, Dv, 1.0f, dO, p.o_rs, vt_pack.get() + packed_offset(kb, 0, vt_panel),
                           vt_panel, 0.0f, dPb, kBlockK);
            } else {
              mm<T>(false, true, mq, nk, D, p.scale, Q, p.q_rs, K + kb * p.k_rs, p.k_rs, 0.0f, Pb, kBlockK);
              mm<T>(false, true, mq, nk, Dv, 1.0f, dO, p.o_rs, V + kb * p.v_rs, p.v_rs, 0.0f, dPb, kBlockK);
            }
            const bool edge = span.edge(kb, nk);
            for (int64_t i = 0; i < mq; ++i) {
              float* s = Pb + i * kBlockK;
              float* dp = dPb + i * kBlockK;
              float* slope = softcap ? cap.get() + i * kBlockK : nullptr;
              const int64_t r = i0 + i;
              if (lse[i] == -INFINITY) {  // the row saw no key: P = 0, dS = 0
                std::fill(s, s + nk, 0.0f);
                std::fill(dp, dp + nk, 0.0f);
                continue;
              }
              if (scale_rows) scale_row(s, nk, p.scale);
              score_row<T>(p, sq, b, h, r, kb, nk, edge, s, slope);
              if (exact[i]) {  // P = exp(S - m) / l
                exp_sub_sum<lowp>(s, nk, row_m[i]);
                scale_row(s, nk, row_inv_l[i]);
              } else {
                exp_sub_sum<lowp>(s, nk, lse[i]);  // P = exp(S - lse)
              }
              if (p.dropout_p > 0) dropout_row(dp, nk, p.seed, drop_index(p, sq, b, h, r, kb), p.dropout_p, inv_keep);
              // dS = P * (dP - Delta + dlse), into dp
              const Vec c(dlse[i] - delta[i]);
              int64_t j = 0;
              for (; j + kVec <= nk; j += kVec) {
                (Vec::loadu(s + j) * (Vec::loadu(dp + j) + c)).store(dp + j);
              }
              for (; j < nk; ++j) dp[j] = s[j] * (dp[j] + (dlse[i] - delta[i]));
              // A key with P_ij > 1/2 (one per row at most) has dP_ij close to Delta_i, and dP - Delta
              // would keep the rounding errors of both (where the reference's Delta, summed from the
              // same dP, cancels them): there dS comes from dP_ij and Delta_i in double, so a row with
              // one visible key gets dS = dlse exactly.
              for_each_above(s, nk, 0.5f, [&](int64_t jj) {
                load_row(dO + i * p.o_rs, Dv, row_a.get());
                load_row(V + (kb + jj) * p.v_rs, Dv, row_b.get());
                double dpd = dot_double(row_a.get(), row_b.get(), Dv);
                if (p.dropout_p > 0) {
                  dpd = dropout_keep(p.seed, drop_index(p, sq, b, h, r, kb + jj), p.dropout_p) ? dpd * inv_keep : 0.0;
                }
                dp[jj] = s[jj] * static_cast<float>(dpd - delta_d[i] + dlse[i]);
              });
              if (p.dbias != nullptr) {
                float* db = p.dbias + b * p.db_bs + h * p.db_hs + r * p.db_qs + kb * p.db_ks;
                for (int64_t jj = 0; jj < nk; ++jj) db[jj * p.db_ks] += dp[jj];
              }
              if (softcap) {  // the gradient of the raw score: dS * (1 - tanh^2)
                int64_t jj = 0;
                for (; jj + kVec <= nk; jj += kVec) (Vec::loadu(dp + jj) * Vec::loadu(slope + jj)).store(dp + jj);
                for (; jj < nk; ++jj) dp[jj] *= slope[jj];
              }
              if (p.dropout_p > 0) {  // dV uses the dropped P
                dropout_row(s, nk, p.seed, drop_index(p, sq, b, h, r, kb), p.dropout_p, inv_keep);
              }
            }
            // dV += dropout(P)^T dO, dQ += dS K, dK += dS^T Q (P and dS rounded to T for fp16 / bf16)
            auto operand = [&](const float* rows_f32) -> const T* {
              if constexpr (lowp) {
                for (int64_t i = 0; i < mq; ++i) store_row(rows_f32 + i * kBlockK, nk, t_buf.get() + i * kBlockK);
                return t_buf.get();
              } else {
                return rows_f32;
              }
            };
            const T* Pt = operand(Pb);
            if (pack) {
              mm_packed<T>(true, nk, Dv, mq, 1.0f, Pt, kBlockK, do_pack.get(), q_panel, 1.0f, dv_acc.get() + kb * Dv, Dv);
            } else {
              mm<T>(true, false, nk, Dv, mq, 1.0f, Pt, kBlockK, dO, p.o_rs, 1.0f, dv_acc.get() + kb * Dv, Dv);
            }
            const T* dSt = operand(dPb);
            if (packed) {
              mm_packed<T>(false, mq, D, nk, 1.0f, dSt, kBlockK, k_pack.get() + packed_offset(0, kb, k_panel), k_panel,
                           1.0f, dq_acc.get(), D);
            } else {
              mm<T>(false, false, mq, D, nk, 1.0f, dSt, kBlockK, K + kb * p.k_rs, p.k_rs, 1.0f, dq_acc.get(), D);
            }
            if (pack) {
              mm_packed<T>(true, nk, D, mq, 1.0f, dSt, kBlockK, q_pack.get(), q_panel, 1.0f, dk_acc.get() + kb * D, D);
            } else {
              mm<T>(true, false, nk, D, mq, 1.0f, dSt, kBlockK, Q, p.q_rs, 1.0f, dk_acc.get() + kb * D, D);
            }
          }
          T* dQ = static_cast<T*>(p.dq) + b * p.dq_bs + h * p.dq_hs + row0 * p.dq_rs;
          for (int64_t i = 0; i < mq; ++i) store_row(dq_acc.get() + i * D, D, dQ + i * p.dq_rs, p.scale);
        }
      }
      T* dK = static_cast<T*>(p.dk) + b * p.dk_bs + hk * p.dk_hs + sq.k_start * p.dk_rs;
      T* dV = static_cast<T*>(p.dv) + b * p.dv_bs + hk * p.dv_hs + sq.k_start * p.dv_rs;
      for (int64_t j = 0; j < sq.len_k; ++j) {
        store_row(dk_acc.get() + j * D, D, dK + j * p.dk_rs, p.scale);
        store_row(dv_acc.get() + j * Dv, Dv, dV + j * p.dv_rs);
      }
    }
  }
}

}  // namespace attn

inline void attention_fwd(const AttentionParams& p) {
  switch (p.dtype) {
    case DType::f32: return attn::forward<float>(p);
    case DType::f16: return attn::forward<c10::Half>(p);
    case DType::bf16: return attn::forward<c10::BFloat16>(p);
  }
}

inline void attention_bwd(const AttentionParams& p) {
  switch (p.dtype) {
    case DType::f32: return attn::backward<float>(p);
    case DType::f16: return attn::backward<c10::Half>(p);
    case DType::bf16: return attn::backward<c10::BFloat16>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedlayers::cpu
