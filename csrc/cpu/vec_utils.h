// Vectorised row helpers of the CPU kernels, compiled once per SIMD level (include
// between common/cpu_capability_begin.h and _end.h). Every function works on float32
// rows; load/store convert from/to the tensor's dtype.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cpu_gemm.h"
#include "common/philox.h"
#include "cpu/kernels.h"

namespace fusedlayers::cpu {
inline namespace CPU_CAPABILITY {

// On a lambda that a row loop calls per vector (`[=](int64_t i) FL_INLINE { ... }`): GCC may otherwise leave a
// large one as a call, through the PLT, in each iteration.
#if defined(__GNUC__)
#define FL_INLINE __attribute__((always_inline))
#else
#define FL_INLINE
#endif

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Below this many elements a kernel runs on one thread: waking an OpenMP team costs more
// (torch's at::internal::GRAIN_SIZE, the same rule as at::parallel_for).
constexpr int64_t kParallelGrain = 32768;

template <typename T>
inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// float32 -> bf16 by AVX512-BF16 where the CPU has it (read once, at load): vcvtne2ps2bf16 rounds 32 floats to
// nearest even in one instruction where at::vec's integer rounding takes about ten. It reads a float32 subnormal as
// 0, where the software rounding gives a bf16 subnormal: a vector holding one (vfpclassps finds it) takes the software
// rounding, so every element rounds as torch rounds it. Written as asm: this level is compiled without the
// avx512bf16 target that the intrinsics need (volatile, so that it is never moved ahead of the kBf16Convert test).
inline const bool kBf16Convert = __builtin_cpu_supports("avx512bf16");
// lo rounded into bf16 elements 0 .. 15, hi into 16 .. 31
inline __m512i bf16_pair(__m512 lo, __m512 hi) {
  __m512i r;
  asm volatile("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(hi), "v"(lo));
  return r;
}
inline __m256i bf16_one(__m512 v) {
  __m256i r;
  asm volatile("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(v));
  return r;
}
constexpr int kSubnormal = 0x20;  // vfpclassps: denormal
#endif

// v rounded to T (to nearest even, as a store of T gives), as floats
template <typename T>
inline Vec round_through(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::Half>) {
      return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if (kBf16Convert && _mm512_fpclass_ps_mask(v, kSubnormal) == 0) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_one(v)), 16));
    }
#endif
    T buf[2 * kVec];
    at::vec::convert_from_float<T>(v, v).store(buf);
    return load_vec(buf);
  }
}

// a, b as one vector of the 16-bit type T (2 * kVec elements)
template <typename T>
inline at::vec::Vectorized<T> to_lowp(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (kBf16Convert && (_mm512_fpclass_ps_mask(a, kSubnormal) | _mm512_fpclass_ps_mask(b, kSubnormal)) == 0) {
      return at::vec::Vectorized<T>(bf16_pair(a, b));
    }
  }
#endif
  return at::vec::convert_from_float<T>(a, b);
}

// Stores 2 * kVec elements a, b (one full vector of the 16-bit type).
template <typename T>
inline void store_vec2(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kVec);
  } else {
    to_lowp<T>(a, b).store(p);
  }
}

// Non-temporal ("streaming") stores, for outputs far larger than the caches: a line is written
// without being read first (no read-for-ownership), which saves a third of the memory traffic
// of an output written once. A thread that streamed calls stream_fence() before others read.
constexpr int64_t kStreamBytes = int64_t{8} << 20;  // outputs above this many bytes are streamed

