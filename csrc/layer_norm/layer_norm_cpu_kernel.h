// (Residual-add +) layer norm and RMS norm on the CPU, forward and backward, compiled per
// SIMD level (see common/cpu_capability_begin.h). One pass over memory per row: a 16-bit row
// is converted to float32 as a pass reads it (from L1/L2 when a later pass of the row reads
// it again, or from a float32 row buffer of its thread where the forward keeps z), every
// statistic is taken in float32, and each output is written once, rounded to its dtype as
// it is stored.
//
// Forward, row z = dropout(x) + residual (float32):
//     mean = s + sum(z - s) / N;  var = (sum((z - s)^2) - (sum(z - s))^2 / N) / N   (one pass, the row
//     shifted by the mean s of its first 4 vectors: a constant row normalises to exactly 0; a second pass
//     over the cached row, shifted by that mean, where s is far from it; see forward)
//     rstd = 1 / sqrt(var + eps)                         (RMS: mean = 0, var = mean(z^2))
//     y = (z - mean) * rstd * weight + bias;  z stored when the op keeps the stream.
// Backward, with xhat = (z - mean) * rstd and wdy = dy * weight:
//     c1 = mean(xhat * wdy);  c2 = mean(wdy) (0 for RMS)
//     dz = (wdy - xhat * c1 - c2) * rstd (+ dz of the stream, prenorm)
//     dx = dropout(dz);  dresidual = dz;  dweight = sum_rows dy * xhat;  dbias = sum_rows dy
// The backward reads each row of z and dy twice, the second time from L1: xhat and wdy are
// computed again rather than stored and reloaded.
// dweight / dbias: each thread sums a fixed, contiguous range of rows, in blocks of kRowBlock
// rows, into its own partial row, and the partials are added in thread order (deterministic,
// no atomics).
//
// Checked by tests/test_norm.py (backend "cpu"), benchmarked by
// benchmarks/bench_cpu_norm_pairs.py and benchmarks/bench_cpu.py.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "common/mean_var.h"
#include "cpu/vec_utils.h"

