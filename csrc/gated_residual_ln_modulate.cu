// gated_residual_ln_modulate, one pass over the row:
//   h_out = res + gate[:, None, :] * y
//   out   = LayerNorm(h) * (1 + scale[:, None, :]) + shift[:, None, :]
// LayerNorm (no affine, fp32 statistics) reads the fp32 h kept in shared
// memory, not h_out rounded to T. Kernel in modulated_layernorm.cuh; torch
// glue in gated_residual_ln_modulate.cpp.
#include "launchers.h"
#include "modulated_layernorm.cuh"

namespace mosaic {

template <typename T>
cudaError_t launch_gated_residual_ln_modulate(
    T* h_out, T* out, const T* res, const T* gate, const T* y, const T* shift,
    const T* scale, int64_t num_rows, int64_t seq_len, int64_t hidden,
    float eps, cudaStream_t stream) {
  return launch_modulated_layernorm<T, /*kGated=*/true>(
      h_out, out, res, gate, y, shift, scale, num_rows, seq_len, hidden, eps,
      stream);
}

#define MOSAIC_INSTANTIATE_GATED_RESIDUAL_LN_MODULATE(T)                    \
  template cudaError_t launch_gated_residual_ln_modulate<T>(                \
      T*, T*, const T*, const T*, const T*, const T*, const T*, int64_t,    \
      int64_t, int64_t, float, cudaStream_t);

MOSAIC_INSTANTIATE_GATED_RESIDUAL_LN_MODULATE(float)
MOSAIC_INSTANTIATE_GATED_RESIDUAL_LN_MODULATE(__half)
MOSAIC_INSTANTIATE_GATED_RESIDUAL_LN_MODULATE(__nv_bfloat16)

}  // namespace mosaic
