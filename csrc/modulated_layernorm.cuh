// Shared device code of the LayerNorm + adaLN-modulate kernels.
//
// One thread block normalizes one row of `hidden` elements:
//   pass 1: load the row (for the gated op: h = res + gate * y, stored to
//           h_out), keep its fp32 copy in shared memory, sum -> mean;
//   pass 2: sum of squared deviations from the mean -> rstd (two-pass
//           variance: no catastrophic cancellation, unlike E[x^2] - E[x]^2);
//   pass 3: out = (v - mean) * rstd * (1 + scale) + shift, rounded to T.
// Statistics are fp32 whatever T is. Rows wider than kMaxCachedHidden are
// re-read from global memory in passes 2 and 3 instead of shared memory.
//
// The fast path moves 16 bytes per access (VEC = 16 / sizeof(T)); it is used
// only when every pointer is 16-byte aligned and hidden % VEC == 0. Otherwise
// VEC = 1 (the generic path: slower, never wrong).
//
// No torch headers here: see launchers.h.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace mosaic {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;

// fp32 <-> storage type conversions (round to nearest even on the way down).
template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

template <>
struct Cvt<__half> {
  __device__ __forceinline__ static float to_float(__half v) {
    return __half2float(v);
  }
  __device__ __forceinline__ static __half from_float(float v) {
    return __float2half_rn(v);
  }
};

template <>
struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// N consecutive elements moved with one load/store instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads vector i of p (elements i*N .. i*N+N-1) as fp32.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, int64_t i,
                                         float (&dst)[N]) {
  const Vec<T, N> v = reinterpret_cast<const Vec<T, N>*>(p)[i];
#pragma unroll
  for (int j = 0; j < N; ++j) dst[j] = Cvt<T>::to_float(v.v[j]);
}

// Stores fp32 values, rounded to T, as vector i of p.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int64_t i,
                                          const float (&src)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int j = 0; j < N; ++j) v.v[j] = Cvt<T>::from_float(src[j]);
  reinterpret_cast<Vec<T, N>*>(p)[i] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the block (blockDim.x must be a multiple of 32); every thread gets
// the result. `scratch` holds kWarpSize + 1 floats; calls may be repeated
// with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? scratch[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) scratch[kWarpSize] = v;
  }
  __syncthreads();
  return scratch[kWarpSize];
}

