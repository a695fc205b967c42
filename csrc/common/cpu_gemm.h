// Row-major GEMM on tiles for the CPU kernels: C (m x n) = alpha * op(A) op(B) + beta * C,
// op(X) = X or X^T, every matrix row-major with its leading dimension.
//
// It calls the BLAS that torch itself links (MKL on x86-64 wheels: sgemm_,
// cblas_gemm_bf16bf16f32, cblas_gemm_f16f16f32), found as weak symbols of libtorch_cpu at
// load time; where torch links none of them, a plain loop (correct, slow) serves.
// Called from inside our OpenMP parallel regions, MKL runs each call on the calling thread.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fusedlayers::cpu {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Low-precision operands, float32 result (and accumulation). Returns false when torch's
// BLAS has no such routine (the caller then converts to float32 itself).
bool gemm_lowp(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
               int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);
bool gemm_lowp(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a,
               int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc);

// out[j] = bf16(in[j]) (round to nearest even, NaN stays NaN) with vcvtne2ps2bf16, where gemm_lowp's bf16
// products run on AVX512-BF16; returns false elsewhere (the caller converts). A float32 subnormal becomes 0,
// as those products read a bf16 subnormal: a row converted here is meant for gemm_lowp.
bool to_bf16_row(const float* in, int64_t n, c10::BFloat16* out);

// Which BLAS serves gemm / gemm_lowp (for benchmarks and error messages).
const char* gemm_backend();

}  // namespace fusedlayers::cpu
