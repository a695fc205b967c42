// Compiles what follows, up to cpu_capability_end.h, for one x86 SIMD level chosen by the
// including translation unit (csrc/cpu/kernels_<level>.cpp): at::vec::Vectorized then
// uses AVX2 or AVX-512 instructions, in its own namespace at::vec::<level>, and the
// kernel headers put their functions in fusedlayers::cpu::<level>. csrc/cpu/dispatch.cpp
// picks the level at run time (what ATen picks: ATEN_CPU_CAPABILITY, then the CPU), so
// the binary runs on any x86-64 and no -mavx* flag is needed (the ATen way, by pragma
// instead of per-file flags, which setup.py's one extension cannot give).
//
// The including file defines one of FUSEDLAYERS_CPU_AVX512 / FUSEDLAYERS_CPU_AVX2 (or
// neither: DEFAULT, scalar at::vec) and includes every torch header it needs BEFORE this
// one, so that no torch inline function is emitted with the wider instruction set.
// Only GCC on x86-64 takes the per-function target pragmas this relies on; elsewhere
// (clang, MSVC, ARM) every level compiles the DEFAULT code and dispatch.cpp picks DEFAULT.
#pragma once

#if !(defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__))
#undef FUSEDLAYERS_CPU_AVX512
#undef FUSEDLAYERS_CPU_AVX2
#else
#include <immintrin.h>
#endif

#if defined(FUSEDLAYERS_CPU_AVX512)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(FUSEDLAYERS_CPU_AVX2)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#if defined(FUSEDLAYERS_CPU_AVX512) || defined(FUSEDLAYERS_CPU_AVX2)
// sleef.h and ATen's vector headers choose their code by these macros (set by -mavx512f / -mavx2 /
// -mfma / -mavx, which this translation unit is not compiled with).
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wunknown-pragmas"      // at::vec's #pragma unroll
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_undefined_ps
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