// One streaming store of a float vector, and of a vector of 16-bit elements, at this SIMD level.
#if defined(CPU_CAPABILITY_AVX512)
inline void stream_floats(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream_bits(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_floats(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream_bits(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
#endif

// stream_vec2(p, a, b): store_vec2 with streaming stores; p aligned to sizeof(Vec) bytes.
template <typename T>
inline void stream_vec2(T* p, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    stream_floats(p, a);
    stream_floats(p + kVec, b);
  } else {
    stream_bits(p, to_lowp<T>(a, b));
  }
#else
  store_vec2(p, a, b);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// How many leading elements of `out` to store one by one before it is aligned for stream_vec2.
template <typename T>
inline int64_t stream_head(const T* out, int64_t n) {
  const auto misaligned = reinterpret_cast<uintptr_t>(out) % sizeof(Vec);
  if (misaligned % sizeof(T) != 0) return n;  // never aligned: no streaming
  return std::min<int64_t>(n, misaligned == 0 ? 0 : (sizeof(Vec) - misaligned) / sizeof(T));
}

// out[j] = float(in[j])
template <typename T>
inline void load_row(const T* in, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) load_vec(in + j).store(out + j);
  for (; j < n; ++j) out[j] = static_cast<float>(in[j]);
}

// out[j] = T(f(j)) for j < n, where vec(j) gives elements j .. j + kVec - 1 as floats and one(j) element j;
// `stream`: with streaming stores from the first element aligned for them. vec and one capture by value: a
// reference capture would be reloaded after every store to out, which may alias it.
template <typename T, typename V, typename S>
inline void store_row_fn(T* out, int64_t n, bool stream, V vec, S one) {
  int64_t j = 0;
  if (stream) {
    for (const int64_t head = stream_head(out, n); j < head; ++j) out[j] = static_cast<T>(one(j));
    for (; j + 2 * kVec <= n; j += 2 * kVec) stream_vec2(out + j, vec(j), vec(j + kVec));
  }
  for (; j + 2 * kVec <= n; j += 2 * kVec) store_vec2(out + j, vec(j), vec(j + kVec));
  for (; j < n; ++j) out[j] = static_cast<T>(one(j));
}

// out[j] = T(in[j] * s); `stream`: with streaming stores
template <typename T>
inline void store_row(const float* in, int64_t n, T* out, float s = 1.0f, bool stream = false) {
  const Vec vs(s);
  store_row_fn(out, n, stream, [=](int64_t j) { return Vec::loadu(in + j) * vs; }, [=](int64_t j) { return in[j] * s; });
}

// v as a value the compiler cannot see into: the operation producing it is not contracted with one consuming it
// (GCC fuses a * b - c into one FMA where it can, which rounds once instead of twice).
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
using NativeVec = __m512;
#elif defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
using NativeVec = __m256;
#endif
template <typename T>
inline T opaque(T v) {
#if defined(__GNUC__) && (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2))
  if constexpr (std::is_same_v<T, float>) {
    asm("" : "+v"(v));  // "v": any SSE / AVX register the target has
  } else {
    NativeVec r = v;
    asm("" : "+v"(r));
    v = r;
  }
#endif
  return v;
}

inline void load_row_any(const void* in, DType t, int64_t n, float* out) {
  switch (t) {
    case DType::f32: return load_row(static_cast<const float*>(in), n, out);
    case DType::f16: return load_row(static_cast<const c10::Half*>(in), n, out);
    case DType::bf16: return load_row(static_cast<const c10::BFloat16*>(in), n, out);
  }
}

inline void store_row_any(const float* in, int64_t n, void* out, DType t, float s = 1.0f, bool stream = false) {
  switch (t) {
    case DType::f32: return store_row(in, n, static_cast<float*>(out), s, stream);
    case DType::f16: return store_row(in, n, static_cast<c10::Half*>(out), s, stream);
    case DType::bf16: return store_row(in, n, static_cast<c10::BFloat16*>(out), s, stream);
  }
}

inline int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// f(a, b) with rows a and b of dtype t as typed pointers (const float*, const c10::Half* or const c10::BFloat16*)
template <typename F>
inline void with_typed_rows(DType t, const void* a, const void* b, F f) {
  switch (t) {
    case DType::f32: return f(static_cast<const float*>(a), static_cast<const float*>(b));
    case DType::f16: return f(static_cast<const c10::Half*>(a), static_cast<const c10::Half*>(b));
    case DType::bf16: return f(static_cast<const c10::BFloat16*>(a), static_cast<const c10::BFloat16*>(b));
  }
}

// a[j] *= s
inline void scale_row(float* a, int64_t n, float s) {
  int64_t j = 0;
  const Vec vs(s);
  for (; j + kVec <= n; j += kVec) (Vec::loadu(a + j) * vs).store(a + j);
  for (; j < n; ++j) a[j] *= s;
}

// y[j] += a * x[j].
inline void axpy_row(float a, const float* x, int64_t n, float* y) {
  int64_t j = 0;
  const Vec va(a);
  for (; j + kVec <= n; j += kVec) at::vec::fmadd(va, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
  for (; j < n; ++j) y[j] += a * x[j];
}

// a[j] *= s, and max_j of the results as row_max gives it (NaN when any is NaN), in one pass over a.
inline float scale_row_max(float* a, int64_t n, float s) {
  int64_t j = 0;
  const Vec vs(s);
  Vec m0(-INFINITY), m1(-INFINITY);  // two chains: max has a latency
  for (; j + 2 * kVec <= n; j += 2 * kVec) {
    const Vec x0 = Vec::loadu(a + j) * vs, x1 = Vec::loadu(a + j + kVec) * vs;
    x0.store(a + j);
    x1.store(a + j + kVec);
    m0 = at::vec::maximum(m0, x0);
    m1 = at::vec::maximum(m1, x1);
  }
  float m = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); },
                                           at::vec::maximum(m0, m1));
  for (; j < n; ++j) {
    a[j] *= s;
    if (std::isnan(a[j]) || a[j] > m) m = std::isnan(m) ? m : a[j];
  }
  return m;
}

// max_j a[j]; NaN when any a[j] is NaN (a NaN score must not pass for a masked one).
inline float row_max(const float* a, int64_t n) {
  int64_t j = 0;
  float m = -INFINITY;
  if (n >= kVec) {
    auto vmax = [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); };
    Vec m0(-INFINITY), m1(-INFINITY), m2(-INFINITY), m3(-INFINITY);  // four chains: max has a latency
    for (; j + 4 * kVec <= n; j += 4 * kVec) {
      m0 = vmax(m0, Vec::loadu(a + j));
      m1 = vmax(m1, Vec::loadu(a + j + kVec));
      m2 = vmax(m2, Vec::loadu(a + j + 2 * kVec));
      m3 = vmax(m3, Vec::loadu(a + j + 3 * kVec));
    }
    for (; j + kVec <= n; j += kVec) m0 = vmax(m0, Vec::loadu(a + j));
    Vec vm = vmax(vmax(m0, m1), vmax(m2, m3));
    m = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vm);
  }
  for (; j < n; ++j) m = (a[j] > m || a[j] != a[j]) ? a[j] : m;  // NaN propagates, as at::vec::maximum
  return m;
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// The shift of a row's moments (see shifted_moments): the mean of its first 4, 2 or 1 vectors (as many as the row
// holds; vec(i) gives the vector at i), summed pairwise so that a constant row gives exactly its value (the lanes'
// reduce_sum is pairwise with AVX2 and AVX-512; at the scalar level it is not, and the norm's second pass makes
// such a row exact); `a0`, the row's first element, for a row shorter than a vector or when that sum overflows.
template <typename V>
inline float row_shift(int64_t n, V vec, float a0) {
  Vec sum;
  int64_t count;
  if (n >= 4 * kVec) {
    sum = (vec(0) + vec(kVec)) + (vec(2 * kVec) + vec(3 * kVec)), count = 4 * kVec;
  } else if (n >= 2 * kVec) {
    sum = vec(0) + vec(kVec), count = 2 * kVec;
  } else if (n >= kVec) {
    sum = vec(0), count = kVec;
  } else {
    return a0;
  }
  const float s = reduce_sum(sum) / static_cast<float>(count);
  return std::isfinite(s) ? s : a0;
}

