// motion_mix on CUDA (formulas of motion_mix_ref / motion_mix_backward_ref).
//
// Forward: one thread per (video, feature) walks the frames and strides, writing u
// (coalesced over the feature dimension) and accumulating the temporal and motion
// sums; one block per video (a grid-stride loop past 2^20 videos) then L2-normalises
// the pooled sum. Backward: the pooled embedding is recomputed per (video, feature),
// one block per video forms the gradient of the normalisation, one thread per (video,
// feature) writes grad_h and grad_m and per-video partial sums of the gate gradient,
// which a last kernel reduces over the batch in a fixed order (deterministic, no
// atomics). Accumulation in float32 (float64 for float64 inputs); workspaces are
// allocated with ATen's caching allocator.
#include <ATen/ops/empty.h>

#include "cuda_utils.cuh"

namespace mpfast {
namespace {

using cuda::acc_t;

constexpr double kEps = 1e-12;  // as torch.nn.functional.normalize

struct Strides3 {
  int64_t b, t, d;
};
struct Strides4 {
  int64_t b, s, t, d;
};
inline Strides3 strides3(const at::TensorBase& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }
inline Strides4 strides4(const at::TensorBase& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

template <typename T>
__device__ __forceinline__ acc_t<T> gate_tanh(const T* gate, int64_t gs0, int64_t gs1, int64_t s, int64_t d) {
  return tanh(static_cast<acc_t<T>>(gate[s * gs0 + d * gs1]));
}

template <typename T>
__global__ void mix_fwd_kernel(const T* __restrict__ h, Strides3 hs, const T* __restrict__ m, Strides4 ms,
                               const T* __restrict__ gate, int64_t gs0, int64_t gs1, T* __restrict__ u,
                               T* __restrict__ mu, acc_t<T>* __restrict__ pooled, int64_t batch, int64_t streams,
                               int64_t frames, int64_t dim) {
  using A = acc_t<T>;
  MPFAST_KERNEL_LOOP(i, batch * dim) {
    const int64_t d = i % dim, b = i / dim;
    A pool = 0, msum = 0;
    for (int64_t t = 0; t < frames; ++t) {
      A acc = static_cast<A>(h[b * hs.b + t * hs.t + d * hs.d]);
      for (int64_t s = 0; s < streams; ++s) {
        const A mv = static_cast<A>(m[b * ms.b + s * ms.s + t * ms.t + d * ms.d]);
        acc += gate_tanh(gate, gs0, gs1, s, d) * mv;
        msum += mv;
      }
      u[(b * frames + t) * dim + d] = static_cast<T>(acc);
      pool += acc;
    }
    mu[i] = static_cast<T>(msum / static_cast<A>(streams * frames));
    pooled[i] = pool / static_cast<A>(frames);
  }
}

// One block per video (grid-stride over the batch): v = pooled / max(|pooled|, eps).
template <typename T>
__global__ void normalize_kernel(const acc_t<T>* __restrict__ pooled, T* __restrict__ v, int64_t batch, int64_t dim) {
  using A = acc_t<T>;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {  // uniform in the block: block_sum is safe
    const A* p = pooled + b * dim;
    A sq = 0;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) sq += p[d] * p[d];
    const A norm = cuda::block_sum(sq);
    const A scale = A(1) / max(sqrt(norm), static_cast<A>(kEps));
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) v[b * dim + d] = static_cast<T>(p[d] * scale);
  }
}

template <typename T>
__global__ void pooled_kernel(const T* __restrict__ h, Strides3 hs, const T* __restrict__ m, Strides4 ms,
                              const T* __restrict__ gate, int64_t gs0, int64_t gs1, acc_t<T>* __restrict__ pooled,
                              int64_t batch, int64_t streams, int64_t frames, int64_t dim) {
  using A = acc_t<T>;
  MPFAST_KERNEL_LOOP(i, batch * dim) {
    const int64_t d = i % dim, b = i / dim;
    A pool = 0;
    for (int64_t t = 0; t < frames; ++t) pool += static_cast<A>(h[b * hs.b + t * hs.t + d * hs.d]);
    for (int64_t s = 0; s < streams; ++s) {
      A msum = 0;
      for (int64_t t = 0; t < frames; ++t) msum += static_cast<A>(m[b * ms.b + s * ms.s + t * ms.t + d * ms.d]);
      pool += gate_tanh(gate, gs0, gs1, s, d) * msum;
    }
    pooled[i] = pool / static_cast<A>(frames);
  }
}

// One block per video (grid-stride over the batch): pooled <- (d v / d pooled)^T grad_v / T, in place.
template <typename T>
__global__ void normalize_bwd_kernel(acc_t<T>* __restrict__ pooled, const T* __restrict__ grad_v, int64_t gvs0,
                                     int64_t gvs1, int64_t batch, int64_t dim, int64_t frames) {
  using A = acc_t<T>;
  const A eps = static_cast<A>(kEps);
  const A inv_t = A(1) / static_cast<A>(frames);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {  // uniform in the block: block_sum is safe
    A* p = pooled + b * dim;
    const T* gv = grad_v + b * gvs0;
    A sq = 0, dot = 0;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      sq += p[d] * p[d];
      dot += p[d] * static_cast<A>(gv[d * gvs1]);
    }
    const A norm = sqrt(cuda::block_sum(sq));
    const A pv = cuda::block_sum(dot);  // pooled . grad_v
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const A g = static_cast<A>(gv[d * gvs1]);
      // (grad_v - v (v . grad_v)) / norm with v = pooled / norm
      p[d] = (norm > eps ? (g - p[d] * pv / (norm * norm)) / norm : g / eps) * inv_t;
    }
  }
}

