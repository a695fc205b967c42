// CUDA kernels of the norm family: (residual-add +) layer norm and RMS norm, forward and
// backward, and the dropout keep-mask of the kernels' Philox stream.
//
//   forward   z = dropout(x) + residual (stored when wanted), y = (z - mean) * rstd * w + b
//   backward  xhat = (z - mean) * rstd, wdy = dy * w,
//             dz = rstd * (wdy - mean(wdy) - xhat * mean(xhat * wdy)) + dz_in   (RMS: no mean(wdy))
//             dresidual = dz, dx = dropout(dz), dweight = sum_rows dy * xhat, dbias = sum_rows dy
//
// Work split: a "team" of threads owns one row at a time: one warp per row (four rows per
// block) when hidden <= 1024, else one block of up to 256 threads per row. A thread owns
// the 8-element chunks tid, tid + team, ... of the row, moved with 16-byte accesses when
// NormParams::vec (element by element otherwise, e.g. odd hidden or strided rows); its
// first kCache chunks stay in registers between the passes, the rest (rows longer than
// team * kCache * 8) are re-read from global memory (L2). Statistics in float32: each
// chunk's exact (count, mean, M2), merged by Chan's formula (common/mean_var.h) within the
// thread, the warp (shuffles) and the block (shared memory), result broadcast from one
// lane so every thread of a row uses bit-identical mean / rstd.
// dweight / dbias: each team sums dy * xhat and dy over its rows for its columns (registers
// for the cached chunks, its own row of the partial buffer for the others), writes its
// row of the (teams, hidden) float32 partial buffer; the op glue sums the buffer over teams
// (at::sum: deterministic).
//
// No torch header here (compiles in seconds); the op glue is layer_norm_op_cuda.cpp.
// Checked by tests/test_cuda_kernels.py (pytest -m gpu) through fusedlayers.testing.check_norm;
// benchmarked by `fusedlayers bench` (norm GB/s). Not yet run on a GPU: see README.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/mean_var.h"
#include "common/static_switch.h"
#include "layer_norm/layer_norm_cuda.h"

