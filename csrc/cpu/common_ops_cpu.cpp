// CPU implementations of the ops shared by the op families (schemas in csrc/ext.cpp):
//   dropout_keep_mask_kernel  fills a bool tensor with the Philox keep-mask of a seed
//                             (element i of the flattened tensor = mask element index i),
//                             so tests check dropout against the kernels' own stream;
//   _philox4x32, _online_softmax_test, _mean_var_test: host unit tests of the tile math
//   in csrc/common/ (tests/test_cpu_kernels.py);
//   _cpu_kernels_info: the SIMD level and GEMM the kernels use;
//   _cpu_output_cache: the counters of the cpu outputs' cache (output_cache.cpp), its limit and reuse time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "common/mean_var.h"
#include "common/online_softmax.h"
#include "common/philox.h"
#include "common/cpu_gemm.h"
#include "cpu/kernels.h"
#include "cpu/ops_common.h"

#include <string>

namespace fusedlayers::cpu {
namespace {

void dropout_keep_mask_cpu(const at::Tensor& keep, int64_t seed, double p) {
  check_cpu(keep, "dropout_keep_mask_kernel", "keep");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous(),
              "fusedlayers::dropout_keep_mask_kernel: keep must be a contiguous bool tensor");
  bool* out = keep.mutable_data_ptr<bool>();
  const int64_t groups = (keep.numel() + 3) / 4, n = keep.numel();
  const float pf = static_cast<float>(p);
  at::parallel_for(0, groups, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      const Philox4 r = dropout_group(static_cast<uint64_t>(seed), static_cast<uint64_t>(g));
      for (int64_t w = 0; w < 4 && g * 4 + w < n; ++w) out[g * 4 + w] = dropout_keep_word(r.x[w], pf);
    }
  });
}

// counter_key: int64 (6,) = c0 c1 c2 c3 k0 k1 (32-bit values) -> int64 (4,) Philox-4x32-10 output.
at::Tensor philox4x32_cpu(const at::Tensor& ck) {
  TORCH_CHECK(ck.scalar_type() == at::kLong && ck.numel() == 6, "_philox4x32: int64 (6,) tensor expected");
  const at::Tensor c = ck.contiguous();
  const int64_t* v = c.const_data_ptr<int64_t>();
  auto u = [&](int i) { return static_cast<uint32_t>(v[i]); };
  const Philox4 r = philox4x32_10(u(0), u(1), u(2), u(3), u(4), u(5));
  at::Tensor out = at::empty({4}, c.options());
  for (int i = 0; i < 4; ++i) out.mutable_data_ptr<int64_t>()[i] = r.x[i];
  return out;
}

// The float32 (R, N) input of a row test op, contiguous, and its (R, cols) output; `name` in the error.
std::pair<at::Tensor, at::Tensor> row_test_io(const at::Tensor& in, int64_t block, int64_t cols, const char* name) {
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.dim() == 2 && block > 0, name, ": bad input");
  at::Tensor x = in.contiguous();
  return {x, at::empty({x.size(0), cols}, x.options())};
}

// scores (R, N) float32 -> (R, 3): lse of each row through online updates over blocks of
// `block` columns, the same merged from two halves (softmax_merge), and the final 1 / l.
at::Tensor online_softmax_test_cpu(const at::Tensor& scores, int64_t block) {
  auto [s, out] = row_test_io(scores, block, 3, "_online_softmax_test");
  const int64_t rows = s.size(0), n = s.size(1);
  auto run = [&](const float* x, int64_t lo, int64_t hi) {
    SoftmaxState st = softmax_init();
    for (int64_t b = lo; b < hi; b += block) {
      const int64_t e = std::min(hi, b + block);
      float bmax = -INFINITY;
      for (int64_t j = b; j < e; ++j) bmax = fmaxf(bmax, x[j]);
      const float m_new = softmax_new_max(st, bmax);
      float sum = 0.0f;
      if (m_new != -INFINITY) {
        for (int64_t j = b; j < e; ++j) sum += expf(x[j] - m_new);
        softmax_update(st, m_new, sum);
      }
    }
    return st;
  };
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s.const_data_ptr<float>() + r * n;
    const SoftmaxState whole = run(x, 0, n);
    const SoftmaxState merged = softmax_merge(run(x, 0, n / 2), run(x, n / 2, n));
    float* o = out.mutable_data_ptr<float>() + r * 3;
    o[0] = softmax_lse(whole);
    o[1] = softmax_lse(merged);
    o[2] = softmax_inv_sum(whole);
  }
  return out;
}

// x (R, N) float32 -> (R, 4): mean and biased variance by Welford over each row, and by
// Chan merges of two-pass statistics of blocks of `block` elements.
at::Tensor mean_var_test_cpu(const at::Tensor& x_in, int64_t block) {
  auto [x, out] = row_test_io(x_in, block, 4, "_mean_var_test");
  const int64_t rows = x.size(0), n = x.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = x.const_data_ptr<float>() + r * n;
    MeanVar w = mean_var_init();
    for (int64_t j = 0; j < n; ++j) mean_var_add(w, v[j]);
    MeanVar merged = mean_var_init();
    for (int64_t b = 0; b < n; b += block) {
      const int64_t e = std::min(n, b + block);
      float mean = 0.0f, m2 = 0.0f;
      for (int64_t j = b; j < e; ++j) mean += v[j];
      mean /= static_cast<float>(e - b);
      for (int64_t j = b; j < e; ++j) m2 += (v[j] - mean) * (v[j] - mean);
      merged = mean_var_merge(merged, mean_var_of(static_cast<float>(e - b), mean, m2));
    }
    float* o = out.mutable_data_ptr<float>() + r * 4;
    o[0] = w.mean;
    o[1] = w.m2 / w.count;
    o[2] = merged.mean;
    o[3] = merged.m2 / merged.count;
  }
  return out;
}

std::string cpu_kernels_info() {
  return std::string("simd=") + kernels().name + "; gemm=" + gemm_backend();
}

}  // namespace
}  // namespace fusedlayers::cpu

// No tensor argument, so no backend key: CompositeExplicitAutograd serves every call.
TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  m.impl("_cpu_kernels_info", &fusedlayers::cpu::cpu_kernels_info);
  m.impl("_cpu_output_cache", &fusedlayers::cpu::output_cache_stats);
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("dropout_keep_mask_kernel", &fusedlayers::cpu::dropout_keep_mask_cpu);
  m.impl("_philox4x32", &fusedlayers::cpu::philox4x32_cpu);
  m.impl("_online_softmax_test", &fusedlayers::cpu::online_softmax_test_cpu);
  m.impl("_mean_var_test", &fusedlayers::cpu::mean_var_test_cpu);
}
