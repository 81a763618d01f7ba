// dtype dispatch for the torch-side glue (.cpp files only; includes torch).
//
// MOSAIC_DISPATCH_FLOATING_TYPES(type, name, [&] { ... }) runs the lambda with
// `scalar_t` bound to float, c10::Half or c10::BFloat16. Inside it,
// `mosaic::cuda_type_t<scalar_t>` is the layout-identical CUDA type (float,
// __half, __nv_bfloat16) that the raw-pointer launchers of the .cu files take.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#define MOSAIC_DISPATCH_CASE_FLOATING_TYPES(...)       \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

#define MOSAIC_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, MOSAIC_DISPATCH_CASE_FLOATING_TYPES(__VA_ARGS__))

namespace mosaic {

template <typename T>
struct CudaType;
template <>
struct CudaType<float> {
  using type = float;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
using cuda_type_t = typename CudaType<T>::type;

static_assert(sizeof(c10::Half) == sizeof(__half), "c10::Half must match __half");
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "c10::BFloat16 must match __nv_bfloat16");

// Reinterprets a tensor's storage as the CUDA type of scalar_t.
template <typename scalar_t>
inline cuda_type_t<scalar_t>* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<cuda_type_t<scalar_t>*>(t.data_ptr<scalar_t>());
}

}  // namespace mosaic