// s1 = sum_j (z_j - shift) and s2 = sum_j (z_j - shift)^2 in one pass, with z_j = vec(j) over whole vectors (called
// once per vector, in order: it may store what it returns) and one(j) over the tail. Two chains each: a loop step
// issues four adds and two loads, more cycles than an add's latency. The chains add in a fixed order, so the result
// does not depend on timing.
struct Moments {
  float s1, s2;
};
template <typename V, typename S>
inline Moments shifted_moments(int64_t n, float shift, V vec, S one) {
  const Vec vs(shift);
  Vec a1(0.0f), a2(0.0f), b1(0.0f), b2(0.0f);
  int64_t j = 0;
  for (; j + 2 * kVec <= n; j += 2 * kVec) {
    const Vec d0 = vec(j) - vs, d1 = vec(j + kVec) - vs;
    a1 = a1 + d0, a2 = at::vec::fmadd(d0, d0, a2);
    b1 = b1 + d1, b2 = at::vec::fmadd(d1, d1, b2);
  }
  if (j + kVec <= n) {
    const Vec d = vec(j) - vs;
    a1 = a1 + d, a2 = at::vec::fmadd(d, d, a2), j += kVec;
  }
  Moments m{reduce_sum(a1 + b1), reduce_sum(a2 + b2)};
  for (; j < n; ++j) {
    const float d = one(j) - shift;
    m.s1 += d, m.s2 += d * d;
  }
  return m;
}

