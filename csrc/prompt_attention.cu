// prompt_attention on CUDA (formulas of prompt_attention_ref / _backward_ref).
//
// One warp per row; lanes split the head dimension (coalesced when its stride is 1),
// dot products are reduced with warp shuffles, the softmax is computed online (running
// maximum and sum), accumulators live in registers for chunks of kChunk = 128 features
// (a larger head dimension loops over chunks, recomputing the scores). Padded keys are
// skipped; a query with every key padded gets 0 and no gradient. Backward: one pass
// per query row stores the log-sum-exp and D = sum_l p_l (dO . v_l); then grad_q (one
// warp per query row; with queries shared by the batch, one per (class, head) summing
// over the videos) and grad_k / grad_v (one warp per key row) are formed without
// atomics. float16/bfloat16 accumulate in float32.
#include <ATen/ops/empty.h>

#include <cmath>

#include "cuda_utils.cuh"

namespace mpfast {
namespace {

using cuda::acc_t;
using cuda::kWarp;

constexpr int kPerLane = 4;
constexpr int64_t kChunk = kWarp * kPerLane;

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

Mask mask_of(const at::TensorBase* mask) {
  if (mask == nullptr) return {nullptr, 0, 0};
  return {mask->const_data_ptr<bool>(), mask->stride(0), mask->stride(1)};
}

template <typename T>
__device__ __forceinline__ acc_t<T> warp_dot(const T* a, int64_t as, const T* b, int64_t bs, int64_t d, int lane) {
  acc_t<T> s = 0;
  for (int64_t j = lane; j < d; j += kWarp) s += static_cast<acc_t<T>>(a[j * as]) * static_cast<acc_t<T>>(b[j * bs]);
  return cuda::warp_sum(s);
}

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t num_warps() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp; }

inline unsigned blocks_for_warps(int64_t warps) { return cuda::blocks_for(warps * kWarp); }

template <typename T>
__global__ void attention_fwd_kernel(Rows<T> q, Rows<T> k, Rows<T> v, Mask mask, acc_t<T> scale,
                                     T* __restrict__ out, int64_t B, int64_t C, int64_t L, int64_t H, int64_t d) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = global_warp(); row < B * C * H; row += num_warps()) {
    const int64_t h = row % H, c = (row / H) % C, b = row / (H * C);
    const T* qr = q.row(b, c, h);
    for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
      A mx = -INFINITY, sum = 0, o[kPerLane] = {};
      for (int64_t l = 0; l < L; ++l) {
        if (mask.padded(b, l)) continue;
        const A s = scale * warp_dot(qr, q.sd, k.row(b, l, h), k.sd, d, lane);
        const A m_new = max(mx, s);
        const A corr = exp(mx - m_new);
        const A p = exp(s - m_new);
        sum = sum * corr + p;
        const T* vr = v.row(b, l, h);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t j = j0 + lane + i * kWarp;
          o[i] = o[i] * corr + (j < d ? p * static_cast<A>(vr[j * v.sd]) : A(0));
        }
        mx = m_new;
      }
      const A inv = sum > 0 ? A(1) / sum : A(0);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t j = j0 + lane + i * kWarp;
        if (j < d) out[row * d + j] = static_cast<T>(o[i] * inv);
      }
    }
  }
}

// Per query row (b, c, h): lse = log sum_l exp(s_l) (+inf when every key is padded) and
// D = sum_l p_l (dO . v_l).
template <typename T>
__global__ void attention_stats_kernel(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> go, Mask mask, acc_t<T> scale,
                                       acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ delta, int64_t B, int64_t C,
                                       int64_t L, int64_t H, int64_t d) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = global_warp(); row < B * C * H; row += num_warps()) {
    const int64_t h = row % H, c = (row / H) % C, b = row / (H * C);
    const T* qr = q.row(b, c, h);
    const T* gr = go.row(b, c, h);
    A mx = -INFINITY, sum = 0, w = 0;
    for (int64_t l = 0; l < L; ++l) {
      if (mask.padded(b, l)) continue;
      const A s = scale * warp_dot(qr, q.sd, k.row(b, l, h), k.sd, d, lane);
      const A dp = warp_dot(gr, go.sd, v.row(b, l, h), v.sd, d, lane);
      const A m_new = max(mx, s);
      const A corr = exp(mx - m_new);
      const A p = exp(s - m_new);
      sum = sum * corr + p;
      w = w * corr + p * dp;
      mx = m_new;
    }
    if (lane == 0) {
      lse[row] = sum > 0 ? mx + log(sum) : A(INFINITY);
      delta[row] = sum > 0 ? w / sum : A(0);
    }
  }
}

// grad_q: one warp per row of q ((b, c, h), or (c, h) summing over the videos when shared).
template <typename T>
__global__ void attention_grad_q_kernel(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> go, Mask mask, acc_t<T> scale,
                                        const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ delta,
                                        T* __restrict__ grad_q, bool shared, int64_t B, int64_t C, int64_t L,
                                        int64_t H, int64_t d) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = shared ? C * H : B * C * H;
  for (int64_t row = global_warp(); row < rows; row += num_warps()) {
    const int64_t h = row % H, c = (row / H) % C;
    const int64_t b_begin = shared ? 0 : row / (H * C), b_end = shared ? B : b_begin + 1;
    for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
      A acc[kPerLane] = {};
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t stat = (b * C + c) * H + h;
        const T* qr = q.row(b, c, h);
        const T* gr = go.row(b, c, h);
        for (int64_t l = 0; l < L; ++l) {
          if (mask.padded(b, l)) continue;
          const T* kr = k.row(b, l, h);
          const A s = scale * warp_dot(qr, q.sd, kr, k.sd, d, lane);
          const A p = exp(s - lse[stat]);
          const A dp = warp_dot(gr, go.sd, v.row(b, l, h), v.sd, d, lane);
          const A ds = p * (dp - delta[stat]) * scale;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            const int64_t j = j0 + lane + i * kWarp;
            if (j < d) acc[i] += ds * static_cast<A>(kr[j * k.sd]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t j = j0 + lane + i * kWarp;
        if (j < d) grad_q[row * d + j] = static_cast<T>(acc[i]);
      }
    }
  }
}