template <typename T>
__global__ void mix_bwd_kernel(const T* __restrict__ grad_u, Strides3 gus, const T* __restrict__ grad_mu,
                               int64_t gms0, int64_t gms1, const acc_t<T>* __restrict__ gp, const T* __restrict__ m,
                               Strides4 ms, const T* __restrict__ gate, int64_t gs0, int64_t gs1,
                               T* __restrict__ grad_h, T* __restrict__ grad_m, acc_t<T>* __restrict__ partial,
                               int64_t batch, int64_t streams, int64_t frames, int64_t dim) {
  using A = acc_t<T>;
  MPFAST_KERNEL_LOOP(i, batch * dim) {
    const int64_t d = i % dim, b = i / dim;
    const A g = gp[i];
    for (int64_t t = 0; t < frames; ++t)
      grad_h[(b * frames + t) * dim + d] = static_cast<T>(static_cast<A>(grad_u[b * gus.b + t * gus.t + d * gus.d]) + g);
    const A gmu = static_cast<A>(grad_mu[b * gms0 + d * gms1]) / static_cast<A>(streams * frames);
    for (int64_t s = 0; s < streams; ++s) {
      const A a = gate_tanh(gate, gs0, gs1, s, d);
      A acc = 0;
      for (int64_t t = 0; t < frames; ++t) {
        const A gh = static_cast<A>(grad_u[b * gus.b + t * gus.t + d * gus.d]) + g;
        grad_m[((b * streams + s) * frames + t) * dim + d] = static_cast<T>(a * gh + gmu);
        acc += gh * static_cast<A>(m[b * ms.b + s * ms.s + t * ms.t + d * ms.d]);
      }
      partial[(b * streams + s) * dim + d] = acc;
    }
  }
}

template <typename T>
__global__ void gate_grad_kernel(const acc_t<T>* __restrict__ partial, const T* __restrict__ gate, int64_t gs0,
                                 int64_t gs1, T* __restrict__ grad_gate, int64_t batch, int64_t streams, int64_t dim) {
  using A = acc_t<T>;
  MPFAST_KERNEL_LOOP(i, streams * dim) {
    const int64_t d = i % dim, s = i / dim;
    A acc = 0;
    for (int64_t b = 0; b < batch; ++b) acc += partial[(b * streams + s) * dim + d];
    const A a = gate_tanh(gate, gs0, gs1, s, d);
    grad_gate[i] = static_cast<T>((A(1) - a * a) * acc);
  }
}

