// FL_HD: marks the tile-level math shared by the CPU kernels (g++) and the CUDA kernels
// (nvcc) as callable from both host and device code. Plain inline functions, no state.
#pragma once

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif
