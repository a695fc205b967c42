// The CPU GEMMs: our AVX-512, AVX512-BF16 and AMX tiles and the wrappers over the BLAS torch links (cpu_gemm.h).
#include "common/cpu_gemm.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FUSEDLAYERS_BF16_GEMM 1
#if __GNUC__ >= 11  // AMX intrinsics
#define FUSEDLAYERS_AMX_GEMM 1
#endif
#endif

extern "C" {
// Fortran BLAS and MKL's CBLAS extensions, weak: null when libtorch_cpu does not export them.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace fusedlayers::cpu {
namespace {

#ifdef FUSEDLAYERS_BF16_GEMM
// Rows of an output tile (the tiles are kMr x 32; a remainder of 4 rows or more takes a 4-row tile, fewer rows run
// one at a time).
constexpr int kMr = 8;

bool use_f32_tiles();
void bf16_packed_product(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                         const uint16_t* bp, int64_t panel, float beta, float* c, int64_t ldc, float* row_max);
bool use_amx();
void amx_few_rows_bt(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                     int64_t ldb, float beta, float* c, int64_t ldc);
void gemm_f32_tiles(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Prefetch& ahead);
#endif

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

template <typename T>
void gemm_loop(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (int64_t p = 0; p < k; ++p) {
        const float av = static_cast<float>(ta ? a[p * lda + i] : a[i * lda + p]);
        const float bv = static_cast<float>(tb ? b[j * ldb + p] : b[p * ldb + j]);
        acc += av * bv;
      }
      float& out = c[i * ldc + j];
      out = alpha * acc + (beta == 0.0f ? 0.0f : beta * out);
    }
  }
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Prefetch& ahead) {
  if (m == 0 || n == 0) return;
#ifdef FUSEDLAYERS_BF16_GEMM
  // A product of fewer than 4 rows with B in place (P V in decoding one query per head) would run row by row over B
  // packed for it: the BLAS. With B transposed (Q K^T) it stays on the tiles, so that the scores of every
  // product with the same rows are the same bits (the attention backward recomputes the forward's P from them).
  if (use_f32_tiles() && (m >= 4 || tb || sgemm_ == nullptr)) {
    return gemm_f32_tiles(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ahead);
  }
#endif
  if (sgemm_ == nullptr) return gemm_loop(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&opb, &opa, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

namespace {

// MKL's low-precision GEMM (cblas_gemm_bf16bf16f32 or cblas_gemm_f16f16f32), row-major.
using LowpGemm = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                          float*, int);

template <typename T>
bool gemm_lowp_with(LowpGemm fn, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a,
                    int64_t lda, const T* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (fn == nullptr) return false;
  if (m == 0 || n == 0) return true;
  fn(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m), static_cast<int>(n),
     static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
     reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
  return true;
}

}  // namespace

#ifdef FUSEDLAYERS_BF16_GEMM
namespace {

// C = alpha * op(A) op(B) + beta * C with bf16 operands on vdpbf16ps (AVX512-BF16): each instruction
// multiplies 16 pairs of bf16 (exact products in float32) and adds both into 16 float32 accumulators.
// B is packed into panels of 16 columns, pairs along k interleaved: panel[p][j][2] = (B[2p][j],
// B[2p+1][j]) (0 past k), so that one 64-byte load holds pair p of 16 columns. A is read in place as
// 32-bit pairs (row-major, op(A) = A) or packed to [p][i][2] likewise (op(A) = A^T). Tiles of kMr rows x
// 32 columns (16 accumulator registers); a remainder of 4 rows or more takes a 4-row tile, fewer rows and a 16-column
// remainder the 1-row / 1-panel kernels.
// DAZ/FTZ: vdpbf16ps reads bf16 subnormals as 0 and writes float32 subnormals as 0.
#define FL_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define FL_F32_TARGET __attribute__((target("avx512f")))

// tile(mr, nv, i, j0, ncols) over C (m x n): rows in tiles of kMr (then one of 4 rows where 4 or more are left, the
// rest one at a time), columns in tiles of 32 (nv = 2; a remainder of 16 or fewer: nv = 1); mr and nv as
// std::integral_constant.
template <typename Tile>
inline void for_each_tile(int64_t m, int64_t n, Tile tile) {
  using One = std::integral_constant<int, 1>;
  using Four = std::integral_constant<int, 4>;
  using Mr = std::integral_constant<int, kMr>;
  using Two = std::integral_constant<int, 2>;
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int ncols = static_cast<int>(std::min<int64_t>(32, n - j0));
    int64_t i = 0;
    if (ncols > 16) {
      for (; i + kMr <= m; i += kMr) tile(Mr(), Two(), i, j0, ncols);
      if (i + 4 <= m) tile(Four(), Two(), i, j0, ncols), i += 4;
      for (; i < m; ++i) tile(One(), Two(), i, j0, ncols);
    } else {
      for (; i + kMr <= m; i += kMr) tile(Mr(), One(), i, j0, ncols);
      if (i + 4 <= m) tile(Four(), One(), i, j0, ncols), i += 4;
      for (; i < m; ++i) tile(One(), One(), i, j0, ncols);
    }
  }
}

// C[r][16 v + j] = alpha * acc[r][v][j] + beta * C[...] for the first ncols columns (beta 0: C is not read);
// with row_max (16 floats per row), row_max[16 r + l] = max(itself, the stored C[r][16 v + l]) (_mm512_max_ps: a
// NaN may be dropped).
template <int MR, int NV>
FL_F32_TARGET inline void store_tile(const __m512 (&acc)[MR][NV], float alpha, float beta, float* c, int64_t ldc,
                                     int ncols, float* row_max) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  __mmask16 cols[NV];
  for (int v = 0; v < NV; ++v) {
    const int left = ncols - 16 * v;
    cols[v] = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
  }
  for (int r = 0; r < MR; ++r) {
    __m512 mx = row_max != nullptr ? _mm512_loadu_ps(row_max + kRowMaxLanes * r) : _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      float* out = c + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.0f) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(cols[v], out), vb, x);
      _mm512_mask_storeu_ps(out, cols[v], x);
      if (row_max != nullptr) mx = _mm512_mask_max_ps(mx, cols[v], mx, x);
    }
    if (row_max != nullptr) _mm512_storeu_ps(row_max + kRowMaxLanes * r, mx);
  }
}