template <typename T>
at::ScalarType acc_dtype() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

}  // namespace

void motion_mix_fwd_cuda(const at::TensorBase& h, const at::TensorBase& m, const at::TensorBase& gate,
                         const at::TensorBase& u, const at::TensorBase& v, const at::TensorBase& mu) {
  if (h.numel() == 0) return;
  const int64_t batch = h.size(0), frames = h.size(1), dim = h.size(2), streams = m.size(1);
  MPFAST_DISPATCH_FLOATS(h.scalar_type(), "motion_mix_fwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    const at::TensorBase pooled = at::empty({batch, dim}, h.options().dtype(acc_dtype<scalar_t>()));
    mix_fwd_kernel<scalar_t><<<cuda::blocks_for(batch * dim), cuda::kThreads, 0, cuda::stream()>>>(
        h.const_data_ptr<scalar_t>(), strides3(h), m.const_data_ptr<scalar_t>(), strides4(m),
        gate.const_data_ptr<scalar_t>(), gate.stride(0), gate.stride(1), u.mutable_data_ptr<scalar_t>(),
        mu.mutable_data_ptr<scalar_t>(), pooled.mutable_data_ptr<A>(), batch, streams, frames, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<scalar_t><<<cuda::blocks_for(batch, 1), cuda::kThreads, 0, cuda::stream()>>>(
        pooled.const_data_ptr<A>(), v.mutable_data_ptr<scalar_t>(), batch, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void motion_mix_bwd_cuda(const at::TensorBase& grad_u, const at::TensorBase& grad_v, const at::TensorBase& grad_mu,
                         const at::TensorBase& h, const at::TensorBase& m, const at::TensorBase& gate,
                         const at::TensorBase& grad_h, const at::TensorBase& grad_m, const at::TensorBase& grad_gate) {
  const int64_t batch = h.size(0), frames = h.size(1), dim = h.size(2), streams = m.size(1);
  MPFAST_DISPATCH_FLOATS(h.scalar_type(), "motion_mix_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    if (grad_gate.numel() == 0) return;
    const at::TensorBase gp = at::empty({batch, dim}, h.options().dtype(acc_dtype<scalar_t>()));
    const at::TensorBase partial = at::empty({batch, streams, dim}, h.options().dtype(acc_dtype<scalar_t>()));
    if (batch > 0) {
      pooled_kernel<scalar_t><<<cuda::blocks_for(batch * dim), cuda::kThreads, 0, cuda::stream()>>>(
          h.const_data_ptr<scalar_t>(), strides3(h), m.const_data_ptr<scalar_t>(), strides4(m),
          gate.const_data_ptr<scalar_t>(), gate.stride(0), gate.stride(1), gp.mutable_data_ptr<A>(), batch, streams,
          frames, dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      normalize_bwd_kernel<scalar_t><<<cuda::blocks_for(batch, 1), cuda::kThreads, 0, cuda::stream()>>>(
          gp.mutable_data_ptr<A>(), grad_v.const_data_ptr<scalar_t>(), grad_v.stride(0), grad_v.stride(1), batch, dim,
          frames);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mix_bwd_kernel<scalar_t><<<cuda::blocks_for(batch * dim), cuda::kThreads, 0, cuda::stream()>>>(
          grad_u.const_data_ptr<scalar_t>(), strides3(grad_u), grad_mu.const_data_ptr<scalar_t>(), grad_mu.stride(0),
          grad_mu.stride(1), gp.const_data_ptr<A>(), m.const_data_ptr<scalar_t>(), strides4(m),
          gate.const_data_ptr<scalar_t>(), gate.stride(0), gate.stride(1), grad_h.mutable_data_ptr<scalar_t>(),
          grad_m.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<A>(), batch, streams, frames, dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    gate_grad_kernel<scalar_t><<<cuda::blocks_for(streams * dim), cuda::kThreads, 0, cuda::stream()>>>(
        partial.const_data_ptr<A>(), gate.const_data_ptr<scalar_t>(), gate.stride(0), gate.stride(1),
        grad_gate.mutable_data_ptr<scalar_t>(), batch, streams, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mpfast