// grad_k, grad_v: one warp per key row (b, l, h), summing over the queries.
template <typename T>
__global__ void attention_grad_kv_kernel(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> go, Mask mask, acc_t<T> scale,
                                         const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ delta,
                                         T* __restrict__ grad_k, T* __restrict__ grad_v, int64_t B, int64_t C,
                                         int64_t L, int64_t H, int64_t d) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = global_warp(); row < B * L * H; row += num_warps()) {
    const int64_t h = row % H, l = (row / H) % L, b = row / (H * L);
    const bool padded = mask.padded(b, l);
    const T* kr = k.row(b, l, h);
    const T* vr = v.row(b, l, h);
    for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
      A gk[kPerLane] = {}, gv[kPerLane] = {};
      for (int64_t c = 0; c < C && !padded; ++c) {
        const int64_t stat = (b * C + c) * H + h;
        const T* qr = q.row(b, c, h);
        const T* gr = go.row(b, c, h);
        const A s = scale * warp_dot(qr, q.sd, kr, k.sd, d, lane);
        const A p = exp(s - lse[stat]);
        const A dp = warp_dot(gr, go.sd, vr, v.sd, d, lane);
        const A ds = p * (dp - delta[stat]) * scale;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t j = j0 + lane + i * kWarp;
          if (j < d) {
            gk[i] += ds * static_cast<A>(qr[j * q.sd]);
            gv[i] += p * static_cast<A>(gr[j * go.sd]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t j = j0 + lane + i * kWarp;
        if (j < d) {
          grad_k[row * d + j] = static_cast<T>(gk[i]);
          grad_v[row * d + j] = static_cast<T>(gv[i]);
        }
      }
    }
  }
}

}  // namespace

void prompt_attention_fwd_cuda(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& v,
                               double scale, const at::TensorBase* key_padding_mask, const at::TensorBase& out) {
  if (out.numel() == 0) return;
  const int64_t B = k.size(0), L = k.size(1), H = k.size(2), d = k.size(3), C = q.size(q.dim() - 3);
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_fwd_cuda", [&] {
    attention_fwd_kernel<scalar_t><<<blocks_for_warps(B * C * H), cuda::kThreads, 0, cuda::stream()>>>(
        rows_of<scalar_t>(q), rows_of<scalar_t>(k), rows_of<scalar_t>(v), mask_of(key_padding_mask),
        static_cast<acc_t<scalar_t>>(scale), out.mutable_data_ptr<scalar_t>(), B, C, L, H, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void prompt_attention_bwd_cuda(const at::TensorBase& grad_out, const at::TensorBase& q, const at::TensorBase& k,
                               const at::TensorBase& v, double scale, const at::TensorBase* key_padding_mask,
                               const at::TensorBase& grad_q, const at::TensorBase& grad_k,
                               const at::TensorBase& grad_v) {
  const int64_t B = k.size(0), L = k.size(1), H = k.size(2), d = k.size(3), C = q.size(q.dim() - 3);
  const bool shared = q.dim() == 3;
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    const auto acc_type = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
    const at::TensorBase lse = at::empty({B * C * H}, q.options().dtype(acc_type));
    const at::TensorBase delta = at::empty({B * C * H}, q.options().dtype(acc_type));
    const Rows<scalar_t> qr = rows_of<scalar_t>(q), kr = rows_of<scalar_t>(k), vr = rows_of<scalar_t>(v),
                         gr = rows_of<scalar_t>(grad_out);
    const Mask mask = mask_of(key_padding_mask);
    const A sc = static_cast<A>(scale);
    if (B * C * H > 0) {
      attention_stats_kernel<scalar_t><<<blocks_for_warps(B * C * H), cuda::kThreads, 0, cuda::stream()>>>(
          qr, kr, vr, gr, mask, sc, lse.mutable_data_ptr<A>(), delta.mutable_data_ptr<A>(), B, C, L, H, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t q_rows = shared ? C * H : B * C * H;
    if (q_rows * d > 0) {
      attention_grad_q_kernel<scalar_t><<<blocks_for_warps(q_rows), cuda::kThreads, 0, cuda::stream()>>>(
          qr, kr, vr, gr, mask, sc, lse.const_data_ptr<A>(), delta.const_data_ptr<A>(),
          grad_q.mutable_data_ptr<scalar_t>(), shared, B, C, L, H, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (B * L * H * d > 0) {
      attention_grad_kv_kernel<scalar_t><<<blocks_for_warps(B * L * H), cuda::kThreads, 0, cuda::stream()>>>(
          qr, kr, vr, gr, mask, sc, lse.const_data_ptr<A>(), delta.const_data_ptr<A>(),
          grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(), B, C, L, H, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace mpfast