// The cache lines of a Prefetch, handed out one every `every` k-steps of the tiles of a product (prefetcht1).
// Addresses are integers: a row's first line may begin before the row, and no pointer is formed past the rows.
class LineCursor {
 public:
  LineCursor(const Prefetch& ahead, int64_t every)
      : row_(reinterpret_cast<uintptr_t>(ahead.base)), rows_left_(ahead.base != nullptr ? ahead.rows : 0),
        row_bytes_(ahead.row_bytes), stride_(ahead.stride), every_(std::max<int64_t>(every, 1)), countdown_(every_),
        line_(row_ & ~uintptr_t{63}) {}
  bool done() const { return rows_left_ <= 0; }
  FL_F32_TARGET void tick() {
    if (--countdown_ > 0 || rows_left_ <= 0) return;
    countdown_ = every_;
    _mm_prefetch(reinterpret_cast<const char*>(line_), _MM_HINT_T1);
    line_ += 64;
    if (line_ >= row_ + static_cast<uintptr_t>(row_bytes_) && --rows_left_ > 0) {
      row_ += static_cast<uintptr_t>(stride_);
      line_ = row_ & ~uintptr_t{63};
    }
  }

 private:
  uintptr_t row_;
  int64_t rows_left_, row_bytes_, stride_, every_, countdown_;
  uintptr_t line_;
};

// k-steps per FMA chain of the float32 tile: a longer run of k (up to kKc) sums its chains in order, so that the
// rounding error of a product of depth k grows with kChainSteps + k / kChainSteps rather than with k. Each element's
// operations and their order are the same whatever the tile's shape and B's layout: products of the same rows give
// the same bits.
constexpr int64_t kChainSteps = 64;

// The float32 tile: C (MR x 16 NV) from op(A) (element (r, p) at a[r * a_rs + p * a_ks]) and B's panels of 16
// columns, `panel` apart, row p of a panel at p * b_ks (packed: panels [k][16], b_ks 16; B in place: b_ks ldb).
// With PF, one tick of pf per k-step.
template <int MR, int NV, bool PF>
FL_F32_TARGET void f32_tile(int64_t k, const float* a, int64_t a_rs, int64_t a_ks, const float* bp, int64_t panel,
                            int64_t b_ks, float alpha, float beta, float* c, int64_t ldc, int ncols, float* row_max,
                            LineCursor* pf) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  alignas(64) float folded[MR][NV][16];  // the sum of the chains before the current one
  for (int64_t p0 = 0; p0 < k; p0 += kChainSteps) {
    const int64_t p1 = std::min(k, p0 + kChainSteps);
    for (int64_t p = p0; p < p1; ++p) {
      if constexpr (PF) pf->tick();
      __m512 bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bp + v * panel + p * b_ks);
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * a_rs + p * a_ks]);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
      }
    }
    if (p0 > 0) {  // the chains before this one, then this one
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_add_ps(_mm512_load_ps(folded[r][v]), acc[r][v]);
    }
    if (p1 < k) {
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) _mm512_store_ps(folded[r][v], acc[r][v]), acc[r][v] = _mm512_setzero_ps();
    }
  }
  store_tile<MR, NV>(acc, alpha, beta, c, ldc, ncols, row_max);
}