namespace fusedlayers::cpu {
inline namespace CPU_CAPABILITY {
namespace norm {

inline const char* row_ptr(const void* base, DType t, int64_t row, int64_t stride) {
  return static_cast<const char*>(base) + row * stride * dtype_size(t);
}
inline char* row_ptr(void* base, DType t, int64_t row, int64_t stride) {
  return static_cast<char*>(base) + row * stride * dtype_size(t);
}

// z[j] += a[j]
inline void add_row(float* z, const float* a, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(z + j) + Vec::loadu(a + j)).store(z + j);
  for (; j < n; ++j) z[j] += a[j];
}

// Per-thread scratch of `count` floats, grown once per thread and reused by every call.
inline float* row_scratch(int64_t count) {
  thread_local AlignedVector<float> buf;  // 64-byte aligned: no vector access splits a cache line
  if (static_cast<int64_t>(buf.size()) < count) buf.resize(count);
  return buf.data();
}

// Weight and bias as float32 rows (1 and 0 when absent), once per thread.
inline void load_affine(const NormParams& p, float* w, float* bias) {
  const int64_t n = p.hidden;
  if (p.weight != nullptr) load_row_any(p.weight, p.weight_dtype, n, w); else std::fill(w, w + n, 1.0f);
  if (bias == nullptr) return;
  if (p.bias != nullptr) load_row_any(p.bias, p.bias_dtype, n, bias); else std::fill(bias, bias + n, 0.0f);
}

// y[j] = T((z[j] - mean) * rstd * w[j] + bias[j]); `stream`: with streaming stores
template <typename T>
inline void store_affine(const float* z, int64_t n, float mean, float rstd, const float* w, const float* bias, T* y,
                         bool stream) {
  const Vec vm(mean), vr(rstd);
  store_row_fn(
      y, n, stream,
      [=](int64_t j) FL_INLINE {
        return at::vec::fmadd((Vec::loadu(z + j) - vm) * vr, Vec::loadu(w + j), Vec::loadu(bias + j));
      },
      [=](int64_t j) { return std::fma((z[j] - mean) * rstd, w[j], bias[j]); });
}

// The moments of the row whose values vec(i) (whole vectors) and one(i) (the tail) give, each value also stored into
// out[i], in one pass; `shift` set as the forward takes it (row_shift; 0 for RMS, whose moments are about 0).
template <typename V, typename S>
inline Moments moments_into(int64_t n, bool rms, float* out, V vec, S one, float& shift) {
  shift = rms ? 0.0f : row_shift(n, vec, one(0));
  return shifted_moments(
      n, shift,
      [=](int64_t i) FL_INLINE {
        const Vec v = vec(i);
        v.store(out + i);
        return v;
      },
      [=](int64_t i) { return out[i] = one(i); });
}

inline void forward(const NormParams& p) {
  const int64_t n = p.hidden;
  const float inv_keep = p.dropout_p > 0 ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const bool plain_f32 = p.x_dtype == DType::f32 && p.dropout_p == 0 && p.residual == nullptr;  // z = x
  // y and a float32 z streamed past the caches when large (a 16-bit z is not: the dropout path reads it back).
  // Below that a z written through the caches is as fast when the layers between evict it before the backward or
  // the next layer reads it, and faster when they do not (in-process A/B against streaming from 1 MB: forward +
  // backward of add + layer norm at 1024x768 and 2048x768 5-9% faster, at 1-2% when 48 MB are copied between)
  const bool stream = p.rows * n * dtype_size(p.x_dtype) > kStreamBytes;
  const bool stream_z = p.z_dtype == DType::f32 && p.rows * n * 4 > kStreamBytes;
  // one thread below kParallelGrain elements
#pragma omp parallel num_threads(at::get_num_threads()) \
    if (p.rows > 1 && p.rows * n >= kParallelGrain && !omp_in_parallel())
  {
    float* const rows_buf = row_scratch(4 * n);
    float *const z = rows_buf, *const tmp = rows_buf + n, *const w = rows_buf + 2 * n, *const bias = rows_buf + 3 * n;
    load_affine(p, w, bias);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < p.rows; ++row) {
      const char* x = row_ptr(p.x, p.x_dtype, row, p.x_rs);
      const float* zr = reinterpret_cast<const float*>(x);  // float32 x as it is: no copy
      Moments mo{0.0f, 0.0f};
      float shift = 0.0f;  // of the moments; 0 for RMS, whose moments are about 0
      bool have_moments = false, z_stored = false;
      if (!plain_f32) {
        const char* rrow = p.residual != nullptr ? row_ptr(p.residual, p.residual_dtype, row, p.residual_rs) : nullptr;
        if (rrow != nullptr && p.dropout_p == 0) {
          // z = x + r rounded to its dtype, and its moments, in one pass over x and r as they are when they share a
          // dtype (else both converted into the row buffers first); z written into the op's z where that is float32
          // and not streamed, and read back from there
          z_stored = p.z != nullptr && p.z_dtype == DType::f32 && !stream_z;
          float* const zt = z_stored ? reinterpret_cast<float*>(row_ptr(p.z, p.z_dtype, row, n)) : z;
          auto fused = [&](auto zero, const auto* xs, const auto* rs) {
            using Z = decltype(zero);
            auto sum_at = [=](int64_t i) FL_INLINE { return round_through<Z>(load_vec(xs + i) + load_vec(rs + i)); };
            auto sum_one = [=](int64_t i) {
              return static_cast<float>(static_cast<Z>(static_cast<float>(xs[i]) + static_cast<float>(rs[i])));
            };
            mo = moments_into(n, p.rms, zt, sum_at, sum_one, shift);
          };
          auto with_z = [&](const auto* xs, const auto* rs) {
            switch (p.z_dtype) {
              case DType::f32: fused(0.0f, xs, rs); break;
              case DType::f16: fused(c10::Half(), xs, rs); break;
              case DType::bf16: fused(c10::BFloat16(), xs, rs); break;
            }
          };
          if (p.x_dtype != p.residual_dtype) {
            load_row_any(x, p.x_dtype, n, z);
            load_row_any(rrow, p.residual_dtype, n, tmp);
            with_z(static_cast<const float*>(z), static_cast<const float*>(tmp));
          } else {
            with_typed_rows(p.x_dtype, x, rrow, with_z);
          }
          have_moments = true;
          zr = zt;
        } else if (rrow == nullptr && p.dropout_p == 0 && p.z == nullptr && p.z_dtype == p.x_dtype) {
          // a 16-bit x alone: converted into the row buffer and its moments taken in the same pass
          auto convert = [&](const auto* xs) {
            mo = moments_into(
                n, p.rms, z, [=](int64_t i) FL_INLINE { return load_vec(xs + i); },
                [=](int64_t i) { return static_cast<float>(xs[i]); }, shift);
          };
          if (p.x_dtype == DType::f16) convert(reinterpret_cast<const c10::Half*>(x));
          else convert(reinterpret_cast<const c10::BFloat16*>(x));
          have_moments = true;
          zr = z;
        } else {
          load_row_any(x, p.x_dtype, n, z);
          if (p.dropout_p > 0) dropout_row(z, n, p.seed, static_cast<uint64_t>(row * n), p.dropout_p, inv_keep);
          if (rrow != nullptr) {
            const float* r = reinterpret_cast<const float*>(rrow);
            if (p.residual_dtype != DType::f32) load_row_any(rrow, p.residual_dtype, n, tmp), r = tmp;
            add_row(z, r, n);
          }
        }
        if (!have_moments) zr = z;
      }
      // y and the statistics of z rounded to its dtype, stored or not (the backward reads the stored z back: with
      // the unrounded ones, zin - mean of a constant fp16 row would be a rounding error times rstd, 1e6 at eps 1e-12)
      if (p.z != nullptr && !z_stored) {
        char* zrow = row_ptr(p.z, p.z_dtype, row, n);
        store_row_any(zr, n, zrow, p.z_dtype, 1.0f, stream_z);
        if (p.z_dtype != DType::f32 && !have_moments) load_row_any(zrow, p.z_dtype, n, z), zr = z;
      } else if (p.z == nullptr && p.z_dtype != DType::f32 && !have_moments &&
                 (p.residual != nullptr || p.dropout_p > 0 || p.x_dtype != p.z_dtype)) {
        store_row_any(z, n, tmp, p.z_dtype, 1.0f, false);  // z is in the row buffer here (not plain_f32)
        load_row_any(tmp, p.z_dtype, n, z);
      }

      // statistics (common/mean_var.h) from the moments of the row shifted by about its mean, in one pass:
      //   mean = shift + s1 / N;  M2 = s2 - s1^2 / N
      // The shift is the mean of the first 4 vectors (row_shift; 64 elements with AVX-512, 32 with AVX2): a
      // constant row has exactly its value as mean and M2 = 0 (y = bias, as torch gives; a plain sum / N is off by
      // a rounding error d and, with a small eps, d / sqrt(d^2 + eps) is far from 0). While s1^2 / N <= s2 / 16
      // (the shift within 0.26 standard deviations of the mean: 96% of rows of normal data with AVX-512, 86% with
      // AVX2) the subtraction scales the rounding error of s2 by at most 16/15, and M2 is as accurate as the
      // two-pass sum (z - mean)^2. Past that, or when s2 is not finite (a NaN, or a variance past float32's range,
      // where s2 - s1^2 / N would be inf - inf), a second pass over the cached row takes the moments again about
      // the mean found (the corrected two-pass algorithm: its s1 also corrects the mean, which a far shift leaves a
      // rounding error of |mean - shift| off; it also makes a constant row exact where the shift's sum is not
      // pairwise, at the scalar level).
      const float nf = static_cast<float>(n);
      auto zr_vec = [=](int64_t i) FL_INLINE { return Vec::loadu(zr + i); };
      auto zr_one = [=](int64_t i) { return zr[i]; };
      if (!have_moments) {
        if (!p.rms) shift = row_shift(n, zr_vec, zr[0]);
        mo = shifted_moments(n, shift, zr_vec, zr_one);
      }
      if (!p.rms && !(std::isfinite(mo.s2) && mo.s1 * (mo.s1 / nf) <= mo.s2 * (1.0f / 16))) {
        shift += mo.s1 / nf;
        mo = shifted_moments(n, shift, zr_vec, zr_one);
      }
      const float mean = p.rms ? 0.0f : shift + mo.s1 / nf;
      // M2 >= s2 * 15/16 after the first pass; after a second, below 0 only by rounding (NaN stays NaN)
      const float m2_raw = p.rms ? mo.s2 : mo.s2 - mo.s1 * (mo.s1 / nf);
      const float m2 = m2_raw < 0.0f ? 0.0f : m2_raw;
      const float rstd = mean_var_rstd(mean_var_of(nf, mean, m2), p.eps);
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;

      // y = (z - mean) * rstd * w + bias
      char* y = row_ptr(p.y, p.x_dtype, row, n);
      switch (p.x_dtype) {
        case DType::f32:
          store_affine(zr, n, mean, rstd, w, bias, reinterpret_cast<float*>(y), stream);
          break;
        case DType::f16:
          store_affine(zr, n, mean, rstd, w, bias, reinterpret_cast<c10::Half*>(y), stream);
          break;
        case DType::bf16:
          store_affine(zr, n, mean, rstd, w, bias, reinterpret_cast<c10::BFloat16*>(y), stream);
          break;
      }
    }
    if (stream || stream_z) stream_fence();
  }
}

// rows whose dweight / dbias terms are summed before they join a thread's total
constexpr int64_t kRowBlock = 32;

inline void backward(const NormParams& p) {
  const int64_t n = p.hidden;
  const float inv_keep = p.dropout_p > 0 ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const float inv_n = 1.0f / static_cast<float>(n);
  const bool want_dw = p.dweight != nullptr, want_db = p.dbias != nullptr;
  const bool stream = p.rows * n * dtype_size(p.x_dtype) > kStreamBytes;  // dx, dresidual past the caches
  // dx = dz: written directly in x's dtype, not through a row buffer
  const bool direct = p.dz == nullptr && p.dresidual == nullptr && p.dropout_p == 0;
  const int threads = omp_in_parallel() || p.rows * n < kParallelGrain
                          ? 1
                          : std::max<int>(1, std::min<int64_t>(at::get_num_threads(), p.rows));
  // per-thread partial sums of dweight and dbias, in each thread's own scratch (never a cache line shared between
  // threads); one thread sums into the outputs directly. An entry stays null when OpenMP gives fewer threads.
  std::vector<float*> dw_part(threads, nullptr), db_part(threads, nullptr);
  if (threads == 1) {
    if (want_dw) std::fill(p.dweight, p.dweight + n, 0.0f);
    if (want_db) std::fill(p.dbias, p.dbias + n, 0.0f);
  }

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* const rows_buf = row_scratch(7 * n);
    // zbuf, gbuf: z and dy in float32 when their dtypes differ; gbuf then holds dz on its way to dresidual, dropout
    // and dx (when dx is not all of it), zbuf the stream's gradient
    float *const zbuf = rows_buf, *const gbuf = rows_buf + n, *const w = rows_buf + 2 * n;
    load_affine(p, w, nullptr);
    // dweight / dbias: the rows of a block of kRowBlock summed in dwp / dbp, each block's sum added to this
    // thread's total (a sum over many rows in one chain would drift with their count)
    float* const dw_tot = !want_dw ? nullptr : threads > 1 ? rows_buf + 3 * n : p.dweight;
    float* const db_tot = !want_db ? nullptr : threads > 1 ? rows_buf + 4 * n : p.dbias;
    float* const dwp = want_dw ? rows_buf + 5 * n : nullptr;
    float* const dbp = want_db ? rows_buf + 6 * n : nullptr;
    if (threads > 1) {
      if (dw_tot) std::fill(dw_tot, dw_tot + n, 0.0f);
      if (db_tot) std::fill(db_tot, db_tot + n, 0.0f);
      dw_part[t] = dw_tot, db_part[t] = db_tot;
    }
    // a fixed contiguous range of rows per thread: the partial sums do not depend on timing
    const int64_t lo = p.rows * t / nt, hi = p.rows * (t + 1) / nt;
    for (int64_t row = lo; row < hi; ++row) {
      if ((row - lo) % kRowBlock == 0) {
        if (dwp) std::fill(dwp, dwp + n, 0.0f);
        if (dbp) std::fill(dbp, dbp + n, 0.0f);
      }
      const float mean = p.rms ? 0.0f : p.mean[row], rstd = p.rstd[row];
      const bool block_end = (row - lo) % kRowBlock == kRowBlock - 1 || row == hi - 1;
      // The row's math on z and dy as zs / gs point to them: the rows as they are when z and dy share a dtype (a
      // 16-bit one converted as each pass reads it, from L1 the second time), else both converted into the row
      // buffers zbuf / gbuf first.
      auto row_math = [&](const auto* zs, const auto* gs) {
        const Vec vm(mean), vr(rstd);
        // first pass: c1, c2 in two chains each, and the row's terms of dweight and dbias
        Vec c1a(0.0f), c2a(0.0f), c1b(0.0f), c2b(0.0f);
        auto step = [=](int64_t i, Vec& c1v, Vec& c2v) FL_INLINE {
          const Vec xh = (load_vec(zs + i) - vm) * vr;
          const Vec gy = load_vec(gs + i);
          const Vec wd = opaque(gy * Vec::loadu(w + i));
          c1v = at::vec::fmadd(xh, wd, c1v);
          c2v = c2v + wd;
          if (dwp) at::vec::fmadd(gy, xh, Vec::loadu(dwp + i)).store(dwp + i);
          if (dbp) (Vec::loadu(dbp + i) + gy).store(dbp + i);
        };
        int64_t j = 0;
        for (; j + 2 * kVec <= n; j += 2 * kVec) {
          step(j, c1a, c2a);
          step(j + kVec, c1b, c2b);
        }
        if (j + kVec <= n) step(j, c1a, c2a), j += kVec;
        float c1 = reduce_sum(c1a + c1b), c2 = reduce_sum(c2a + c2b);
        for (; j < n; ++j) {
          const float zj = static_cast<float>(zs[j]), gy = static_cast<float>(gs[j]);
          const float xh = (zj - mean) * rstd, wd = opaque(gy * w[j]);
          c1 = std::fma(xh, wd, c1);
          c2 += wd;
          if (dwp) dwp[j] = std::fma(gy, xh, dwp[j]);
          if (dbp) dbp[j] += gy;
        }
        if (block_end) {
          if (dwp) add_row(dw_tot, dwp, n);
          if (dbp) add_row(db_tot, dbp, n);
        }
        c1 *= inv_n;
        c2 = p.rms ? 0.0f : c2 * inv_n;
        // second pass: dz = (wdy - xhat * c1 - c2) * rstd, with xhat and wdy computed again as in the first pass
        // (storing and reloading them costs more when z and dy come from memory), wdy rounded on its own as there,
        // wdy - xhat * c1 one FMA; into dx when that is all dx is, else into gbuf. Every product and FMA is
        // written out (opaque() keeps the compiler from contracting the rest), so each dtype's instantiation does
        // the same float32 arithmetic: a 16-bit dx is the float32 kernel's rounded.
        const Vec vc1(c1), vc2(c2);
        auto dz_vec = [=](int64_t i) FL_INLINE {
          const Vec xh = (load_vec(zs + i) - vm) * vr;
          return (at::vec::fnmadd(xh, vc1, opaque(load_vec(gs + i) * Vec::loadu(w + i))) - vc2) * vr;
        };
        auto dz_one = [=](int64_t i) FL_INLINE {
          const float zi = static_cast<float>(zs[i]), gi = static_cast<float>(gs[i]);
          return (std::fma(-((zi - mean) * rstd), c1, opaque(gi * w[i])) - c2) * rstd;
        };
        if (!direct) {
          store_row_fn(gbuf, n, false, dz_vec, dz_one);
          return;
        }
        char* const dx = row_ptr(p.dx, p.x_dtype, row, n);
        switch (p.x_dtype) {
          case DType::f32: store_row_fn(reinterpret_cast<float*>(dx), n, stream, dz_vec, dz_one); break;
          case DType::f16: store_row_fn(reinterpret_cast<c10::Half*>(dx), n, stream, dz_vec, dz_one); break;
          case DType::bf16: store_row_fn(reinterpret_cast<c10::BFloat16*>(dx), n, stream, dz_vec, dz_one); break;
        }
      };
      const char* zrow = row_ptr(p.zin, p.zin_dtype, row, p.zin_rs);
      const char* dyrow = row_ptr(p.dy, p.x_dtype, row, n);
      if (p.zin_dtype == p.x_dtype) {
        with_typed_rows(p.x_dtype, zrow, dyrow, row_math);
      } else {
        const float* zs = reinterpret_cast<const float*>(zrow);
        const float* gs = reinterpret_cast<const float*>(dyrow);
        if (p.zin_dtype != DType::f32) load_row_any(zrow, p.zin_dtype, n, zbuf), zs = zbuf;
        if (p.x_dtype != DType::f32) load_row_any(dyrow, p.x_dtype, n, gbuf), gs = gbuf;
        row_math(zs, gs);
      }
      if (direct) continue;
      // gbuf holds dz: the stream's gradient added, then dresidual, dropout and dx from it
      if (p.dz != nullptr) {
        load_row_any(row_ptr(p.dz, p.dz_dtype, row, n), p.dz_dtype, n, zbuf);  // z is read no more
        add_row(gbuf, zbuf, n);
      }
      if (p.dresidual != nullptr) {
        store_row_any(gbuf, n, row_ptr(p.dresidual, p.residual_dtype, row, n), p.residual_dtype, 1.0f, stream);
      }
      if (p.dropout_p > 0) dropout_row(gbuf, n, p.seed, static_cast<uint64_t>(row * n), p.dropout_p, inv_keep);
      store_row_any(gbuf, n, row_ptr(p.dx, p.x_dtype, row, n), p.x_dtype, 1.0f, stream);
    }
    if (stream) stream_fence();
  }
  // partials in thread order, columns split over the threads
  if (threads > 1 && (want_dw || want_db)) {
#pragma omp parallel for num_threads(threads) if (threads > 1 && n >= 4096) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      float dw = 0.0f, db = 0.0f;
      for (int t = 0; t < threads; ++t) {
        if (dw_part[t] != nullptr) dw += dw_part[t][j];
        if (db_part[t] != nullptr) db += db_part[t][j];
      }
      if (want_dw) p.dweight[j] = dw;
      if (want_db) p.dbias[j] = db;
    }
  }
}

}  // namespace norm

inline void norm_fwd(const NormParams& p) { norm::forward(p); }
inline void norm_bwd(const NormParams& p) { norm::backward(p); }

}  // namespace CPU_CAPABILITY
}  // namespace fusedlayers::cpu
