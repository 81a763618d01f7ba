// Declarations of the ops registered in torch_bindings.cpp.
//
// Destination-passing: outputs come first as `at::Tensor&` (schema `Tensor!`),
// inputs are `const at::Tensor&`, schema `float` is `double`. Each op has a
// CUDA implementation only: torch.compile sees the Python custom op
// mosaic::<op> (mosaic_kernels/ops/<op>.py), whose one fake is its
// register_fake; these ops run inside its body.
#pragma once

#include <ATen/core/Tensor.h>

namespace mosaic {

// out = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :]
//   out, x: (B, L, D); shift, scale: (B, D); one dtype (fp32/fp16/bf16).
void ln_modulate(at::Tensor& out, const at::Tensor& x, const at::Tensor& shift,
                 const at::Tensor& scale, double eps);

// h_out = res + gate[:, None, :] * y
// out   = LN(h) * (1 + scale[:, None, :]) + shift[:, None, :]
//   h_out, out, res, y: (B, L, D); gate, shift, scale: (B, D); one dtype.
void gated_residual_ln_modulate(at::Tensor& h_out, at::Tensor& out,
                                const at::Tensor& res, const at::Tensor& gate,
                                const at::Tensor& y, const at::Tensor& shift,
                                const at::Tensor& scale, double eps);

}  // namespace mosaic