// words[16 p + j] = the 32-bit word p of row j (row j at b0 + j * row_bytes) for p < np, j < nj (0 for j >= nj):
// 16 words of 16 rows at a time, transposed in registers (in-lane unpacks of 32 and 64 bits, then two 128-bit lane
// shuffles).
FL_F32_TARGET void transpose_words(const char* b0, int64_t row_bytes, int64_t nj, int64_t np, uint32_t* words) {
  for (int64_t p0 = 0; p0 < np; p0 += 16) {
    const int64_t left = std::min<int64_t>(16, np - p0);
    const __mmask16 live = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
    __m512i r[16], t[16];
    for (int j = 0; j < 16; ++j) {
      r[j] = j < nj ? _mm512_maskz_loadu_epi32(live, b0 + j * row_bytes + 4 * p0) : _mm512_setzero_si512();
    }
    // t[2i], t[2i + 1]: per 128-bit lane, words (0, 1) and (2, 3) of rows 2i and 2i + 1, interleaved
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // r[4g + c]: per 128-bit lane L, word 4L + c of rows 4g .. 4g + 3
    for (int g = 0; g < 4; ++g) {
      r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
      r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
      r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
      r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    // word 4L + c of all 16 rows: lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
    for (int c = 0; c < 4; ++c) {
      const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
      const __m512i v2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
      const __m512i v3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
      t[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
      t[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
      t[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
      t[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
    for (int64_t p = 0; p < left; ++p) _mm512_storeu_si512(words + (p0 + p) * 16, t[p]);
  }
}

// B (k x n after op) into float32 panels [k][16].
FL_F32_TARGET void pack_b_f32(bool tb, int64_t n, int64_t k, const float* b, int64_t ldb, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    float* panel = out + (j0 / 16) * k * 16;
    const int64_t nj = std::min<int64_t>(16, n - j0);
    const __mmask16 live = nj >= 16 ? __mmask16(0xffff) : __mmask16((1u << nj) - 1u);
    if (!tb) {  // B stored k x n: row p's 16 columns
      for (int64_t p = 0; p < k; ++p) _mm512_storeu_ps(panel + p * 16, _mm512_maskz_loadu_ps(live, b + p * ldb + j0));
    } else {  // B^T stored n x k: element p of 16 rows
      transpose_words(reinterpret_cast<const char*>(b + j0 * ldb), 4 * ldb, nj, k, reinterpret_cast<uint32_t*>(panel));
    }
  }
}

// Depth of one pass over k: each pass sums kKc products in registers and adds them to C, which keeps a long
// k's rounding error near a BLAS's (one chain of 512 FMAs drifts about twice as far).
constexpr int64_t kKc = 128;

// C = alpha * op(A) B + beta * C, B in panels as f32_tile reads them (b_ks: the row stride within a panel); pf
// (or null) ticks once per k-step of every tile.
FL_F32_TARGET void f32_product(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                               const float* bp, int64_t panel, int64_t b_ks, float beta, float* c, int64_t ldc,
                               float* row_max, LineCursor* pf = nullptr) {
  const int64_t a_rs = ta ? 1 : lda, a_ks = ta ? lda : 1;
  if (k > kKc) {  // C = alpha * (first kKc) + beta * C, then C += alpha * (each next kKc); row_max on the last
    for (int64_t p0 = 0; p0 < k; p0 += kKc) {
      f32_product(ta, m, n, std::min(kKc, k - p0), alpha, a + p0 * a_ks, lda, bp + p0 * b_ks, panel, b_ks,
                  p0 == 0 ? beta : 1.0f, c, ldc, p0 + kKc >= k ? row_max : nullptr, pf);
    }
    return;
  }
  const bool prefetch = pf != nullptr && !pf->done();
  for_each_tile(m, n, [&](auto mr, auto nv, int64_t i, int64_t j0, int ncols) {
    constexpr int MR = decltype(mr)::value, NV = decltype(nv)::value;
    float* const rm = row_max != nullptr ? row_max + kRowMaxLanes * i : nullptr;
    const float* const b = bp + (j0 / 16) * panel;
    if (prefetch) {
      f32_tile<MR, NV, true>(k, a + i * a_rs, a_rs, a_ks, b, panel, b_ks, alpha, beta, c + i * ldc + j0, ldc, ncols,
                             rm, pf);
    } else {
      f32_tile<MR, NV, false>(k, a + i * a_rs, a_rs, a_ks, b, panel, b_ks, alpha, beta, c + i * ldc + j0, ldc,
                              ncols, rm, nullptr);
    }
  });
}

template <int MR, int NV>
FL_BF16_TARGET void bf16_tile(int64_t k, const char* a, int64_t a_rs, int64_t a_ps, const uint16_t* bp,
                              int64_t panel, float alpha, float beta, float* c, int64_t ldc, int ncols,
                              float* row_max) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t k2 = k / 2;
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bp + v * panel + p * 32);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * a_rs + p * a_ps, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  if (k & 1) {  // the last pair holds one element of A (the other half 0) against a 0-padded B
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bp + v * panel + k2 * 32);
    for (int r = 0; r < MR; ++r) {
      uint16_t last;
      std::memcpy(&last, a + r * a_rs + k2 * a_ps, 2);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(last));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  store_tile<MR, NV>(acc, alpha, beta, c, ldc, ncols, row_max);
}

// out[2i], out[2i + 1] = r0[i], r1[i] for i < n (r1 null: 0), 16 pairs at a time; pad: the last group is
// written whole (0 past n), as a panel wants.
FL_BF16_TARGET void interleave_rows(const uint16_t* r0, const uint16_t* r1, int64_t n, uint16_t* out, bool pad) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = std::min<int64_t>(16, n - i);
    const __mmask16 in = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
    const __m256i x0 = _mm256_maskz_loadu_epi16(in, r0 + i);
    const __m256i x1 = r1 != nullptr ? _mm256_maskz_loadu_epi16(in, r1 + i) : _mm256_setzero_si256();
    const __m512i pairs = _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1));
    const __mmask32 st = pad || left >= 16 ? ~__mmask32(0) : __mmask32((1u << (2 * left)) - 1u);
    _mm512_mask_storeu_epi16(out + 2 * i, st, pairs);
  }
}

