// Helpers of the CPU kernels: dtype dispatch, compute types, ISA clones, fast exp.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dispatch.h"

// Hot loops are compiled for three x86-64 levels (AVX-512, AVX2+FMA, baseline) and the
// best one for the running CPU is picked when the library loads (GCC function
// multiversioning): the binary stays portable and nothing is probed at build time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MPFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MPFAST_CLONES
#endif

#define MPFAST_INLINE inline __attribute__((always_inline))

namespace mpfast {

// Work items per parallel task so that a task moves at least ~32k elements.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_item));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// exp(x) for a float or a GCC vector of floats V (I: the int32 scalar or vector of the same
// width), vectorisable (no libm call): 2^n * p(r), |relative error| < 2e-7. Inputs below
// -87.5 give 0 (as expf underflows there); NaN stays NaN. Used for softmax, whose arguments
// are <= 0 after subtracting the row maximum.
template <typename V, typename I>
MPFAST_INLINE V exp_poly(V x) {
  V c = x < 88.0f ? x : V{} + 88.0f;
  c = c > -87.5f ? c : V{} - 87.5f;  // so that 2^n below stays a normal float
  const V t = c * 1.44269504088896341f;
  // Round to nearest with the 1.5 * 2^23 trick (exact for |t| < 2^22).
  const V n = (t + 12582912.0f) - 12582912.0f;
  const V r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits;
  if constexpr (std::is_same_v<V, float>) {
    bits = (static_cast<int32_t>(n) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  V scale;  // 2^n; memcpy, not a pointer cast (strict aliasing) nor std::bit_cast (C++20)
  std::memcpy(&scale, &bits, sizeof(scale));
  const V y = p * scale;
  return x != x ? x : y;
}

MPFAST_INLINE float exp_fast(float x) { return exp_poly<float, int32_t>(x); }

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
