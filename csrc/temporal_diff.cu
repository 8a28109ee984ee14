// temporal_diff on CUDA: out[b,s,t,f] = x[b,t+k_s,f] - x[b,t,f] (0 where t+k_s >= T).
//
// One block per output row chunk: the forward's rows are (b, s, t), the backward's
// (b, t); a chunk is kThreads * kUnroll vectors of features. The row is decoded once
// per block (64-bit divisions per element made the first version 30x slower than a
// copy); each thread then issues all of its loads before its stores. When the features
// are one unit-stride dimension and every row starts on a 16-byte boundary, threads move
// 16-byte vectors; other layouts take the element-wise path with the same geometry.
// Strides arrive by value, at most kStridesPerLaunch per launch: the backward's first
// launch writes grad_x and later ones (more strides than that, rare) add to it.
#include <cstring>

#include "cuda_utils.cuh"

namespace mpfast {
namespace {

using cuda::Features;
using cuda::acc_t;

constexpr int kStridesPerLaunch = 8;
constexpr int kUnroll = 2;  // vectors per thread and tensor: 32 bytes in flight each

struct StrideList {
  int64_t k[kStridesPerLaunch];
  int64_t first_s;  // index of k[0] among all strides
  int n;

  // k[j] with a static index (a dynamic one would copy the list to local memory).
  __device__ __forceinline__ int64_t at(int j) const {
    int64_t value = 0;
#pragma unroll
    for (int i = 0; i < kStridesPerLaunch; ++i) value = i == j ? k[i] : value;
    return value;
  }
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Stores a vector as one machine word of its size (assigning the struct let nvcc split
// some 16-byte stores of bfloat16 into eight 2-byte ones).
template <int BYTES>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = unsigned; };
template <>
struct Word<2> { using type = unsigned short; };

template <typename V>
__device__ __forceinline__ void store(void* dst, const V& value) {
  using W = typename Word<sizeof(V)>::type;
  W word;
  memcpy(&word, &value, sizeof(V));
  *reinterpret_cast<W*>(dst) = word;
}

// Feature offset of element f: f * stride for one merged dimension, else the general walk.
__device__ __forceinline__ int64_t feature_offset(const Features& feat, int64_t f) {
  return feat.ndim == 1 ? f * feat.stride[0] : feat.offset(f);
}

// Elements per block row chunk.
template <int VEC>
constexpr int64_t chunk_elems() {
  return int64_t(cuda::kThreads) * VEC * kUnroll;
}

// out row (b, s, t), chunk c of features.
template <typename T, int VEC>
__global__ void temporal_diff_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, Features feat, int64_t sb,
                                         int64_t st, int64_t batch, int64_t num_strides, int64_t frames,
                                         StrideList ks, int64_t chunks) {
  using A = acc_t<T>;
  using V = Vec<T, VEC>;
  const int64_t total = batch * ks.n * frames * chunks;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const int64_t chunk = blk % chunks;
    int64_t row = blk / chunks;
    const int64_t t = row % frames;
    row /= frames;
    const int j = static_cast<int>(row % ks.n);
    const int64_t b = row / ks.n;
    const int64_t k = ks.at(j);
    const bool valid = k < frames - t;  // t + k < frames, without overflow for huge k
    const T* xt = x + b * sb + t * st;
    const T* xn = xt + (valid ? k : 0) * st;
    T* o = out + ((b * num_strides + ks.first_s + j) * frames + t) * feat.numel;
    const int64_t f0 = chunk * chunk_elems<VEC>() + static_cast<int64_t>(threadIdx.x) * VEC;
    V a[kUnroll], c[kUnroll];  // zeros where t + k >= frames: their difference is the 0 to write
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t f = f0 + int64_t(u) * cuda::kThreads * VEC;
      a[u] = V{};
      c[u] = V{};
      if (valid && f < feat.numel) {
        if constexpr (VEC > 1) {
          a[u] = *reinterpret_cast<const V*>(xt + f);
          c[u] = *reinterpret_cast<const V*>(xn + f);
        } else {
          const int64_t off = feature_offset(feat, f);
          a[u].v[0] = xt[off];
          c[u].v[0] = xn[off];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t f = f0 + int64_t(u) * cuda::kThreads * VEC;
      V r;
#pragma unroll
      for (int e = 0; e < VEC; ++e) r.v[e] = static_cast<T>(static_cast<A>(c[u].v[e]) - static_cast<A>(a[u].v[e]));
      if (f < feat.numel) store(o + f, r);
    }
  }
}

// grad_x row (b, t), chunk c of features: sum over the strides of this launch.
template <typename T, int VEC>
__global__ void temporal_diff_bwd_kernel(const T* __restrict__ grad, T* __restrict__ grad_x, Features feat,
                                         int64_t sb, int64_t ss, int64_t st, int64_t batch, int64_t frames,
                                         StrideList ks, bool accumulate, int64_t chunks) {
  using A = acc_t<T>;
  using V = Vec<T, VEC>;
  const int64_t total = batch * frames * chunks;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const int64_t chunk = blk % chunks;
    const int64_t row = blk / chunks;
    const int64_t t = row % frames;
    const int64_t b = row / frames;
    const T* base = grad + b * sb + ks.first_s * ss;
    T* o = grad_x + row * feat.numel;
    const int64_t f0 = chunk * chunk_elems<VEC>() + static_cast<int64_t>(threadIdx.x) * VEC;
    A acc[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t f = f0 + int64_t(u) * cuda::kThreads * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[u][e] = A(0);
      if (accumulate && f < feat.numel) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[u][e] = static_cast<A>(o[f + e]);
      }
    }
#pragma unroll
    for (int j = 0; j < kStridesPerLaunch; ++j) {
      if (j >= ks.n) break;
      const int64_t k = ks.k[j];
      const bool as_next = t >= k, as_prev = k < frames - t;
      const T* g = base + j * ss;
      const T* g_next = g + (as_next ? t - k : 0) * st;
      const T* g_prev = g + t * st;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t f = f0 + int64_t(u) * cuda::kThreads * VEC;
        if (f >= feat.numel) continue;
        V n{}, p{};
        if constexpr (VEC > 1) {
          if (as_next) n = *reinterpret_cast<const V*>(g_next + f);
          if (as_prev) p = *reinterpret_cast<const V*>(g_prev + f);
        } else {
          const int64_t off = feature_offset(feat, f);
          n.v[0] = as_next ? g_next[off] : T(0);
          p.v[0] = as_prev ? g_prev[off] : T(0);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[u][e] += static_cast<A>(n.v[e]) - static_cast<A>(p.v[e]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t f = f0 + int64_t(u) * cuda::kThreads * VEC;
      V r;
#pragma unroll
      for (int e = 0; e < VEC; ++e) r.v[e] = static_cast<T>(acc[u][e]);
      if (f < feat.numel) store(o + f, r);
    }
  }
}

// 16-byte vectors when the features are one unit-stride dimension and every row (of the
// input, the output and, through the row strides, every frame) starts 16-byte aligned.
template <typename T>
constexpr int kVec = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;

template <typename T>
bool vectorizable(const Features& feat, const void* in, const void* out, std::initializer_list<int64_t> strides) {
  constexpr int64_t vec = kVec<T>;
  if (vec == 1 || feat.ndim != 1 || feat.stride[0] != 1 || feat.numel % vec != 0) return false;
  if (reinterpret_cast<uintptr_t>(in) % 16 != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0) return false;
  return std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s % vec == 0; });
}

