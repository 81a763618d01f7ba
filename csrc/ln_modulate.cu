// ln_modulate: out = LayerNorm(x) * (1 + scale[:, None, :]) + shift[:, None, :]
// (LayerNorm without affine parameters, fp32 statistics). Kernel in
// modulated_layernorm.cuh; torch glue in ln_modulate.cpp.
#include "launchers.h"
#include "modulated_layernorm.cuh"

namespace mosaic {

template <typename T>
cudaError_t launch_ln_modulate(T* out, const T* x, const T* shift,
                               const T* scale, int64_t num_rows,
                               int64_t seq_len, int64_t hidden, float eps,
                               cudaStream_t stream) {
  return launch_modulated_layernorm<T, /*kGated=*/false>(
      /*h_out=*/nullptr, out, x, /*gate=*/nullptr, /*y=*/nullptr, shift, scale,
      num_rows, seq_len, hidden, eps, stream);
}

#define MOSAIC_INSTANTIATE_LN_MODULATE(T)                                  \
  template cudaError_t launch_ln_modulate<T>(                              \
      T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, float, \
      cudaStream_t);

MOSAIC_INSTANTIATE_LN_MODULATE(float)
MOSAIC_INSTANTIATE_LN_MODULATE(__half)
MOSAIC_INSTANTIATE_LN_MODULATE(__nv_bfloat16)

}  // namespace mosaic
