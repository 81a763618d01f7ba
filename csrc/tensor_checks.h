// Argument checks shared by the torch glue of every op (.cpp files only).
//
// Each check raises c10::Error (RuntimeError in Python) whose message starts
// with the op name and states the expected and the actual value.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "launchers.h"

namespace mosaic {

// t must be float32, float16 or bfloat16.
inline void check_floating(const char* op, const char* name,
                           const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": ", name, " must be float32, float16 or bfloat16, got ", dt);
}

// t must have ref's dtype and device, be contiguous and have `shape`.
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref,
                       at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name,
              " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous, got strides ", t.strides());
}

// Checks the (B, L, D) row input shared by the modulated-LayerNorm ops.
inline void check_rows(const char* op, const char* name, const at::Tensor& x,
                       double eps) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be 3-D (B, L, D), got shape ",
              x.sizes());
  check_floating(op, name, x);
  TORCH_CHECK(x.is_contiguous(), op, ": ", name,
              " must be contiguous, got strides ", x.strides());
  const int64_t hidden = x.size(2);
  TORCH_CHECK(hidden >= 1 && hidden <= kMaxHidden, op,
              ": hidden size D must be in [1, ", kMaxHidden, "], got ", hidden);
  TORCH_CHECK(x.size(0) * x.size(1) <= std::numeric_limits<int32_t>::max(),
              op, ": B * L must be at most ",
              std::numeric_limits<int32_t>::max(), ", got ",
              x.size(0) * x.size(1));
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

// x must be a CUDA tensor (the compiled kernels run on CUDA only).
inline void check_cuda(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ",
              x.device());
}

}  // namespace mosaic
