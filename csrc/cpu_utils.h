// Helpers of the CPU kernels: dtype dispatch, compute types, ISA clones, fast exp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// Hot loops are compiled for three x86-64 levels (AVX-512, AVX2+FMA, baseline) and the
// best one for the running CPU is picked when the library loads (GCC function
// multiversioning): the binary stays portable and nothing is probed at build time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MPFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MPFAST_CLONES
#endif

#define MPFAST_INLINE inline __attribute__((always_inline))

// float16 and bfloat16 are computed in float32; float32 and float64 in themselves.
#define MPFAST_DISPATCH_FLOATS(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

namespace mpfast {

template <typename T>
using acc_t = at::opmath_type<T>;

// Work items per parallel task so that a task moves at least ~32k elements.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_item));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// exp(x) for float, vectorisable (no libm call): 2^n * p(r), |relative error| < 2e-7.
// Inputs below -87.5 give 0 (as expf underflows there); NaN stays NaN. Used for
// softmax, whose arguments are <= 0 after subtracting the row maximum.
MPFAST_INLINE float exp_fast(float x) {
  const float clamped = std::max(std::min(x, 88.0f), -87.5f);
  const float t = clamped * 1.44269504088896341f;
  // Round to nearest with the 1.5 * 2^23 trick (exact for |t| < 2^22).
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  bits = n < -126.0f ? 0 : bits;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x != x ? x : y;
}

MPFAST_INLINE double exp_fast(double x) { return std::exp(x); }

// tanh(x) for float, vectorisable: odd Taylor polynomial below |x| = 0.25, else
// 1 - 2 / (exp(2|x|) + 1); |relative error| < 5e-7.
MPFAST_INLINE float tanh_fast(float x) {
  const float ax = std::fabs(x);
  const float x2 = x * x;
  const float small = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  const float large = std::copysign(1.0f - 2.0f / (exp_fast(2.0f * std::min(ax, 20.0f)) + 1.0f), x);
  return ax < 0.25f ? small : large;
}

MPFAST_INLINE double tanh_fast(double x) { return std::tanh(x); }

}  // namespace mpfast
