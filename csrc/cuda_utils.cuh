// Helpers of the CUDA kernels: launch geometry, warp reductions, views of strided tensors.
#pragma once

#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "dispatch.h"
#include "mpfast.h"

namespace mpfast::cuda {

using mpfast::acc_t;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks)));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Grid-stride loop over [0, n) with 64-bit indices.
#define MPFAST_KERNEL_LOOP(i, n)                                                                            \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);                   \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

constexpr unsigned kFullMask = 0xffffffffu;

// Rows of a [B, rows, H, d] tensor, or [rows, H, d] shared by the batch (sb = 0).
template <typename T>
struct Rows {
  const T* p;
  int64_t sb, sr, sh, sd;
  __device__ __forceinline__ const T* row(int64_t b, int64_t r, int64_t h) const { return p + b * sb + r * sr + h * sh; }
};

template <typename T>
Rows<T> rows_of(const at::TensorBase& t) {
  if (t.dim() == 3) return {t.const_data_ptr<T>(), 0, t.stride(0), t.stride(1), t.stride(2)};
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Mask {
  const bool* p;  // nullptr: no key padded
  int64_t sb, sl;
  __device__ __forceinline__ bool padded(int64_t b, int64_t l) const { return p != nullptr && p[b * sb + l * sl]; }
};

inline Mask mask_of(const at::TensorBase* mask) {
  if (mask == nullptr) return {nullptr, 0, 0};
  return {mask->const_data_ptr<bool>(), mask->stride(0), mask->stride(1)};
}

// a . b over d elements, by one thread (four partial sums for instruction-level parallelism).
template <typename T>
__device__ __forceinline__ acc_t<T> dot(const T* a, int64_t as, const T* b, int64_t bs, int64_t d) {
  using A = acc_t<T>;
  A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    s0 += static_cast<A>(a[0]) * static_cast<A>(b[0]);
    s1 += static_cast<A>(a[as]) * static_cast<A>(b[bs]);
    s2 += static_cast<A>(a[2 * as]) * static_cast<A>(b[2 * bs]);
    s3 += static_cast<A>(a[3 * as]) * static_cast<A>(b[3 * bs]);
    a += 4 * as;
    b += 4 * bs;
  }
  for (; j < d; ++j, a += as, b += bs) s0 += static_cast<A>(a[0]) * static_cast<A>(b[0]);
  return (s0 + s1) + (s2 + s3);
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = max(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t num_warps() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp; }

inline unsigned blocks_for_warps(int64_t warps, int threads = kThreads) { return blocks_for(warps * kWarp, threads); }

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over a block of kThreads threads; every thread gets the result.
template <typename A>
__device__ A block_sum(A x) {
  __shared__ A partial[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  x = warp_sum(x);
  __syncthreads();  // partial may still be read from a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x) / kWarp; ++w) total += partial[w];
  return total;
}

// Strided feature dimensions (merged, at most kMaxFeatureDims) of a tensor.
constexpr int kMaxFeatureDims = kMaxCudaFeatureDims;
struct Features {
  int ndim;
  int64_t size[kMaxFeatureDims];
  int64_t stride[kMaxFeatureDims];
  int64_t numel;

  // Unrolled with static indices: a dynamic index would copy the struct to local memory.
  __device__ __forceinline__ int64_t offset(int64_t f) const {
    int64_t off = 0;
#pragma unroll
    for (int i = kMaxFeatureDims - 1; i >= 0; --i) {
      if (i < ndim) {
        off += (f % size[i]) * stride[i];
        f /= size[i];
      }
    }
    return off;
  }
};

inline Features features_of(const at::TensorBase& t, int64_t first) {
  const std::vector<Dim> dims = collapse_dims(t, first);
  TORCH_CHECK(static_cast<int>(dims.size()) <= kMaxFeatureDims, "mpfast_cuda: more than ", kMaxFeatureDims,
              " non-mergeable feature dimensions (bindings make such inputs contiguous)");
  Features f{};
  f.ndim = static_cast<int>(dims.size());
  f.numel = 1;
  for (int i = 0; i < f.ndim; ++i) {
    f.size[i] = dims[i].size;
    f.stride[i] = dims[i].stride;
    f.numel *= dims[i].size;
  }
  return f;
}

}  // namespace mpfast::cuda