namespace fusedlayers::cuda {
namespace {

constexpr int kMaxThreads = 256;   // per block; __launch_bounds__ of both kernels
constexpr int kFwdCache = 4;       // chunks per thread kept in registers (forward)
constexpr int kBwdCache = 2;       // (backward: also holds the dweight / dbias sums)
constexpr int kMaxWarpsPerRow = kMaxThreads / 32;
constexpr int kRowsPerWarpBlock = 4;

__device__ __forceinline__ MeanVar shfl_xor(const MeanVar& v, int o) {
  return {__shfl_xor_sync(0xffffffffu, v.count, o), __shfl_xor_sync(0xffffffffu, v.mean, o),
          __shfl_xor_sync(0xffffffffu, v.m2, o)};
}
__device__ __forceinline__ MeanVar shfl0(const MeanVar& v) {
  return {__shfl_sync(0xffffffffu, v.count, 0), __shfl_sync(0xffffffffu, v.mean, 0),
          __shfl_sync(0xffffffffu, v.m2, 0)};
}
__device__ __forceinline__ float2 shfl_xor(const float2& v, int o) {
  return {__shfl_xor_sync(0xffffffffu, v.x, o), __shfl_xor_sync(0xffffffffu, v.y, o)};
}
__device__ __forceinline__ float2 shfl0(const float2& v) {
  return {__shfl_sync(0xffffffffu, v.x, 0), __shfl_sync(0xffffffffu, v.y, 0)};
}

struct MergeMeanVar {
  __device__ MeanVar operator()(const MeanVar& a, const MeanVar& b) const { return mean_var_merge(a, b); }
};
struct AddPair {
  __device__ float2 operator()(const float2& a, const float2& b) const { return {a.x + b.x, a.y + b.y}; }
};

// Combines v over the team of row threadIdx.y (blockDim.x threads); every thread of the
// team returns the same bits. Called by every thread of the block (it may synchronise).
// smem: kRowsPerWarpBlock * kMaxWarpsPerRow entries.
template <typename V, typename Op>
__device__ V team_reduce(V v, Op op, V* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  v = shfl0(v);  // xor-merges may differ in the last bit between lanes: take lane 0's
  if (blockDim.x > 32) {  // uniform over the block
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    V* row_smem = smem + threadIdx.y * kMaxWarpsPerRow;
    __syncthreads();  // the previous row's readers are done
    if (threadIdx.x % 32 == 0) row_smem[warp] = v;
    __syncthreads();
    v = row_smem[0];
    for (int w = 1; w < warps; ++w) v = op(v, row_smem[w]);
  }
  return v;
}

// Chunk ch of the row: its first column and its number of valid elements.
struct Chunk {
  int64_t col0;
  int n;
};
__device__ __forceinline__ Chunk chunk_of(int64_t ch, int64_t hidden) {
  const int64_t col0 = ch * kChunk;
  const int64_t left = hidden - col0;
  return {col0, static_cast<int>(left < kChunk ? left : kChunk)};
}

// ------------------------------------------------------------------------- forward

// z of one chunk: dropout(x) + residual, in float32.
template <typename T>
__device__ __forceinline__ void load_z(const NormParams& p, int64_t row, const Chunk& c, bool vec, float inv_keep,
                                       float (&v)[kChunk]) {
  load_chunk(static_cast<const T*>(p.x) + row * p.x_rs + c.col0, c.n, vec, v);
  if (p.dropout_p > 0.0f) {
    bool keep[kChunk];
    dropout_keep_chunk(p.seed, static_cast<uint64_t>(row * p.hidden + c.col0), p.dropout_p, keep);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = keep[i] ? v[i] * inv_keep : 0.0f;
  }
  if (p.residual != nullptr) {
    float r[kChunk];
    load_chunk_any(p.residual, static_cast<int>(p.residual_dtype), row * p.residual_rs + c.col0, c.n, vec, r);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] += r[i];
  }
}

// Folds one chunk into the thread's statistics (mean / M2 for layer norm, sum of squares
// for RMS norm).
__device__ __forceinline__ void fold_chunk(const float (&v)[kChunk], int n, bool rms, MeanVar& mv, float& ss) {
  if (rms) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) ss += v[i] * v[i];  // padding is 0
    return;
  }
  // mean of the chunk shifted by its first element: exact for a constant chunk (a plain sum / n
  // is off by a rounding error d, and a constant row must normalise to exactly 0 whatever eps)
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) sum += i < n ? v[i] - v[0] : 0.0f;
  const float mean = v[0] + sum / static_cast<float>(n);
  float m2 = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const float d = v[i] - mean;
    m2 += i < n ? d * d : 0.0f;
  }
  mv = mean_var_merge(mv, mean_var_of(static_cast<float>(n), mean, m2));
}

__device__ __forceinline__ void normalize_store(const NormParams& p, int64_t row, const Chunk& c, bool vec, float mean,
                                                float rstd, float (&v)[kChunk]) {
  float w[kChunk], b[kChunk];
  if (p.weight != nullptr) load_chunk_any(p.weight, static_cast<int>(p.weight_dtype), c.col0, c.n, vec, w);
  if (p.bias != nullptr) load_chunk_any(p.bias, static_cast<int>(p.bias_dtype), c.col0, c.n, vec, b);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    float y = (v[i] - mean) * rstd;
    if (p.weight != nullptr) y *= w[i];
    if (p.bias != nullptr) y += b[i];
    v[i] = y;
  }
  store_chunk_any(p.y, static_cast<int>(p.x_dtype), row * p.hidden + c.col0, c.n, vec, v);
}