// B (k x n after op) into panels (see above); out holds ceil(n / 16) * ceil(k / 2) * 32 elements. B stored k x n:
// rows 2p and 2p + 1 interleaved, 32 columns (two panels) at a time along the rows (unpacks of 16 bits within each
// 128-bit lane, then the quarters of the two panels gathered), the last 1-31 columns 16 at a time.
FL_BF16_TARGET void pack_b_bf16(bool tb, int64_t n, int64_t k, const uint16_t* b, int64_t ldb, uint16_t* out) {
  const int64_t kp = (k + 1) / 2;
  if (!tb) {
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const int64_t n32 = n / 32 * 32;
    for (int64_t p = 0; p < kp; ++p) {
      const uint16_t* r0 = b + 2 * p * ldb;
      const uint16_t* r1 = 2 * p + 1 < k ? r0 + ldb : nullptr;
      for (int64_t j0 = 0; j0 < n32; j0 += 32) {
        const __m512i x0 = _mm512_loadu_si512(r0 + j0);
        const __m512i x1 = r1 != nullptr ? _mm512_loadu_si512(r1 + j0) : _mm512_setzero_si512();
        const __m512i lo = _mm512_unpacklo_epi16(x0, x1), hi = _mm512_unpackhi_epi16(x0, x1);
        uint16_t* const dst = out + (j0 / 16) * kp * 32 + p * 32;
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(lo, first, hi));
        _mm512_storeu_si512(dst + kp * 32, _mm512_permutex2var_epi64(lo, second, hi));
      }
      for (int64_t j0 = n32; j0 < n; j0 += 16) {
        interleave_rows(r0 + j0, r1 != nullptr ? r1 + j0 : nullptr, std::min<int64_t>(16, n - j0),
                        out + (j0 / 16) * kp * 32 + p * 32, true);
      }
    }
    return;
  }
  for (int64_t j0 = 0; j0 < n; j0 += 16) {  // B^T stored n x k: pair p of column j is the 32-bit word p of row j
    uint16_t* panel = out + (j0 / 16) * kp * 32;
    const int64_t nj = std::min<int64_t>(16, n - j0);
    uint32_t* words = reinterpret_cast<uint32_t*>(panel);
    const uint16_t* b0 = b + j0 * ldb;
    transpose_words(reinterpret_cast<const char*>(b0), 2 * ldb, nj, k / 2, words);
    if (k & 1) {  // the last element alone: no read past the row
      for (int64_t jj = 0; jj < 16; ++jj) words[(kp - 1) * 16 + jj] = jj < nj ? b0[jj * ldb + k - 1] : 0u;
    }
  }
}

// A^T (A stored k x m) into pairs along k: out[p][i][2] = (A[2p][i], A[2p+1][i]), 0 past k.
FL_BF16_TARGET void pack_a_t(int64_t m, int64_t k, const uint16_t* a, int64_t lda, uint16_t* out) {
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    interleave_rows(a + 2 * p * lda, 2 * p + 1 < k ? a + (2 * p + 1) * lda : nullptr, m, out + p * m * 2, false);
  }
}

// C = alpha * op(A) bp + beta * C, bp packed by pack_b_bf16 (panels `panel` apart).
FL_BF16_TARGET void bf16_product(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                                 int64_t lda, const uint16_t* bp, int64_t panel, float beta, float* c, int64_t ldc,
                                 float* row_max) {
  thread_local AlignedVector<uint16_t> a_pack;  // grown once per thread, reused by every call
  const int64_t kp = (k + 1) / 2;
  const char* ap = reinterpret_cast<const char*>(a);
  int64_t a_rs = lda * 2, a_ps = 4;  // bytes from row to row and pair to pair
  if (ta) {
    a_pack.resize(static_cast<size_t>(kp * m * 2));
    pack_a_t(m, k, a, lda, a_pack.data());
    ap = reinterpret_cast<const char*>(a_pack.data());
    a_rs = 4;
    a_ps = m * 4;
  }
  for_each_tile(m, n, [&](auto mr, auto nv, int64_t i, int64_t j0, int ncols) {
    bf16_tile<decltype(mr)::value, decltype(nv)::value>(k, ap + i * a_rs, a_rs, a_ps, bp + (j0 / 16) * panel, panel,
                                                        alpha, beta, c + i * ldc + j0, ldc, ncols,
                                                        row_max != nullptr ? row_max + kRowMaxLanes * i : nullptr);
  });
}

void gemm_bf16_dp(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                  const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!ta && tb && m <= 16 && k >= 32 && use_amx()) return amx_few_rows_bt(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  thread_local AlignedVector<uint16_t> b_pack;  // grown once per thread, reused by every call
  const int64_t panel = (k + 1) / 2 * 32;
  b_pack.resize(static_cast<size_t>((n + 15) / 16 * panel));
  pack_b_bf16(tb, n, k, b, ldb, b_pack.data());
  bf16_packed_product(ta, m, n, k, alpha, a, lda, b_pack.data(), panel, beta, c, ldc, nullptr);
}

// FUSEDLAYERS_CPU_GEMM, read once: "blas" sends every product to torch's BLAS (for tests and comparisons); any
// other value, or none, runs float32 and bf16 on our tiles where the CPU has AVX-512 / AVX512-BF16.
const char* gemm_choice() {
  static const char* const choice = [] {
    const char* env = std::getenv("FUSEDLAYERS_CPU_GEMM");
    return env == nullptr ? "" : env;
  }();
  return choice;
}

