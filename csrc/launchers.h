// Raw-pointer launchers of the CUDA kernels (no torch headers).
//
// The .cu files include only this header and the CUDA runtime, so they build
// fast and never see ATen. The torch glue (.cpp) checks the tensors and calls
// these with T = float, __half or __nv_bfloat16 (explicitly instantiated in the
// .cu files). Every launcher returns the launch status (cudaGetLastError) for
// the caller to check.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace mosaic {

// Rows whose fp32 copy fits in this much shared memory are cached there
// (one global read per element); wider rows are re-read from global memory.
constexpr int64_t kMaxCachedHidden = 8192;

// Largest hidden size the ops accept (keeps in-row indices in int32).
constexpr int64_t kMaxHidden = int64_t{1} << 24;

// out = LN(x) * (1 + scale[b]) + shift[b], LN without affine, fp32 statistics.
//   out, x:       [num_rows, hidden]  (num_rows = B * seq_len, row-major)
//   shift, scale: [num_rows / seq_len, hidden]
template <typename T>
cudaError_t launch_ln_modulate(T* out, const T* x, const T* shift,
                               const T* scale, int64_t num_rows,
                               int64_t seq_len, int64_t hidden, float eps,
                               cudaStream_t stream);

// h_out = res + gate[b] * y;  out = LN(h) * (1 + scale[b]) + shift[b],
// with LN computed from the fp32 h (before it is rounded into h_out).
//   h_out, out, res, y:       [num_rows, hidden]
//   gate, shift, scale:       [num_rows / seq_len, hidden]
template <typename T>
cudaError_t launch_gated_residual_ln_modulate(
    T* h_out, T* out, const T* res, const T* gate, const T* y, const T* shift,
    const T* scale, int64_t num_rows, int64_t seq_len, int64_t hidden,
    float eps, cudaStream_t stream);

}  // namespace mosaic