// This thread's chunks of a row (chunk tid + k * team, while the row is active): cached(k, c, vec) for the first
// kCache of them (k indexes the caller's register cache), then rest(c, vec) for the others.
template <int kCache, typename Cached, typename Rest>
__device__ __forceinline__ void for_each_chunk(const NormParams& p, int tid, int team, bool active, Cached cached,
                                               Rest rest) {
  const int64_t nchunks = (p.hidden + kChunk - 1) / kChunk;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t ch = tid + static_cast<int64_t>(k) * team;
    if (active && ch < nchunks) {
      const Chunk c = chunk_of(ch, p.hidden);
      cached(k, c, p.vec && c.n == kChunk);
    }
  }
  for (int64_t ch = tid + static_cast<int64_t>(kCache) * team; active && ch < nchunks; ch += team) {
    const Chunk c = chunk_of(ch, p.hidden);
    rest(c, p.vec && c.n == kChunk);
  }
}

// One row per team (blockDim.x threads, blockDim.y rows per block), rows grid-strided.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_fwd_kernel(const NormParams p) {
  __shared__ MeanVar smem_mv[kRowsPerWarpBlock * kMaxWarpsPerRow];
  __shared__ float2 smem_f2[kRowsPerWarpBlock * kMaxWarpsPerRow];
  const int team = blockDim.x, tid = threadIdx.x;
  const float inv_keep = p.dropout_p > 0.0f ? 1.0f / (1.0f - p.dropout_p) : 1.0f;

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < p.rows;  // every thread stays for the team reductions
    float cache[kFwdCache][kChunk];
    MeanVar mv = mean_var_init();
    float ss = 0.0f;

    // pass 1: z (stored when wanted) and its statistics
    auto pass1 = [&](const Chunk& c, bool vec, float (&v)[kChunk]) {
      load_z<T>(p, row, c, vec, inv_keep, v);
      fold_chunk(v, c.n, p.rms, mv, ss);
      if (p.z != nullptr) store_chunk_any(p.z, static_cast<int>(p.z_dtype), row * p.hidden + c.col0, c.n, vec, v);
    };
    for_each_chunk<kFwdCache>(
        p, tid, team, active, [&](int k, const Chunk& c, bool vec) { pass1(c, vec, cache[k]); },
        [&](const Chunk& c, bool vec) {
          float v[kChunk];
          pass1(c, vec, v);
        });

    float mean = 0.0f, rstd;
    if (p.rms) {
      const float2 s = team_reduce(make_float2(ss, 0.0f), AddPair(), smem_f2);
      rstd = 1.0f / sqrtf(s.x / static_cast<float>(p.hidden) + p.eps);
    } else {
      mv = team_reduce(mv, MergeMeanVar(), smem_mv);
      mean = mv.mean;
      rstd = mean_var_rstd(mv, p.eps);
    }
    if (active && tid == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }

    // pass 2: y
    for_each_chunk<kFwdCache>(
        p, tid, team, active,
        [&](int k, const Chunk& c, bool vec) { normalize_store(p, row, c, vec, mean, rstd, cache[k]); },
        [&](const Chunk& c, bool vec) {
          float v[kChunk];
          load_z<T>(p, row, c, vec, inv_keep, v);
          normalize_store(p, row, c, vec, mean, rstd, v);
        });
  }
}

// ------------------------------------------------------------------------ backward

// xhat, dy and wdy = dy * w of one chunk.
template <typename T>
__device__ __forceinline__ void load_bwd(const NormParams& p, int64_t row, const Chunk& c, bool vec, float mean,
                                         float rstd, float (&xhat)[kChunk], float (&dy)[kChunk],
                                         float (&wdy)[kChunk]) {
  load_chunk_any(p.zin, static_cast<int>(p.zin_dtype), row * p.zin_rs + c.col0, c.n, vec, xhat);
  load_chunk(static_cast<const T*>(p.dy) + row * p.hidden + c.col0, c.n, vec, dy);
  float w[kChunk];
  if (p.weight != nullptr) load_chunk_any(p.weight, static_cast<int>(p.weight_dtype), c.col0, c.n, vec, w);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    xhat[i] = i < c.n ? (xhat[i] - mean) * rstd : 0.0f;
    wdy[i] = p.weight != nullptr ? dy[i] * w[i] : dy[i];
  }
}