// This CPU runs vdpbf16ps, and no BLAS is forced.
bool use_bf16_dp() {
  static const bool yes = __builtin_cpu_supports("avx512bf16") && std::strcmp(gemm_choice(), "blas") != 0;
  return yes;
}

// This CPU runs AVX-512, and no BLAS is forced.
bool use_f32_tiles() {
  static const bool yes = __builtin_cpu_supports("avx512f") && std::strcmp(gemm_choice(), "blas") != 0;
  return yes;
}

// AMX (Sapphire Rapids and later): tdpbf16ps multiplies a 16 x 32 bf16 tile of A by a 16 x (16 pairs) tile of B into
// a 16 x 16 float32 tile, pairs of products summed as vdpbf16ps sums them (DAZ / FTZ alike). A panel of the packing
// above is an AMX B tile as it lies: rows of 64 bytes, one per pair of k. Linux hands the tile state to a process
// that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM); where the CPU, the kernel or FUSEDLAYERS_CPU_GEMM (any value
// but the default) says no, bf16 runs on vdpbf16ps.
#ifdef FUSEDLAYERS_AMX_GEMM
#define FL_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

bool cpu_has_amx_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
  return (edx & (1u << 22)) != 0 && (edx & (1u << 24)) != 0;  // AMX-BF16, AMX-TILE
}

