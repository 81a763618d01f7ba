// Torch glue of ln_modulate: argument checks, device guard, stream, dtype
// dispatch to the raw-pointer launcher of ln_modulate.cu.
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dispatch_utils.h"
#include "launchers.h"
#include "ops.h"
#include "tensor_checks.h"

namespace mosaic {

namespace {

constexpr const char* kOp = "ln_modulate";

void check_ln_modulate(const at::Tensor& out, const at::Tensor& x,
                       const at::Tensor& shift, const at::Tensor& scale,
                       double eps) {
  check_rows(kOp, "x", x, eps);
  const int64_t batch = x.size(0);
  const int64_t hidden = x.size(2);
  check_like(kOp, "shift", shift, "x", x, {batch, hidden});
  check_like(kOp, "scale", scale, "x", x, {batch, hidden});
  check_like(kOp, "out", out, "x", x, x.sizes());
}

}  // namespace

void ln_modulate(at::Tensor& out, const at::Tensor& x, const at::Tensor& shift,
                 const at::Tensor& scale, double eps) {
  check_ln_modulate(out, x, shift, scale, eps);
  check_cuda(kOp, "x", x);
  at::assert_no_overlap(out, x);
  at::assert_no_overlap(out, shift);
  at::assert_no_overlap(out, scale);
  if (x.numel() == 0) return;

  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t num_rows = x.size(0) * x.size(1);
  MOSAIC_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
    C10_CUDA_CHECK(launch_ln_modulate(
        cuda_ptr<scalar_t>(out), cuda_ptr<scalar_t>(x),
        cuda_ptr<scalar_t>(shift), cuda_ptr<scalar_t>(scale), num_rows,
        x.size(1), x.size(2), static_cast<float>(eps), stream));
  });
}

}  // namespace mosaic
