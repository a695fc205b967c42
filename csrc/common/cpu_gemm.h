// Row-major GEMM on tiles for the CPU kernels: C (m x n) = alpha * op(A) op(B) + beta * C,
// op(X) = X or X^T, every matrix row-major with its leading dimension.
//
// bf16 runs on AMX (tdpbf16ps) where the CPU and the OS allow it, else on our AVX512-BF16 tiles (vdpbf16ps) where
// the CPU has them; float32 runs on our AVX-512 tiles (8 x 32, FMA) where it has AVX-512, and fp16 there too,
// converted to float32 per product. Otherwise the BLAS that torch itself links serves (MKL on x86-64 wheels: sgemm_,
// cblas_gemm_bf16bf16f32, cblas_gemm_f16f16f32, found as weak symbols of libtorch_cpu at load time), and where torch
// links none of them a plain loop (correct, slow). FUSEDLAYERS_CPU_GEMM=blas sends every product to the BLAS (for
// tests and comparisons), =avx512 keeps bf16 off AMX. Called from inside our OpenMP parallel regions, each call runs
// on the calling thread.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

namespace fusedlayers::cpu {

// Memory for the operands and scratch of the CPU kernels, 64-byte aligned: a 64-byte vector or AMX tile row then
// never spans two cache lines (AMX tile loads of rows that did took 3.7x as long; unaligned AVX-512 loads split too).
// aligned_array<T>(n): n elements left uninitialised, as new T[n] leaves them.
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;
inline void* aligned_bytes(size_t bytes) {
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64 * (bytes == 0));
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
template <typename T>
AlignedArray<T> aligned_array(int64_t n) {
  return AlignedArray<T>(static_cast<T*>(aligned_bytes(static_cast<size_t>(n) * sizeof(T))));
}
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(aligned_bytes(n * sizeof(T))); }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

// Memory a product brings into the L2 cache while it computes, one line every few steps of its tiles, so that
// reading it next (a later block of K or V in a decode) does not wait on DRAM: `rows` rows of `row_bytes` bytes,
// `stride` bytes apart. Only the float32 AVX-512 tiles act on it.
struct Prefetch {
  const void* base = nullptr;
  int64_t rows = 0, row_bytes = 0, stride = 0;
};

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Prefetch& ahead = {});

// Low-precision operands, float32 result (and accumulation). Returns false when torch's
// BLAS has no such routine (the caller then converts to float32 itself).
bool gemm_lowp(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
               int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);
bool gemm_lowp(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a,
               int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Packed B: products of many A against one B (the K and V of a head against each query block) pack B once.
// B (k x n after op) is cut into panels of 16 columns, 0 past n and k; float32 panels are [k][16], bf16 ones
// [ceil(k / 2)][16][2] (pairs along k, as vdpbf16ps reads them). Panels lie `panel` elements apart (a whole
// packing's panel_stride), so the columns from j0 and the k indices from p0 of a packing start
// packed_offset(j0, p0, panel) elements in (j0 a multiple of 16; for bf16, p0 even, and the product's k even
// unless it runs to the end of the packed k, where the padding is 0).
// packs<T>(): whether gemm_packed<T> serves (float32: AVX-512; bf16: AVX512-BF16; neither under
// FUSEDLAYERS_CPU_GEMM=blas). T: float or c10::BFloat16.
template <typename T>
bool packs();
template <typename T>
inline int64_t panel_stride(int64_t k) {  // elements per panel
  return sizeof(T) == 4 ? k * 16 : (k + 1) / 2 * 32;
}
inline int64_t packed_size(int64_t n, int64_t k, int64_t panel) { return (n + 15) / 16 * panel; }
inline int64_t packed_offset(int64_t j0, int64_t p0, int64_t panel) { return j0 / 16 * panel + p0 * 16; }
template <typename T>
void pack_b(bool trans_b, int64_t n, int64_t k, const T* b, int64_t ldb, T* out);
// C (m x n) = alpha * op(A) bp + beta * C, bp a packed B from packed_offset (beta 0: C is not read). With row_max
// (m x 16 floats), each row's maximum of the C it stores is folded in lane-wise: row_max[16 i + l] = max(itself,
// C[i][16 v + l] for every v), so that the max of row i's 16 lanes and its old maximum is the max of the row; a NaN
// of C may be dropped from it.
constexpr int64_t kRowMaxLanes = 16;  // row_max floats per row
template <typename T>
void gemm_packed(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* bp,
                 int64_t panel, float beta, float* c, int64_t ldc, float* row_max = nullptr);

// Whether gemm_packed<c10::BFloat16> runs on AMX. There a product with alpha 1, beta 0 and no row_max stores each
// whole 16 x 16 tile of C straight from the tile registers; any other epilogue (alpha, beta, row_max) is vector work
// on tiles stored to scratch first, which costs more than the tile product at a depth of 64 (Q K^T at head dim 64).
bool bf16_on_amx();

// Which BLAS serves gemm / gemm_lowp (for benchmarks and error messages).
const char* gemm_backend();

}  // namespace fusedlayers::cpu