// dz, dresidual and dx of one chunk, given xhat and wdy.
template <typename T>
__device__ __forceinline__ void store_bwd(const NormParams& p, int64_t row, const Chunk& c, bool vec, float rstd,
                                          float c1, float c2, float inv_keep, const float (&xhat)[kChunk],
                                          const float (&wdy)[kChunk]) {
  float dz[kChunk];
#pragma unroll
  for (int i = 0; i < kChunk; ++i) dz[i] = (wdy[i] - xhat[i] * c1 - c2) * rstd;
  const int64_t at = row * p.hidden + c.col0;
  if (p.dz != nullptr) {
    float g[kChunk];
    load_chunk_any(p.dz, static_cast<int>(p.dz_dtype), at, c.n, vec, g);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) dz[i] += g[i];
  }
  if (p.dresidual != nullptr) store_chunk_any(p.dresidual, static_cast<int>(p.residual_dtype), at, c.n, vec, dz);
  if (p.dropout_p > 0.0f) {
    bool keep[kChunk];
    dropout_keep_chunk(p.seed, static_cast<uint64_t>(at), p.dropout_p, keep);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) dz[i] = keep[i] ? dz[i] * inv_keep : 0.0f;
  }
  store_chunk(static_cast<T*>(p.dx) + at, c.n, vec, dz);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_bwd_kernel(const NormParams p) {
  __shared__ float2 smem_f2[kRowsPerWarpBlock * kMaxWarpsPerRow];
  const int team = blockDim.x, tid = threadIdx.x;
  const int64_t team_id = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const float inv_keep = p.dropout_p > 0.0f ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const float inv_n = 1.0f / static_cast<float>(p.hidden);
  float* dw_row = p.dweight_partial != nullptr ? p.dweight_partial + team_id * p.hidden : nullptr;
  float* db_row = p.dbias_partial != nullptr ? p.dbias_partial + team_id * p.hidden : nullptr;
  float dw_acc[kBwdCache][kChunk], db_acc[kBwdCache][kChunk];
#pragma unroll
  for (int k = 0; k < kBwdCache; ++k) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) dw_acc[k][i] = db_acc[k][i] = 0.0f;
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < p.rows;
    const float mean = active && p.mean != nullptr ? p.mean[row] : 0.0f;
    const float rstd = active ? p.rstd[row] : 0.0f;
    float xhat_c[kBwdCache][kChunk];
    float s1 = 0.0f, s2 = 0.0f;  // sum xhat * wdy, sum wdy

    // pass 1: the two row sums, and this team's dweight / dbias contributions
    for_each_chunk<kBwdCache>(
        p, tid, team, active,
        [&](int k, const Chunk& c, bool vec) {
          float dy[kChunk], wdy[kChunk];
          load_bwd<T>(p, row, c, vec, mean, rstd, xhat_c[k], dy, wdy);
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
            s1 += xhat_c[k][i] * wdy[i];
            s2 += wdy[i];
            dw_acc[k][i] += dy[i] * xhat_c[k][i];
            db_acc[k][i] += dy[i];
          }
        },
        [&](const Chunk& c, bool vec) {
          float xhat[kChunk], dy[kChunk], wdy[kChunk];
          load_bwd<T>(p, row, c, vec, mean, rstd, xhat, dy, wdy);
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
            s1 += xhat[i] * wdy[i];
            s2 += wdy[i];
            if (i < c.n && dw_row != nullptr) dw_row[c.col0 + i] += dy[i] * xhat[i];  // this team's own row
            if (i < c.n && db_row != nullptr) db_row[c.col0 + i] += dy[i];
          }
        });
    const float2 s = team_reduce(make_float2(s1, s2), AddPair(), smem_f2);
    const float c1 = s.x * inv_n;                    // mean(xhat * wdy)
    const float c2 = p.rms ? 0.0f : s.y * inv_n;     // mean(wdy)

    // pass 2: dz, dresidual, dx
    for_each_chunk<kBwdCache>(
        p, tid, team, active,
        [&](int k, const Chunk& c, bool vec) {
          float dy[kChunk], w[kChunk], wdy[kChunk];
          load_chunk(static_cast<const T*>(p.dy) + row * p.hidden + c.col0, c.n, vec, dy);
          if (p.weight != nullptr) load_chunk_any(p.weight, static_cast<int>(p.weight_dtype), c.col0, c.n, vec, w);
#pragma unroll
          for (int i = 0; i < kChunk; ++i) wdy[i] = p.weight != nullptr ? dy[i] * w[i] : dy[i];
          store_bwd<T>(p, row, c, vec, rstd, c1, c2, inv_keep, xhat_c[k], wdy);
        },
        [&](const Chunk& c, bool vec) {
          float xhat[kChunk], dy[kChunk], wdy[kChunk];
          load_bwd<T>(p, row, c, vec, mean, rstd, xhat, dy, wdy);
          store_bwd<T>(p, row, c, vec, rstd, c1, c2, inv_keep, xhat, wdy);
        });
  }

  // this team's partial sums of the cached columns (the others are already in its row)
  for_each_chunk<kBwdCache>(
      p, tid, team, true,
      [&](int k, const Chunk& c, bool) {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          if (i < c.n && dw_row != nullptr) dw_row[c.col0 + i] = dw_acc[k][i];
          if (i < c.n && db_row != nullptr) db_row[c.col0 + i] = db_acc[k][i];
        }
      },
      [](const Chunk&, bool) {});
}

