// Torch glue of gated_residual_ln_modulate: argument checks, device guard,
// stream, dtype dispatch to the raw-pointer launcher of
// gated_residual_ln_modulate.cu.
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

constexpr const char* kOp = "gated_residual_ln_modulate";

void check_gated_residual_ln_modulate(
    const at::Tensor& h_out, const at::Tensor& out, const at::Tensor& res,
    const at::Tensor& gate, const at::Tensor& y, const at::Tensor& shift,
    const at::Tensor& scale, double eps) {
  check_rows(kOp, "res", res, eps);
  const int64_t batch = res.size(0);
  const int64_t hidden = res.size(2);
  check_like(kOp, "y", y, "res", res, res.sizes());
  check_like(kOp, "gate", gate, "res", res, {batch, hidden});
  check_like(kOp, "shift", shift, "res", res, {batch, hidden});
  check_like(kOp, "scale", scale, "res", res, {batch, hidden});
  check_like(kOp, "h_out", h_out, "res", res, res.sizes());
  check_like(kOp, "out", out, "res", res, res.sizes());
}

}  // namespace

void gated_residual_ln_modulate(at::Tensor& h_out, at::Tensor& out,
                                const at::Tensor& res, const at::Tensor& gate,
                                const at::Tensor& y, const at::Tensor& shift,
                                const at::Tensor& scale, double eps) {
  check_gated_residual_ln_modulate(h_out, out, res, gate, y, shift, scale,
                                   eps);
  check_cuda(kOp, "res", res);
  // Outputs may alias neither each other nor any input.
  at::assert_no_overlap(h_out, out);
  for (const at::Tensor* dst : {&h_out, &out}) {
    for (const at::Tensor* src : {&res, &gate, &y, &shift, &scale}) {
      at::assert_no_overlap(*dst, *src);
    }
  }
  if (res.numel() == 0) return;

  const c10::cuda::CUDAGuard device_guard(res.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t num_rows = res.size(0) * res.size(1);
  MOSAIC_DISPATCH_FLOATING_TYPES(res.scalar_type(), kOp, [&] {
    C10_CUDA_CHECK(launch_gated_residual_ln_modulate(
        cuda_ptr<scalar_t>(h_out), cuda_ptr<scalar_t>(out),
        cuda_ptr<scalar_t>(res), cuda_ptr<scalar_t>(gate),
        cuda_ptr<scalar_t>(y), cuda_ptr<scalar_t>(shift),
        cuda_ptr<scalar_t>(scale), num_rows, res.size(1), res.size(2),
        static_cast<float>(eps), stream));
  });
}

}  // namespace mosaic