bool use_amx() {
  static const bool yes = [] {
    if (!use_bf16_dp() || gemm_choice()[0] != '\0' || !cpu_has_amx_bf16()) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return yes;
}

// The tile registers' shapes: 0-3 C (16 rows of 16 floats), 4-5 A (16 rows of 32 bf16), 6-7 B (16 pairs of 16
// columns): every one 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Steps of k per tile product.
constexpr int64_t kAmxK = 32;

// Where the tile loads of A find its rows [i, i + 16) at k-step p (a multiple of kAmxK): rows from tail_from in
// `tail` (16 rows, 0 past m), the others at base + i * row + p / kAmxK * step.
struct AmxA {
  const uint16_t* base;
  int64_t row, step, tail_from;
  const uint16_t* tail;
  int64_t k;
  const uint16_t* at(int64_t i, int64_t p) const { return i >= tail_from ? tail + p : base + i * row + p / kAmxK * step; }
  int64_t stride_bytes(int64_t i) const { return i >= tail_from ? 2 * k : 2 * row; }
};

// A block of C (16 rows from i0, 32 columns, or 16 without two_cols) summed into the tile registers C0, C1 (A in
// tile A, B in tiles 6, 7), from 0 or from C's own block at c_in (ldc floats from row to row). GCC's tile
// intrinsics take register numbers as literals: one function per set.
#define FL_AMX_BLOCK(name, C0, C1, A)                                                                        \
  FL_AMX_TARGET inline void name(const AmxA& a, int64_t i0, int64_t k, const uint16_t* b0, int64_t panel,   \
                                 bool two_cols, const float* c_in, int64_t ldc) {                           \
    if (c_in != nullptr) {                                                                                  \
      _tile_loadd(C0, c_in, ldc * 4);                                                                       \
      if (two_cols) _tile_loadd(C1, c_in + 16, ldc * 4);                                                    \
    } else {                                                                                                \
      _tile_zero(C0);                                                                                       \
      _tile_zero(C1);                                                                                       \
    }                                                                                                       \
    const int64_t sa = a.stride_bytes(i0);                                                                  \
    for (int64_t p = 0; p < k; p += kAmxK) {                                                                \
      _tile_loadd(A, a.at(i0, p), sa);                                                                      \
      _tile_loadd(6, b0 + p * 16, 64);                                                                      \
      _tile_dpbf16ps(C0, A, 6);                                                                             \
      if (two_cols) {                                                                                       \
        _tile_loadd(7, b0 + panel + p * 16, 64);                                                            \
        _tile_dpbf16ps(C1, A, 7);                                                                           \
      }                                                                                                     \
    }                                                                                                       \
  }
FL_AMX_BLOCK(amx_block0, 0, 1, 4)
FL_AMX_BLOCK(amx_block1, 2, 3, 5)
#undef FL_AMX_BLOCK

// A block's place in C; i0 < 0: none.
struct AmxBlock {
  int64_t i0 = -1, j0 = 0;
  int ncols = 0;
};

// C's rows of the block, from the tiles stored in out (16 x 16 floats each): alpha, beta and row_max as store_tile.
FL_AMX_TARGET void amx_finish(const float (*out)[16][16], const AmxBlock& blk, int64_t m, float alpha, float beta,
                              float* c, int64_t ldc, float* row_max) {
  if (blk.i0 < 0) return;
  const int64_t rows = std::min<int64_t>(16, m - blk.i0);
  for (int64_t r = 0; r < rows; ++r) {
    float* const c_row = c + (blk.i0 + r) * ldc + blk.j0;
    float* const rm = row_max != nullptr ? row_max + kRowMaxLanes * (blk.i0 + r) : nullptr;
    if (blk.ncols > 16) {
      const __m512 acc[1][2] = {{_mm512_load_ps(out[0][r]), _mm512_load_ps(out[1][r])}};
      store_tile<1, 2>(acc, alpha, beta, c_row, ldc, blk.ncols, rm);
    } else {
      const __m512 acc[1][1] = {{_mm512_load_ps(out[0][r])}};
      store_tile<1, 1>(acc, alpha, beta, c_row, ldc, blk.ncols, rm);
    }
  }
}

// C = alpha * op(A) bp + beta * C on the AMX tiles, k a multiple of kAmxK (the rest of a product takes
// bf16_product). A is read in place (row-major, op(A) = A) but for a last block of fewer than 16 rows, which is copied
// into 16 rows (0 past m); op(A) = A^T is staged as tiles: pairs along k (pack_a_t), then per 16 pairs the words of
// each row (transpose_words), 16 rows of 64 bytes apart.
FL_AMX_TARGET void amx_product(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                               int64_t lda, const uint16_t* bp, int64_t panel, float beta, float* c, int64_t ldc,
                               float* row_max) {
  thread_local AlignedVector<uint16_t> staged, pairs;  // grown once per thread, reused by every call
  const int64_t m16 = (m + 15) / 16 * 16, kp = k / 2;
  // A's rows [i, i + 16) for k-steps from p (a multiple of kAmxK): base and stride of the tile load
  const uint16_t* a_base = a;
  int64_t a_row = lda, a_step = kAmxK, a_tail_from = m / 16 * 16;  // elements from row to row, k-step to k-step
  if (ta) {
    pairs.resize(static_cast<size_t>(kp * m * 2));
    pack_a_t(m, k, a, lda, pairs.data());
    staged.resize(static_cast<size_t>(m16 * k));
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      uint16_t* const block = staged.data() + p0 * 2 * m16;
      transpose_words(reinterpret_cast<const char*>(pairs.data() + p0 * m * 2), m * 4, 16, m,
                      reinterpret_cast<uint32_t*>(block));
      std::fill(block + m * 32, block + m16 * 32, uint16_t{0});
    }
    a_base = staged.data(), a_row = 32, a_step = 32 * m16, a_tail_from = m16;
  } else if (m % 16 != 0) {
    staged.assign(static_cast<size_t>(16 * k), 0);
    for (int64_t r = 0; r < m % 16; ++r) std::memcpy(&staged[r * k], a + (a_tail_from + r) * lda, 2 * k);
  }
  const AmxA av{a_base, a_row, a_step, a_tail_from, staged.data(), k};
  TileConfig cfg;
  _tile_loadconfig(&cfg);
  // Blocks of 16 x 32 (C in 2 tile registers), two sets of registers taken in turn: while the AMX unit works on a
  // block, the vector units store the block before it (alpha, beta, row_max) from `out`; with none of those (direct)
  // a whole block's tiles are stored into C as they are.
  alignas(64) float out[2][2][16][16];
  AmxBlock pending[2];
  int set = 0;
  // direct: C = the tiles, or C += the tiles summed onto C's own block (beta 1), rounded per step as a float32 sum
  const bool direct = alpha == 1.0f && (beta == 0.0f || beta == 1.0f) && row_max == nullptr;
  for (int64_t i0 = 0; i0 < m; i0 += 16) {
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const int ncols = static_cast<int>(std::min<int64_t>(32, n - j0));
      const uint16_t* const b0 = bp + (j0 / 16) * panel;
      // a whole block without epilogue: its tiles summed from 0 or from C's block, stored into C as they are
      const bool in_place = direct && m - i0 >= 16 && ncols % 16 == 0;
      float* const c0 = c + i0 * ldc + j0;
      const float* const c_in = in_place && beta != 0.0f ? c0 : nullptr;
      float* const dst0 = in_place ? c0 : out[set][0][0];
      float* const dst1 = in_place ? c0 + 16 : out[set][1][0];
      const int64_t dst_stride = in_place ? ldc * 4 : 64;
      if (set == 0) {
        amx_block0(av, i0, k, b0, panel, ncols > 16, c_in, ldc);
        amx_finish(out[1], pending[1], m, alpha, beta, c, ldc, row_max);
        _tile_stored(0, dst0, dst_stride);
        if (ncols > 16) _tile_stored(1, dst1, dst_stride);
      } else {
        amx_block1(av, i0, k, b0, panel, ncols > 16, c_in, ldc);
        amx_finish(out[0], pending[0], m, alpha, beta, c, ldc, row_max);
        _tile_stored(2, dst0, dst_stride);
        if (ncols > 16) _tile_stored(3, dst1, dst_stride);
      }
      pending[1 - set] = AmxBlock{};
      pending[set] = in_place ? AmxBlock{} : AmxBlock{i0, j0, ncols};
      set = 1 - set;
    }
  }
  amx_finish(out[1 - set], pending[1 - set], m, alpha, beta, c, ldc, row_max);
  // Tiles released, and torch's own AMX GEMM told so: it keeps the tile configuration it last loaded per thread and
  // skips reloading it while that is current (at::native::cpublas::brgemm), which this product has just replaced.
  _tile_release();
  at::native::cpublas::brgemm_release();
}

#endif  // FUSEDLAYERS_AMX_GEMM

// C = alpha * op(A) bp + beta * C for bf16 on the fastest tiles this CPU has: AMX for the k-steps of kAmxK, the rest
// (and all of a product shorter than kAmxK) on vdpbf16ps, added to it.
void bf16_packed_product(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                         const uint16_t* bp, int64_t panel, float beta, float* c, int64_t ldc, float* row_max) {
#ifdef FUSEDLAYERS_AMX_GEMM
  const int64_t k_amx = use_amx() ? k / kAmxK * kAmxK : 0;
  if (k_amx > 0) {
    amx_product(ta, m, n, k_amx, alpha, a, lda, bp, panel, beta, c, ldc, k_amx == k ? row_max : nullptr);
    if (k_amx == k) return;
    a += ta ? k_amx * lda : k_amx;
    bp += k_amx * 16;
    k -= k_amx;
    beta = 1.0f;
  }
#endif
  bf16_product(ta, m, n, k, alpha, a, lda, bp, panel, beta, c, ldc, row_max);
}

