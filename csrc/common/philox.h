// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
// the counter-based generator of every fusedlayers dropout mask on the cpu backend (and
// the CUDA backend, which includes this header): the keep decision of element `index`
// of a dropout mask is a pure function of (seed, index), so backward regenerates the
// forward's mask and dropout_keep_mask reproduces it for tests, independent of how the
// work was split into blocks or threads.
//
// Element index i uses word (i % 4) of philox(counter = (i / 4) as two 32-bit words, 0, 0;
// key = seed as two 32-bit words); it is kept when (word >> 8) * 2^-24 >= p.
//
// Checked against the Random123 known-answer vectors (tests/test_cpu_kernels.py).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fusedlayers {

struct Philox4 {
  uint32_t x[4];
};

FL_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32 with 10 rounds of counter c under key (k0, k1).
FL_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // multipliers
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // Weyl key increments
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(M0, c0, hi0, lo0);
    philox_mulhilo(M1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += W0;
    k1 += W1;
  }
  return {{c0, c1, c2, c3}};
}

// The four random words of the group of mask elements 4g .. 4g+3.
FL_HD Philox4 dropout_group(uint64_t seed, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Keep decision of one random word: uniform u = (word >> 8) * 2^-24 in [0, 1), kept when u >= p.
FL_HD bool dropout_keep_word(uint32_t word, float p) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f) >= p;
}

// Keep decision of mask element `index` (one Philox call; loops use dropout_group).
FL_HD bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  return dropout_keep_word(dropout_group(seed, index >> 2).x[index & 3], p);
}

}  // namespace fusedlayers
