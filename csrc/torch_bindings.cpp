// Registers the compiled ops as torch.ops.mosaic_C.<name>.
//
// Schema notes: `Tensor!` marks an argument the op writes in place (the
// destination-passing outputs, listed first); `float` is a C++ double;
// `-> ()` returns nothing. Every op has a CUDA kernel only: these are the
// internal destination-passing ops called inside the body of the Python
// custom op mosaic::<op> (mosaic_kernels/ops/<op>.py), which allocates the
// outputs and carries the one fake torch.compile traces. Their TORCH_CHECKs
// are the last guard; the Python op validates first.
#include <torch/library.h>

#include "ops.h"
#include "registration.h"

TORCH_LIBRARY(mosaic_C, m) {
  // Layernorm + adaLN modulate

  // out = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :]
  m.def(
      "ln_modulate(Tensor! out, Tensor x, Tensor shift, Tensor scale, "
      "float eps) -> ()");
  m.impl("ln_modulate", c10::kCUDA, &mosaic::ln_modulate);

  // h_out = res + gate[:, None, :] * y;
  // out = LN(h_out) * (1 + scale[:, None, :]) + shift[:, None, :]
  m.def(
      "gated_residual_ln_modulate(Tensor! h_out, Tensor! out, Tensor res, "
      "Tensor gate, Tensor y, Tensor shift, Tensor scale, float eps) -> ()");
  m.impl("gated_residual_ln_modulate", c10::kCUDA,
         &mosaic::gated_residual_ln_modulate);
}

// `import mosaic_kernels._C` loads this library, which runs the
// registration above.
REGISTER_EXTENSION(_C)