#ifdef FUSEDLAYERS_AMX_GEMM
// C = alpha * A B^T + beta * C for few rows of A (m <= 16, B stored n x k, as K in decoding) on AMX as C^T = B A^T:
// B's rows are read in place as AMX A tiles, and A^T is one packed panel, so that B is never transposed (packing
// K^T for a product of a few rows cost more than the product). Each element of C is the same sum of the same pairs
// as in the product the other way round, and C^T is transposed into C 16 x 16 floats at a time.
FL_AMX_TARGET void amx_few_rows_bt(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                                   const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local AlignedVector<uint16_t> a_pack;  // grown once per thread, reused by every call
  thread_local AlignedVector<float> ct;
  const int64_t panel = (k + 1) / 2 * 32;
  a_pack.resize(static_cast<size_t>(panel));
  pack_b_bf16(true, m, k, a, lda, a_pack.data());
  ct.resize(static_cast<size_t>(n * 16));
  bf16_packed_product(false, n, m, k, alpha, b, ldb, a_pack.data(), panel, 0.0f, ct.data(), 16, nullptr);
  alignas(64) uint32_t block[16 * 16];
  const __m512 vb = _mm512_set1_ps(beta);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j0);
    transpose_words(reinterpret_cast<const char*>(ct.data() + j0 * 16), 64, nj, m, block);
    const __mmask16 live = nj >= 16 ? __mmask16(0xffff) : __mmask16((1u << nj) - 1u);
    for (int64_t i = 0; i < m; ++i) {
      float* const out = c + i * ldc + j0;
      __m512 x = _mm512_castsi512_ps(_mm512_load_si512(block + 16 * i));
      if (beta != 0.0f) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, out), vb, x);
      _mm512_mask_storeu_ps(out, live, x);
    }
  }
}
#else  // a compiler without AMX intrinsics: bf16 on vdpbf16ps
bool use_amx() { return false; }
void amx_few_rows_bt(int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint16_t*, int64_t, float,
                     float*, int64_t) {
  std::abort();
}
#endif  // FUSEDLAYERS_AMX_GEMM

// Rows up to which a product reads a B of whole panels (k x n stored, n a multiple of 16) in place: each tile
// then reads its rows of B once or twice, where packing would read and write them all first.
constexpr int64_t kInPlaceRows = 8;

// C = alpha * op(A) op(B) + beta * C in float32 on the AVX-512 tiles, B packed per call or read in place; the
// lines of `ahead` spread evenly over about the first half of the product's k-steps (so that the last have
// arrived by its end; a product of fewer steps than lines issues one a step and leaves the rest).
void gemm_f32_tiles(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Prefetch& ahead) {
  std::optional<LineCursor> pf;
  if (ahead.base != nullptr && ahead.rows > 0 && ahead.row_bytes > 0) {
    // about: the k-steps of tiles of kMr x 32 (a remainder of rows takes more, smaller tiles)
    const int64_t steps = (m + kMr - 1) / kMr * ((n + 31) / 32) * k;
    const int64_t lines = ahead.rows * ((ahead.row_bytes + 63) / 64 + 1);
    pf.emplace(ahead, steps / lines / 2);
  }
  LineCursor* const cursor = pf.has_value() ? &*pf : nullptr;
  if (!tb && n % 16 == 0 && m <= kInPlaceRows) {
    return f32_product(ta, m, n, k, alpha, a, lda, b, 16, ldb, beta, c, ldc, nullptr, cursor);
  }
  thread_local AlignedVector<float> b_pack;  // grown once per thread, reused by every call
  if (tb && m < 4) {  // few rows: each panel of B packed just before its product, in L1, the next one's rows fetched
    b_pack.resize(static_cast<size_t>(k * 16));
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, n - j0);
      for (int64_t j = j0 + 16; j < std::min(n, j0 + 32); ++j) {
        for (int64_t p = 0; p < k; p += 16) _mm_prefetch(reinterpret_cast<const char*>(b + j * ldb + p), _MM_HINT_T0);
      }
      pack_b_f32(true, nj, k, b + j0 * ldb, ldb, b_pack.data());
      f32_product(ta, m, nj, k, alpha, a, lda, b_pack.data(), k * 16, 16, beta, c + j0, ldc, nullptr, cursor);
    }
    return;
  }
  b_pack.resize(static_cast<size_t>((n + 15) / 16 * k * 16));
  pack_b_f32(tb, n, k, b, ldb, b_pack.data());
  f32_product(ta, m, n, k, alpha, a, lda, b_pack.data(), k * 16, 16, beta, c, ldc, nullptr, cursor);
}

// dst (rows x cols, dense) = float32(src) (rows x cols, leading dimension ld): fp16 converts exactly.
FL_F32_TARGET void half_to_float(const uint16_t* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* s = src + i * ld;
    float* d = dst + i * cols;
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16) {
      _mm512_storeu_ps(d + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j))));
    }
    for (; j < cols; ++j) d[j] = static_cast<float>(c10::Half(s[j], c10::Half::from_bits()));
  }
}