// exp(x) by ATen's exp_u20 (20 ulp, far below bf16's or fp16's 8 or 11 bits) with NaN passed through
// (exp_u20 clamps its input, so a NaN score would come out finite); exp(-inf) = 0.
inline Vec exp_u20_nan(const Vec& x) { return Vec::blendv(x.exp_u20(), x, x.isnan()); }

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) for rows that go on in bf16 / fp16 (8 or 11 bits): with y = x log2(e) = n + f, n an integer and
// |f| <= 1/2, exp(x) = 2^n P(f), P of degree 5 fitted to 2^f in relative error (9.2e-8; in float32 Horner with FMA
// within 1.4 ulp of 2^f), P(0) = 1 so that exp(0) = 1 exactly. A result below 2^-126 is 0 (no subnormal
// arithmetic); -inf gives 0, NaN NaN. Callers pass x = s - m (scaling s and m apart would shift y by the rounding
// of m log2(e): on a row biased by finfo.min, the whole range of exp).
inline Vec exp_lowp(const Vec& x) {
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __mmask16 normal = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);  // y >= -126 or NaN
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 q = _mm512_fmadd_ps(f, _mm512_set1_ps(1.326469821e-3f), _mm512_set1_ps(9.671509266e-3f));
  q = _mm512_fmadd_ps(f, q, _mm512_set1_ps(5.550733954e-2f));
  q = _mm512_fmadd_ps(f, q, _mm512_set1_ps(2.402224243e-1f));
  q = _mm512_fmadd_ps(f, q, _mm512_set1_ps(6.931470037e-1f));
  q = _mm512_fmadd_ps(f, q, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(normal, q, n);
}

