// Online softmax (Milakov & Gimelshein 2018; FlashAttention): the running row state
// (m = max of the scores seen so far, l = sum of exp(s - m)) and its updates, shared by
// the CPU kernels (csrc/attention/attention_cpu_kernel.h) and the CUDA kernels.
//
// Conventions (fusedlayers.registration): a row that has seen no allowed key has
// m = -inf, l = 0; its output is 0 and its lse is -inf. exp(-inf - -inf) never happens:
// every function below treats m = -inf explicitly.
// Non-finite scores (README "Semantics"): a NaN score makes m NaN (fmaxf alone would drop it
// and the row would pass for masked), so l, the output and lse come out NaN; a +inf score
// gives m = +inf, lse = +inf and a NaN output (inf / inf), as the float64 reference does.
//
// Unit-tested on the host through torch.ops.fusedlayers._online_softmax_test
// (tests/test_cpu_kernels.py).
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace fusedlayers {

struct SoftmaxState {
  float m;  // running max of the (scaled, masked) scores; -inf when none seen
  float l;  // running sum of exp(s - m)
};

FL_HD SoftmaxState softmax_init() { return {-INFINITY, 0.0f}; }

// Factor that rescales what was accumulated under the old max m_old when the max becomes
// m_new >= m_old: exp(m_old - m_new), and 0 when nothing was accumulated (m_old = -inf).
FL_HD float softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
}

// The max after a block whose own max is block_max (may be -inf: all masked; NaN when the
// block holds a NaN score, which then sticks).
FL_HD float softmax_new_max(const SoftmaxState& st, float block_max) {
  return (st.m != st.m || block_max != block_max) ? st.m + block_max : fmaxf(st.m, block_max);
}

// Folds one block into the state, given m_new = softmax_new_max(st, block_max) and
// block_sum = sum_j exp(s_j - m_new). Returns alpha, the factor by which the caller must
// rescale its output accumulator (O <- alpha * O + P V).
FL_HD float softmax_update(SoftmaxState& st, float m_new, float block_sum) {
  const float alpha = softmax_rescale(st.m, m_new);
  st.l = st.l * alpha + block_sum;
  st.m = m_new;
  return alpha;
}

// Merges two partial states of the same row (split-KV). Returns the merged state; the
// caller weights the partial outputs by exp(a.m - m) and exp(b.m - m).
FL_HD SoftmaxState softmax_merge(const SoftmaxState& a, const SoftmaxState& b) {
  const float m = (a.m != a.m || b.m != b.m) ? a.m + b.m : fmaxf(a.m, b.m);
  if (m == -INFINITY) return softmax_init();
  return {m, a.l * softmax_rescale(a.m, m) + b.l * softmax_rescale(b.m, m)};
}

// lse = m + log(l), natural log; -inf for a row that saw no allowed key, +inf when m is, NaN
// when a score was NaN.
FL_HD float softmax_lse(const SoftmaxState& st) {
  if (st.l == 0.0f) return -INFINITY;
  return st.m == INFINITY ? INFINITY : st.m + logf(st.l);
}

// 1 / l, the final normalisation of the output; 0 for a row that saw no key (output 0), NaN
// when l is.
FL_HD float softmax_inv_sum(const SoftmaxState& st) { return st.l == 0.0f ? 0.0f : 1.0f / st.l; }

}  // namespace fusedlayers