// fp16 products on the float32 tiles (this CPU has no fp16 dot product; AVX-512 has fp16 -> float32 conversion):
// op(A) and op(B) converted into this thread's scratch, then the float32 product, so each sum is the float32 one of
// exact products, as an fp16 x fp16 -> float32 GEMM gives. The conversion moves (m + n) k elements for m n k
// multiply-adds.
void gemm_f16_on_f32_tiles(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                           int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local AlignedVector<float> a32, b32;  // grown once per thread, reused by every call
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
  a32.resize(static_cast<size_t>(a_rows * a_cols));
  b32.resize(static_cast<size_t>(b_rows * b_cols));
  half_to_float(a, a_rows, a_cols, lda, a32.data());
  half_to_float(b, b_rows, b_cols, ldb, b32.data());
  gemm_f32_tiles(ta, tb, m, n, k, alpha, a32.data(), a_cols, b32.data(), b_cols, beta, c, ldc, Prefetch{});
}

}  // namespace
#endif

bool gemm_lowp(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a, int64_t lda,
               const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef FUSEDLAYERS_BF16_GEMM
  if (use_bf16_dp()) {
    if (m > 0 && n > 0) {
      gemm_bf16_dp(ta, tb, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                   reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
    }
    return true;
  }
#endif
  return gemm_lowp_with(cblas_gemm_bf16bf16f32, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool gemm_lowp(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a, int64_t lda,
               const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef FUSEDLAYERS_BF16_GEMM
  if (use_f32_tiles()) {
    if (m > 0 && n > 0) {
      gemm_f16_on_f32_tiles(ta, tb, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                            reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
    }
    return true;
  }
#endif
  return gemm_lowp_with(cblas_gemm_f16f16f32, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

#ifdef FUSEDLAYERS_BF16_GEMM
template <>
bool packs<float>() {
  return use_f32_tiles();
}
template <>
bool packs<c10::BFloat16>() {
  return use_bf16_dp();
}
template <>
void pack_b<float>(bool tb, int64_t n, int64_t k, const float* b, int64_t ldb, float* out) {
  pack_b_f32(tb, n, k, b, ldb, out);
}
template <>
void pack_b<c10::BFloat16>(bool tb, int64_t n, int64_t k, const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out) {
  pack_b_bf16(tb, n, k, reinterpret_cast<const uint16_t*>(b), ldb, reinterpret_cast<uint16_t*>(out));
}
template <>
void gemm_packed<float>(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                        const float* bp, int64_t panel, float beta, float* c, int64_t ldc, float* row_max) {
  if (m > 0 && n > 0) f32_product(ta, m, n, k, alpha, a, lda, bp, panel, 16, beta, c, ldc, row_max);
}
template <>
void gemm_packed<c10::BFloat16>(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
                                int64_t lda, const c10::BFloat16* bp, int64_t panel, float beta, float* c,
                                int64_t ldc, float* row_max) {
  if (m > 0 && n > 0) {
    bf16_packed_product(ta, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                        reinterpret_cast<const uint16_t*>(bp), panel, beta, c, ldc, row_max);
  }
}
#else  // no AVX-512 kernels in this build: packs<T>() is false and the rest is never called
template <>
bool packs<float>() { return false; }
template <>
bool packs<c10::BFloat16>() { return false; }
template <>
void pack_b<float>(bool, int64_t, int64_t, const float*, int64_t, float*) { std::abort(); }
template <>
void pack_b<c10::BFloat16>(bool, int64_t, int64_t, const c10::BFloat16*, int64_t, c10::BFloat16*) { std::abort(); }
template <>
void gemm_packed<float>(bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float,
                        float*, int64_t, float*) { std::abort(); }
template <>
void gemm_packed<c10::BFloat16>(bool, int64_t, int64_t, int64_t, float, const c10::BFloat16*, int64_t,
                                const c10::BFloat16*, int64_t, float, float*, int64_t, float*) { std::abort(); }
#endif

bool bf16_on_amx() {
#ifdef FUSEDLAYERS_BF16_GEMM
  return use_amx();
#else
  return false;
#endif
}

const char* gemm_backend() {
#ifdef FUSEDLAYERS_BF16_GEMM
  if (use_f32_tiles()) {
    if (use_amx()) return "fp32: AVX-512 tiles; bf16: AMX (tdpbf16ps); fp16: AVX-512 tiles (as float32)";
    return use_bf16_dp() ? "fp32: AVX-512 tiles; bf16: AVX512-BF16 (vdpbf16ps); fp16: AVX-512 tiles (as float32)"
                         : "fp32: AVX-512 tiles; fp16: AVX-512 tiles (as float32); bf16: torch's BLAS";
  }
  if (use_bf16_dp()) return "torch's BLAS (sgemm_, cblas_gemm_f16f16f32); bf16: AVX512-BF16 (vdpbf16ps)";
#endif
  if (sgemm_ == nullptr) return "loops (torch links no sgemm_)";
  return cblas_gemm_bf16bf16f32 != nullptr ? "torch's BLAS (sgemm_, cblas_gemm_bf16bf16f32, cblas_gemm_f16f16f32)"
                                           : "torch's BLAS (sgemm_)";
}

}  // namespace fusedlayers::cpu