template <typename T, int VEC>
unsigned blocks_for_chunks(int64_t rows, int64_t numel, int64_t* chunks) {
  *chunks = (numel + chunk_elems<VEC>() - 1) / chunk_elems<VEC>();
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows * *chunks, cuda::kMaxBlocks)));
}

StrideList stride_list(c10::IntArrayRef strides, int64_t s0) {
  StrideList ks{};
  ks.first_s = s0;
  ks.n = static_cast<int>(std::min<int64_t>(kStridesPerLaunch, static_cast<int64_t>(strides.size()) - s0));
  for (int j = 0; j < ks.n; ++j) ks.k[j] = strides[s0 + j];
  return ks;
}

template <typename T, int VEC>
void launch_fwd(const at::TensorBase& x, c10::IntArrayRef strides, const at::TensorBase& out, const Features& feat) {
  const int64_t batch = x.size(0), frames = x.size(1), num_strides = static_cast<int64_t>(strides.size());
  for (int64_t s0 = 0; s0 < num_strides; s0 += kStridesPerLaunch) {
    const StrideList ks = stride_list(strides, s0);
    int64_t chunks = 0;
    const unsigned blocks = blocks_for_chunks<T, VEC>(batch * ks.n * frames, feat.numel, &chunks);
    temporal_diff_fwd_kernel<T, VEC><<<blocks, cuda::kThreads, 0, cuda::stream()>>>(
        x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), feat, x.stride(0), x.stride(1), batch, num_strides, frames,
        ks, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int VEC>
void launch_bwd(const at::TensorBase& grad, c10::IntArrayRef strides, const at::TensorBase& grad_x,
                const Features& feat) {
  const int64_t batch = grad.size(0), frames = grad.size(2), num_strides = static_cast<int64_t>(strides.size());
  for (int64_t s0 = 0; s0 < num_strides; s0 += kStridesPerLaunch) {
    int64_t chunks = 0;
    const unsigned blocks = blocks_for_chunks<T, VEC>(batch * frames, feat.numel, &chunks);
    temporal_diff_bwd_kernel<T, VEC><<<blocks, cuda::kThreads, 0, cuda::stream()>>>(
        grad.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(), feat, grad.stride(0), grad.stride(1), grad.stride(2),
        batch, frames, stride_list(strides, s0), s0 > 0, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void temporal_diff_fwd_cuda(const at::TensorBase& x, c10::IntArrayRef strides, const at::TensorBase& out) {
  if (out.numel() == 0) return;
  const Features feat = cuda::features_of(x, 2);
  MPFAST_DISPATCH_FLOATS(x.scalar_type(), "temporal_diff_fwd_cuda", [&] {
    if (vectorizable<scalar_t>(feat, x.const_data_ptr(), out.const_data_ptr(), {x.stride(0), x.stride(1)})) {
      launch_fwd<scalar_t, kVec<scalar_t>>(x, strides, out, feat);
    } else {
      launch_fwd<scalar_t, 1>(x, strides, out, feat);
    }
  });
}

void temporal_diff_bwd_cuda(const at::TensorBase& grad, c10::IntArrayRef strides, const at::TensorBase& grad_x) {
  if (grad_x.numel() == 0) return;
  const Features feat = cuda::features_of(grad, 3);
  MPFAST_DISPATCH_FLOATS(grad.scalar_type(), "temporal_diff_bwd_cuda", [&] {
    if (vectorizable<scalar_t>(feat, grad.const_data_ptr(), grad_x.const_data_ptr(),
                               {grad.stride(0), grad.stride(1), grad.stride(2)})) {
      launch_bwd<scalar_t, kVec<scalar_t>>(grad, strides, grad_x, feat);
    } else {
      launch_bwd<scalar_t, 1>(grad, strides, grad_x, feat);
    }
  });
}

}  // namespace mpfast
