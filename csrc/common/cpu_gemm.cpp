// Row-major GEMM wrappers over the BLAS torch links: see cpu_gemm.h.
#include "common/cpu_gemm.h"

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
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ == nullptr) return gemm_loop(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&opb, &opa, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

bool gemm_lowp(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a, int64_t lda,
               const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (cblas_gemm_bf16bf16f32 == nullptr) return false;
  if (m == 0 || n == 0) return true;
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
                         static_cast<int>(n), static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(a),
                         static_cast<int>(lda), reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c,
                         static_cast<int>(ldc));
  return true;
}

bool gemm_lowp(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a, int64_t lda,
               const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (cblas_gemm_f16f16f32 == nullptr) return false;
  if (m == 0 || n == 0) return true;
  cblas_gemm_f16f16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
                       static_cast<int>(n), static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(a),
                       static_cast<int>(lda), reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c,
                       static_cast<int>(ldc));
  return true;
}

const char* gemm_backend() {
  if (sgemm_ == nullptr) return "loops (torch links no sgemm_)";
  return cblas_gemm_bf16bf16f32 != nullptr ? "torch's BLAS (sgemm_, cblas_gemm_bf16bf16f32, cblas_gemm_f16f16f32)"
                                           : "torch's BLAS (sgemm_)";
}

}  // namespace fusedlayers::cpu
