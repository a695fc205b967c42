// Mean / variance of a row in pieces: the (count, mean, M2) state of Welford's algorithm
// and Chan et al.'s merge of two such states, shared by the CPU norm kernels
// (csrc/layer_norm/layer_norm_cpu_kernel.h) and the CUDA ones (warp / block merges).
// M2 = sum (x - mean)^2, so var = M2 / count (biased, as layer_norm uses).
//
// Unit-tested on the host through torch.ops.fusedlayers._mean_var_test.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace fusedlayers {

struct MeanVar {
  float count;  // number of elements folded in (float: merges divide by it)
  float mean;
  float m2;     // sum of squared deviations from mean
};

FL_HD MeanVar mean_var_init() { return {0.0f, 0.0f, 0.0f}; }

// Welford: folds one value in.
FL_HD void mean_var_add(MeanVar& s, float x) {
  s.count += 1.0f;
  const float d = x - s.mean;
  s.mean += d / s.count;
  s.m2 += d * (x - s.mean);
}

// Chan et al.: the state of the union of two disjoint pieces.
FL_HD MeanVar mean_var_merge(const MeanVar& a, const MeanVar& b) {
  const float n = a.count + b.count;
  if (n == 0.0f) return mean_var_init();
  const float d = b.mean - a.mean;
  const float wb = b.count / n;
  return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.count * wb};
}

// The state of a piece from its exact two-pass statistics (count, mean, M2).
FL_HD MeanVar mean_var_of(float count, float mean, float m2) { return {count, mean, m2}; }

// 1 / sqrt(var + eps), var = M2 / count (biased).
FL_HD float mean_var_rstd(const MeanVar& s, float eps) {
  return 1.0f / sqrtf(s.m2 / s.count + eps);
}

}  // namespace fusedlayers
