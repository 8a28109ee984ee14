// The dtypes every kernel (CPU and CUDA) takes, and the type each computes in.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

// float16, bfloat16, float32 and float64; the body sees the element type as scalar_t.
#define MPFAST_DISPATCH_FLOATS(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

namespace mpfast {

// float16 and bfloat16 are computed in float32; float32 and float64 in themselves.
template <typename T>
using acc_t = at::opmath_type<T>;

}  // namespace mpfast
