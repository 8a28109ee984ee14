// prompt_attention on CUDA (formulas of prompt_attention_ref / _backward_ref).
//
// One warp per row, keys (or, for grad_k / grad_v, queries) taken 32 at a time: lane j
// forms the whole dot product of the row with key l0 + j, so the softmax costs two
// warp reductions per 32 keys instead of one shuffle chain per key (the first version
// was 2-15x slower than eager PyTorch); the lanes then split the head dimension and
// accumulate p_j v_j for the 32 keys, p_j broadcast with a shuffle (coalesced when the
// head dimension has stride 1). Accumulators live in registers for chunks of
// kChunk = 128 features (a larger head dimension loops over chunks, recomputing the
// scores). Padded keys get score -inf; a query with every key padded gets 0 and no
// gradient. Backward: one pass per query row stores the log-sum-exp and
// D = sum_l p_l (dO . v_l); then grad_q (one warp per query row; with queries shared by
// the batch, one per (class, head) summing over the videos) and grad_k / grad_v (one warp
// per key row, the queries 32 at a time) are formed without atomics. float16/bfloat16
// accumulate in float32.
#include <ATen/ops/empty.h>

#include <cmath>

#include "cuda_utils.cuh"

namespace mpfast {
namespace {

using cuda::acc_t;
using cuda::blocks_for_warps;
using cuda::dot;
using cuda::global_warp;
using cuda::kFullMask;
using cuda::kWarp;
using cuda::Mask;
using cuda::mask_of;
using cuda::num_warps;
using cuda::Rows;
using cuda::rows_of;
using cuda::warp_max;

constexpr int kPerLane = 4;
constexpr int64_t kChunk = kWarp * kPerLane;

// acc[i] += sum over the n lanes j < n of w_j * row_j[j0 + lane + 32 i]: the lanes' weights
// w (one per lane) broadcast in turn, rows row_of(j) read across the lanes.
template <typename T, typename RowOf>
__device__ __forceinline__ void accumulate_rows(acc_t<T> (&acc)[kPerLane], acc_t<T> w, int n, RowOf row_of,
                                                int64_t sd, int64_t j0, int64_t d, int lane) {
  for (int jj = 0; jj < n; ++jj) {
    const acc_t<T> wj = __shfl_sync(kFullMask, w, jj);
    const T* r = row_of(jj);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t j = j0 + lane + i * kWarp;
      if (j < d) acc[i] += wj * static_cast<acc_t<T>>(r[j * sd]);
    }
  }
}

// Lanes that hold one of the `remaining` keys (or queries) of a group of 32.
__device__ __forceinline__ int lanes_used(int64_t remaining) {
  return remaining < kWarp ? static_cast<int>(remaining) : kWarp;
}


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
      for (int64_t l0 = 0; l0 < L; l0 += kWarp) {
        const int64_t l = l0 + lane;
        A s = -INFINITY;
        if (l < L && !mask.padded(b, l)) s = scale * dot(qr, q.sd, k.row(b, l, h), k.sd, d);
        const A m_new = max(mx, warp_max(s));
        if (m_new == -INFINITY) continue;  // every key so far padded (the same in every lane)
        const A p = exp(s - m_new);
        const A corr = exp(mx - m_new);
        sum = sum * corr + cuda::warp_sum(p);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) o[i] *= corr;
        const int n = lanes_used(L - l0);
        accumulate_rows<T>(o, p, n, [&](int jj) { return v.row(b, l0 + jj, h); }, v.sd, j0, d, lane);
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
    for (int64_t l0 = 0; l0 < L; l0 += kWarp) {
      const int64_t l = l0 + lane;
      A s = -INFINITY, dp = 0;
      if (l < L && !mask.padded(b, l)) {
        s = scale * dot(qr, q.sd, k.row(b, l, h), k.sd, d);
        dp = dot(gr, go.sd, v.row(b, l, h), v.sd, d);
      }
      const A m_new = max(mx, warp_max(s));
      if (m_new == -INFINITY) continue;
      const A p = exp(s - m_new);
      const A corr = exp(mx - m_new);
      sum = sum * corr + cuda::warp_sum(p);
      w = w * corr + cuda::warp_sum(p * dp);
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
        const A row_lse = lse[stat], row_delta = delta[stat];
        if (row_lse == A(INFINITY)) continue;  // every key padded: no gradient
        const T* qr = q.row(b, c, h);
        const T* gr = go.row(b, c, h);
        for (int64_t l0 = 0; l0 < L; l0 += kWarp) {
          const int64_t l = l0 + lane;
          A ds = 0;
          if (l < L && !mask.padded(b, l)) {
            const A p = exp(scale * dot(qr, q.sd, k.row(b, l, h), k.sd, d) - row_lse);
            ds = p * (dot(gr, go.sd, v.row(b, l, h), v.sd, d) - row_delta) * scale;
          }
          const int n = lanes_used(L - l0);
          accumulate_rows<T>(acc, ds, n, [&](int jj) { return k.row(b, l0 + jj, h); }, k.sd, j0, d, lane);
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

// grad_k, grad_v: one warp per key row (b, l, h), summing over the queries 32 at a time.
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
      for (int64_t c0 = 0; c0 < C && !padded; c0 += kWarp) {
        const int64_t c = c0 + lane;
        A p = 0, ds = 0;
        if (c < C) {
          const int64_t stat = (b * C + c) * H + h;
          p = exp(scale * dot(q.row(b, c, h), q.sd, kr, k.sd, d) - lse[stat]);  // 0 where lse = +inf
          ds = p * (dot(go.row(b, c, h), go.sd, vr, v.sd, d) - delta[stat]) * scale;
        }
        const int n = lanes_used(C - c0);
        accumulate_rows<T>(gk, ds, n, [&](int jj) { return q.row(b, c0 + jj, h); }, q.sd, j0, d, lane);
        accumulate_rows<T>(gv, p, n, [&](int jj) { return go.row(b, c0 + jj, h); }, go.sd, j0, d, lane);
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