// One block per row; see the file comment. kGated selects the
// gated-residual input (h = x + gate * y, written to h_out).
template <typename T, int VEC, bool kGated, bool kCacheRow>
__global__ void __launch_bounds__(kMaxThreads) modulated_layernorm_kernel(
    T* __restrict__ h_out,        // [num_rows, hidden] (kGated only)
    T* __restrict__ out,          // [num_rows, hidden]
    const T* __restrict__ x,      // [num_rows, hidden] (res when kGated)
    const T* __restrict__ gate,   // [B, hidden] (kGated only)
    const T* __restrict__ y,      // [num_rows, hidden] (kGated only)
    const T* __restrict__ shift,  // [B, hidden]
    const T* __restrict__ scale,  // [B, hidden]
    const int64_t seq_len,        // rows per batch element
    const int hidden, const float eps) {
  extern __shared__ float s_row[];  // [VEC][nvec]: fp32 row when kCacheRow
  __shared__ float s_scratch[kWarpSize + 1];

  const int nvec = hidden / VEC;
  const int64_t row = blockIdx.x;
  const int64_t row_vec = row * nvec;              // first vector of the row
  const int64_t cond_vec = (row / seq_len) * nvec;  // first vector of [b]

  // The row as fp32: x, or the fp32 gated residual (never rounded).
  auto load_row = [&](int i, float (&v)[VEC]) {
    load_vec<T, VEC>(x, row_vec + i, v);
    if constexpr (kGated) {
      float g[VEC], yv[VEC];
      load_vec<T, VEC>(gate, cond_vec + i, g);
      load_vec<T, VEC>(y, row_vec + i, yv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = fmaf(g[j], yv[j], v[j]);
    }
  };

  // Pass 1: load (and store h), cache, sum.
  float sum = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float v[VEC];
    load_row(i, v);
    if constexpr (kGated) store_vec<T, VEC>(h_out, row_vec + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sum += v[j];
      // Lane-major layout: consecutive threads hit consecutive banks.
      if constexpr (kCacheRow) s_row[j * nvec + i] = v[j];
    }
  }
  const float mean = block_sum(sum, s_scratch) / hidden;

  // Pass 2: variance around the mean. Each thread reads back only the
  // shared-memory entries it wrote, so no barrier is needed before it.
  float sq = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float v[VEC];
    if constexpr (kCacheRow) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = s_row[j * nvec + i];
    } else {
      load_row(i, v);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = v[j] - mean;
      sq = fmaf(d, d, sq);
    }
  }
  const float rstd = rsqrtf(block_sum(sq, s_scratch) / hidden + eps);

  // Pass 3: normalize, modulate, store.
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float v[VEC], sh[VEC], sc[VEC], o[VEC];
    if constexpr (kCacheRow) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = s_row[j * nvec + i];
    } else {
      load_row(i, v);
    }
    load_vec<T, VEC>(shift, cond_vec + i, sh);
    load_vec<T, VEC>(scale, cond_vec + i, sc);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      o[j] = fmaf((v[j] - mean) * rstd, 1.f + sc[j], sh[j]);
    }
    store_vec<T, VEC>(out, row_vec + i, o);
  }
}

inline bool is_aligned_16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T, int VEC, bool kGated>
cudaError_t launch_modulated_layernorm_vec(
    T* h_out, T* out, const T* x, const T* gate, const T* y, const T* shift,
    const T* scale, int64_t num_rows, int64_t seq_len, int hidden, float eps,
    cudaStream_t stream) {
  const int nvec = hidden / VEC;
  int threads = (nvec + kWarpSize - 1) / kWarpSize * kWarpSize;
  threads = threads < kMaxThreads ? threads : kMaxThreads;
  const dim3 grid(static_cast<unsigned int>(num_rows));
  if (hidden <= kMaxCachedHidden) {
    const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
    modulated_layernorm_kernel<T, VEC, kGated, true>
        <<<grid, threads, smem, stream>>>(h_out, out, x, gate, y, shift, scale,
                                          seq_len, hidden, eps);
  } else {
    modulated_layernorm_kernel<T, VEC, kGated, false>
        <<<grid, threads, 0, stream>>>(h_out, out, x, gate, y, shift, scale,
                                       seq_len, hidden, eps);
  }
  return cudaGetLastError();
}

// Picks the 16-byte vector path when legal, the scalar path otherwise.
// The caller has checked shapes (num_rows % seq_len == 0, hidden limits).
template <typename T, bool kGated>
cudaError_t launch_modulated_layernorm(T* h_out, T* out, const T* x,
                                       const T* gate, const T* y,
                                       const T* shift, const T* scale,
                                       int64_t num_rows, int64_t seq_len,
                                       int64_t hidden, float eps,
                                       cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized =
      hidden % kVec == 0 && is_aligned_16(h_out) && is_aligned_16(out) &&
      is_aligned_16(x) && is_aligned_16(gate) && is_aligned_16(y) &&
      is_aligned_16(shift) && is_aligned_16(scale);
  const int d = static_cast<int>(hidden);
  if (vectorized) {
    return launch_modulated_layernorm_vec<T, kVec, kGated>(
        h_out, out, x, gate, y, shift, scale, num_rows, seq_len, d, eps,
        stream);
  }
  return launch_modulated_layernorm_vec<T, 1, kGated>(
      h_out, out, x, gate, y, shift, scale, num_rows, seq_len, d, eps, stream);
}

}  // namespace mosaic
