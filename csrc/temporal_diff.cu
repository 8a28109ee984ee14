// temporal_diff on CUDA: out[b,s,t,f] = x[b,t+k_s,f] - x[b,t,f] (0 where t+k_s >= T).
//
// One thread per output element, f fastest, so writes (and reads of x with unit
// feature stride) are coalesced; 64-bit indices throughout. The forward launches one
// grid per stride. The backward reads the strides from a by-value array of up to
// kStridesPerLaunch entries: the first launch writes grad_x, later ones (more strides
// than that, rare) add to it.
#include "cuda_utils.cuh"

namespace mpfast {
namespace {

using cuda::Features;
using cuda::acc_t;

constexpr int kStridesPerLaunch = 8;

struct StrideList {
  int64_t k[kStridesPerLaunch];
  int64_t first_s;  // index of k[0] among all strides
  int n;
};

template <typename T>
__global__ void temporal_diff_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, Features feat, int64_t sb,
                                         int64_t st, int64_t batch, int64_t num_strides, int64_t frames, int64_t s,
                                         int64_t k) {
  using A = acc_t<T>;
  const int64_t n = batch * frames * feat.numel;
  MPFAST_KERNEL_LOOP(i, n) {
    const int64_t f = i % feat.numel;
    const int64_t bt = i / feat.numel;
    const int64_t t = bt % frames;
    const int64_t b = bt / frames;
    T result = T(0);
    if (k < frames - t) {  // t + k < frames, without overflow for huge k
      const T* base = x + b * sb + feat.offset(f);
      result = static_cast<T>(static_cast<A>(base[(t + k) * st]) - static_cast<A>(base[t * st]));
    }
    out[((b * num_strides + s) * frames + t) * feat.numel + f] = result;
  }
}

template <typename T>
__global__ void temporal_diff_bwd_kernel(const T* __restrict__ grad, T* __restrict__ grad_x, Features feat,
                                         int64_t sb, int64_t ss, int64_t st, int64_t batch, int64_t frames,
                                         StrideList ks, bool accumulate) {
  using A = acc_t<T>;
  const int64_t n = batch * frames * feat.numel;
  MPFAST_KERNEL_LOOP(i, n) {
    const int64_t f = i % feat.numel;
    const int64_t bt = i / feat.numel;
    const int64_t t = bt % frames;
    const int64_t b = bt / frames;
    const T* base = grad + b * sb + feat.offset(f);
    A acc = accumulate ? static_cast<A>(grad_x[i]) : A(0);
    for (int j = 0; j < ks.n; ++j) {
      const int64_t k = ks.k[j];
      const T* g = base + (ks.first_s + j) * ss;
      if (t >= k) acc += static_cast<A>(g[(t - k) * st]);
      if (k < frames - t) acc -= static_cast<A>(g[t * st]);
    }
    grad_x[i] = static_cast<T>(acc);
  }
}

}  // namespace

void temporal_diff_fwd_cuda(const at::TensorBase& x, c10::IntArrayRef strides, const at::TensorBase& out) {
  if (out.numel() == 0) return;
  const Features feat = cuda::features_of(x, 2);
  const int64_t batch = x.size(0), frames = x.size(1), num_strides = static_cast<int64_t>(strides.size());
  const int64_t n = batch * frames * feat.numel;
  MPFAST_DISPATCH_FLOATS(x.scalar_type(), "temporal_diff_fwd_cuda", [&] {
    for (int64_t s = 0; s < num_strides; ++s) {
      temporal_diff_fwd_kernel<scalar_t><<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::stream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), feat, x.stride(0), x.stride(1), batch,
          num_strides, frames, s, strides[s]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void temporal_diff_bwd_cuda(const at::TensorBase& grad, c10::IntArrayRef strides, const at::TensorBase& grad_x) {
  if (grad_x.numel() == 0) return;
  const Features feat = cuda::features_of(grad, 3);
  const int64_t batch = grad.size(0), frames = grad.size(2), num_strides = static_cast<int64_t>(strides.size());
  const int64_t n = batch * frames * feat.numel;
  MPFAST_DISPATCH_FLOATS(grad.scalar_type(), "temporal_diff_bwd_cuda", [&] {
    for (int64_t s0 = 0; s0 < num_strides; s0 += kStridesPerLaunch) {
      StrideList ks{};
      ks.first_s = s0;
      ks.n = static_cast<int>(std::min<int64_t>(kStridesPerLaunch, num_strides - s0));
      for (int j = 0; j < ks.n; ++j) ks.k[j] = strides[s0 + j];
      temporal_diff_bwd_kernel<scalar_t><<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::stream()>>>(
          grad.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), feat, grad.stride(0), grad.stride(1),
          grad.stride(2), batch, frames, ks, s0 > 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace mpfast