// exp(x) within about 1 ulp: n = round(x log2(e)), r = x - n ln(2) in two steps (ln(2) as 0.693359375, exact
// times n, minus 2.12194440e-4), e^r by a degree-6 P fitted in relative error (2.0e-9; in float32 Horner with FMA
// within 0.96 ulp of e^r on |r| <= ln(2) / 2), times 2^n by scalef. A result below 2^-126 is 0; -inf gives 0,
// NaN NaN, past 88.7 inf.
inline Vec exp_reduced(const Vec& x) {
  const __m512 normal_min = _mm512_set1_ps(-87.33654022216797f);  // the float just above ln(2^-126)
  const __mmask16 normal = _mm512_cmp_ps_mask(x, normal_min, _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 q = _mm512_fmadd_ps(r, _mm512_set1_ps(1.384364092e-3f), _mm512_set1_ps(8.374153636e-3f));
  q = _mm512_fmadd_ps(r, q, _mm512_set1_ps(4.166800156e-2f));
  q = _mm512_fmadd_ps(r, q, _mm512_set1_ps(1.666643173e-1f));
  q = _mm512_fmadd_ps(r, q, _mm512_set1_ps(4.999999404e-1f));
  q = _mm512_fmadd_ps(r, q, _mm512_set1_ps(1.0f));
  q = _mm512_fmadd_ps(r, q, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(normal, q, n);
}
#endif

// a[j] = exp(a[j] - m), returns sum_j a[j]. exp(-inf) = 0. Within 1 ulp (exp_reduced on AVX-512 where m is
// finite, else Sleef's exp), or with kLowp (rows that go on in bf16 / fp16) a faster one: exp_lowp on AVX-512
// where m is finite, else exp_u20_nan. In float32 exp_u20 put
// dq / dbias just past the test rule's bound (2-3x torch's error).
template <bool kLowp = false>
inline float exp_sub_sum(float* a, int64_t n, float m) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (std::isfinite(m)) {  // (a NaN score gives a NaN sum)
    const Vec vm(m);
    auto ex = [&](const Vec& s) { return kLowp ? exp_lowp(s - vm) : exp_reduced(s - vm); };
    Vec acc0(0.0f), acc1(0.0f);
    for (; j + 2 * kVec <= n; j += 2 * kVec) {
      const Vec e0 = ex(Vec::loadu(a + j)), e1 = ex(Vec::loadu(a + j + kVec));
      e0.store(a + j);
      e1.store(a + j + kVec);
      acc0 = acc0 + e0;
      acc1 = acc1 + e1;
    }
    for (; j < n; j += kVec) {
      const int64_t left = std::min<int64_t>(kVec, n - j);
      const __mmask16 live = left >= kVec ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      const Vec e = ex(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, a + j));
      _mm512_mask_storeu_ps(a + j, live, e);
      acc0 = acc0 + e;
    }
    return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
  }
#endif
  const Vec vm(m);
  Vec acc(0.0f);
  for (; j + kVec <= n; j += kVec) {
    const Vec x = Vec::loadu(a + j) - vm;
    Vec e;
    if constexpr (kLowp) {
      e = exp_u20_nan(x);
    } else {
      e = x.exp();
    }
    e.store(a + j);
    acc = acc + e;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; j < n; ++j) {
    a[j] = std::exp(a[j] - m);
    s += a[j];
  }
  return s;
}

// f(j) for each j < n with a[j] > t, in order.
template <typename F>
inline void for_each_above(const float* a, int64_t n, float t, F f) {
  int64_t j = 0;
  const Vec vt(t);
  for (; j + kVec <= n; j += kVec) {
    uint32_t hits = ~static_cast<uint32_t>((Vec::loadu(a + j) > vt).zero_mask()) & ((1u << kVec) - 1u);
    for (; hits != 0; hits &= hits - 1) f(j + __builtin_ctz(hits));
  }
  for (; j < n; ++j) {
    if (a[j] > t) f(j);
  }
}

// a[j] *= keep(index0 + j) ? inv_keep : 0, the Philox dropout mask (common/philox.h).
inline void dropout_row(float* a, int64_t n, uint64_t seed, uint64_t index0, float p, float inv_keep) {
  int64_t j = 0;
  while (j < n) {
    const uint64_t idx = index0 + static_cast<uint64_t>(j);
    const Philox4 r = dropout_group(seed, idx >> 2);
    for (uint64_t w = idx & 3; w < 4 && j < n; ++w, ++j) {
      a[j] *= dropout_keep_word(r.x[w], p) ? inv_keep : 0.0f;
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedlayers::cpu
