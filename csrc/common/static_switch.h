// The one place where runtime options become template constants (the pattern of
// FlashAttention's static_switch.h). Each macro evaluates its last argument, a lambda,
// with a constexpr / type alias named by the caller bound to the runtime value:
//
//   FL_HEADDIM_SWITCH(p.head_dim_max, kD, [&] {
//     FL_HALF_SWITCH(p.dtype == DType::bf16, T, [&] { launch<T, kD>(p, stream); });
//   });
//
// Every combination a switch can reach is instantiated, so keep them few: the CUDA
// attention kernels are instantiated for 2 dtypes x 3 head-dim buckets only; causal,
// masks, dropout, varlen and determinism are runtime arguments of the kernels.
#pragma once

// NAME = the boolean COND, as a constexpr bool.
#define FL_BOOL_SWITCH(COND, NAME, ...)      \
  [&] {                                      \
    if (COND) {                              \
      constexpr static bool NAME = true;     \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr static bool NAME = false;    \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// NAME = the head-dim bucket of D (64, 128 or 256): the smallest that holds D. The
// caller has checked 1 <= D <= 256; a kernel of bucket kD pads / masks the columns D..kD.
#define FL_HEADDIM_SWITCH(D, NAME, ...)      \
  [&] {                                      \
    if ((D) <= 64) {                         \
      constexpr static int NAME = 64;        \
      return __VA_ARGS__();                  \
    } else if ((D) <= 128) {                 \
      constexpr static int NAME = 128;       \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr static int NAME = 256;       \
      return __VA_ARGS__();                  \
    }                                        \
  }()

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NAME = __nv_bfloat16 when IS_BF16, else __half (the tensor-core input types).
#define FL_HALF_SWITCH(IS_BF16, NAME, ...)   \
  [&] {                                      \
    if (IS_BF16) {                           \
      using NAME = __nv_bfloat16;            \
      return __VA_ARGS__();                  \
    } else {                                 \
      using NAME = __half;                   \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// NAME = the CUDA type of a fusedlayers DType code (0 float32, 1 float16, 2 bfloat16;
// common/params.h).
#define FL_FLOAT_SWITCH(DTYPE_CODE, NAME, ...) \
  [&] {                                        \
    switch (static_cast<int>(DTYPE_CODE)) {    \
      case 1: {                                \
        using NAME = __half;                   \
        return __VA_ARGS__();                  \
      }                                        \
      case 2: {                                \
        using NAME = __nv_bfloat16;            \
        return __VA_ARGS__();                  \
      }                                        \
      default: {                               \
        using NAME = float;                    \
        return __VA_ARGS__();                  \
      }                                        \
    }                                          \
  }()
#endif  // __CUDACC__
