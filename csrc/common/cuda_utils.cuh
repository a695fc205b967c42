// Device helpers shared by the CUDA kernels of fusedlayers (csrc/attention/*_cuda.cu,
// csrc/layer_norm/layer_norm_cuda.cu): float conversions of the three storage types,
// 8-element row chunks loaded / stored with one or two 16-byte accesses when aligned, the
// dropout keep decisions of common/philox.h, and warp reductions.
// No torch header: kernel translation units that include only this compile in seconds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/philox.h"

namespace fusedlayers::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------- 8-element chunks

constexpr int kChunk = 8;  // elements per chunk: 16 bytes of a 16-bit type, 32 of float32

// v[0..n) = p[0..n) as float, v[n..8) = 0. `vec`: p is 16-byte aligned and n == 8.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int n, bool vec, float (&v)[kChunk]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) v[i] = to_float(h[i]);
    } else {
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = i < n ? to_float(p[i]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int n, bool vec, const float (&v)[kChunk]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) h[i] = from_float<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (i < n) p[i] = from_float<T>(v[i]);
    }
  }
}

// The same for a tensor whose dtype is known at run time only (DType code 0/1/2): the
// branch is uniform across the warp.
__device__ __forceinline__ void load_chunk_any(const void* p, int dtype, int64_t offset, int n, bool vec,
                                               float (&v)[kChunk]) {
  switch (dtype) {
    case 1: load_chunk(static_cast<const __half*>(p) + offset, n, vec, v); break;
    case 2: load_chunk(static_cast<const __nv_bfloat16*>(p) + offset, n, vec, v); break;
    default: load_chunk(static_cast<const float*>(p) + offset, n, vec, v); break;
  }
}

__device__ __forceinline__ void store_chunk_any(void* p, int dtype, int64_t offset, int n, bool vec,
                                                const float (&v)[kChunk]) {
  switch (dtype) {
    case 1: store_chunk(static_cast<__half*>(p) + offset, n, vec, v); break;
    case 2: store_chunk(static_cast<__nv_bfloat16*>(p) + offset, n, vec, v); break;
    default: store_chunk(static_cast<float*>(p) + offset, n, vec, v); break;
  }
}

// ---------------------------------------------------------------- dropout

__device__ __forceinline__ uint32_t philox_word(const Philox4& w, unsigned j) {
  return j == 0 ? w.x[0] : j == 1 ? w.x[1] : j == 2 ? w.x[2] : w.x[3];  // no local-memory indexing
}

// Keep decisions of mask elements index0 .. index0 + 7 (common/philox.h): at most three
// Philox calls, two when index0 is a multiple of 4.
__device__ __forceinline__ void dropout_keep_chunk(uint64_t seed, uint64_t index0, float p, bool (&keep)[kChunk]) {
  uint64_t group = index0 >> 2;
  Philox4 w = dropout_group(seed, group);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const uint64_t index = index0 + i;
    if ((index >> 2) != group) {
      group = index >> 2;
      w = dropout_group(seed, group);
    }
    keep[i] = dropout_keep_word(philox_word(w, static_cast<unsigned>(index & 3)), p);
  }
}

// Keep decision of mask element `index` (philox.h's dropout_keep without local memory).
__device__ __forceinline__ bool dropout_keep_one(uint64_t seed, uint64_t index, float p) {
  return dropout_keep_word(philox_word(dropout_group(seed, index >> 2), static_cast<unsigned>(index & 3)), p);
}

// Keep decisions of the two mask elements index and index + 1.
__device__ __forceinline__ void dropout_keep_pair(uint64_t seed, uint64_t index, float p, bool& keep0, bool& keep1) {
  const Philox4 w = dropout_group(seed, index >> 2);
  const unsigned j = static_cast<unsigned>(index & 3);
  keep0 = dropout_keep_word(philox_word(w, j), p);
  keep1 = j < 3 ? dropout_keep_word(philox_word(w, j + 1), p)
                : dropout_keep_word(dropout_group(seed, (index >> 2) + 1).x[0], p);
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace fusedlayers::cuda