__global__ void dropout_keep_mask_kernel(bool* __restrict__ keep, int64_t n, uint64_t seed, float p) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 w = dropout_group(seed, static_cast<uint64_t>(g));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (g * 4 + j < n) keep[g * 4 + j] = dropout_keep_word(philox_word(w, j), p);
    }
  }
}

// ------------------------------------------------------------------------ launch

int sm_count(int device) {
  static int counts[64] = {0};
  const int d = device >= 0 && device < 64 ? device : 0;
  if (counts[d] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[d] = std::max(n, 1);
  }
  return counts[d];
}

// Threads per row and rows per block: one warp per row (4 rows per block) up to
// hidden = 32 * cache * 8, else enough threads for `cache` chunks each, at most 256.
dim3 team_shape(int64_t hidden, int cache) {
  const int64_t nchunks = (hidden + kChunk - 1) / kChunk;
  const int64_t per_row = (nchunks + cache - 1) / cache;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (per_row + 31) / 32 * 32)));
  return dim3(threads, threads == 32 ? kRowsPerWarpBlock : 1);
}

int current_device() {
  int d = 0;
  C10_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

}  // namespace

int64_t norm_bwd_teams(int64_t rows, int64_t hidden, int device) {
  const dim3 block = team_shape(hidden, kBwdCache);
  const int64_t blocks = std::min<int64_t>((rows + block.y - 1) / block.y, 4LL * sm_count(device));
  return std::max<int64_t>(blocks, 1) * block.y;
}

void norm_fwd_launch(const NormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.hidden == 0) return;
  const dim3 block = team_shape(p.hidden, kFwdCache);
  const int64_t blocks = std::min<int64_t>((p.rows + block.y - 1) / block.y, 64LL * sm_count(current_device()));
  FL_FLOAT_SWITCH(p.x_dtype, T, [&] {
    norm_fwd_kernel<T><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void norm_bwd_launch(const NormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.hidden == 0) return;
  const dim3 block = team_shape(p.hidden, kBwdCache);
  const int64_t blocks = p.teams / block.y;  // = norm_bwd_teams(...) / rows per block
  TORCH_CHECK(blocks >= 1 && blocks * block.y == p.teams, "fusedlayers::norm_bwd_kernel: teams (", p.teams,
              ") does not match norm_bwd_teams");
  FL_FLOAT_SWITCH(p.x_dtype, T, [&] {
    norm_bwd_kernel<T><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dropout_keep_mask_launch(bool* keep, int64_t n, uint64_t seed, float p, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t groups = (n + 3) / 4;
  const int64_t blocks = std::min<int64_t>((groups + 255) / 256, 16LL * sm_count(current_device()));
  dropout_keep_mask_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(keep, n, seed, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fusedlayers::cuda
