// motion_mix on CPU: u = h + sum_s tanh(gate_s) * m_s, v = normalize(mean_t u),
// mu = mean_{s,t} m, and its backward (formulas of motion_mix_backward_ref).
//
// tanh(gate) is computed once per call. Forward: one work item is a video (or, when the
// batch is too small to keep every thread busy, a chunk of its features); it reads h and
// m once, in tiles of features whose sum of u over frames and sum of m stay in vector
// registers, writes u and mu, and L2-normalises the pooled sum in the same item (a
// video split into chunks is normalised in a second, cheap pass over [B, D]).
// Backward: the pooled embedding is recomputed from h and m (one read), then one item
// per chunk of D runs over every video and frame, so grad_gate (a sum over
// the batch) is reduced without atomics and the result does not depend on threads.
// Everything accumulates in float32 (float64 for float64 inputs).
#include "cpu_utils.h"
#include "mpfast.h"

namespace mpfast {
namespace {

constexpr double kEps = 1e-12;  // as torch.nn.functional.normalize

// Chunk of D per work item: a multiple of 16 giving at least 4 items per thread.
inline int64_t chunk_for(int64_t dim, int64_t min_items) {
  int64_t chunk = ceil_div(dim, std::max<int64_t>(1, min_items));
  chunk = ceil_div(chunk, 16) * 16;
  return std::max<int64_t>(16, std::min<int64_t>(1024, chunk));
}

template <typename T>
struct View3 {  // [B, T, D]
  const T* p;
  int64_t sb, st, sd;
  explicit View3(const at::TensorBase& t) : p(t.const_data_ptr<T>()), sb(t.stride(0)), st(t.stride(1)), sd(t.stride(2)) {}
  const T* row(int64_t b, int64_t t) const { return p + b * sb + t * st; }
};

template <typename T>
struct View4 {  // [B, S, T, D]
  const T* p;
  int64_t sb, ss, st, sd;
  explicit View4(const at::TensorBase& t)
      : p(t.const_data_ptr<T>()), sb(t.stride(0)), ss(t.stride(1)), st(t.stride(2)), sd(t.stride(3)) {}
  const T* row(int64_t b, int64_t s, int64_t t) const { return p + b * sb + s * ss + t * st; }
};

template <typename T>
MPFAST_CLONES void tanh_row(acc_t<T>* __restrict a, const T* __restrict g, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) a[i] = tanh_fast(static_cast<acc_t<T>>(g[i * stride]));
}

template <typename T>
std::vector<acc_t<T>> tanh_gate(const at::TensorBase& gate) {
  const int64_t streams = gate.size(0), dim = gate.size(1);
  std::vector<acc_t<T>> a(streams * dim);
  for (int64_t s = 0; s < streams; ++s)
    tanh_row<T>(a.data() + s * dim, gate.const_data_ptr<T>() + s * gate.stride(0), dim, gate.stride(1));
  return a;
}

// Features per register tile: four 64-byte vectors of the compute type (the three
// accumulators of mix_tile fill 12 of the 32 AVX-512 registers).
template <typename A>
constexpr int64_t kTile = 256 / sizeof(A);

// One tile of n <= kTile features of one video, every frame: u[t] = h[t] + sum_s a_s m_s[t],
// with the sums over frames of u (pool) and of m (msum) held in registers, then stored.
// kFull: n == kTile (the loops have a constant trip count and stay in vector registers).
template <typename T, bool kUnit, bool kFull>
MPFAST_CLONES void mix_tile(const T* __restrict h, int64_t hst, int64_t hsd, const T* __restrict m, int64_t mss,
                            int64_t mst, int64_t msd, const acc_t<T>* __restrict a, int64_t ads, T* __restrict u,
                            int64_t ust, acc_t<T>* __restrict pool_out, acc_t<T>* __restrict msum_out,
                            int64_t frames, int64_t streams, int64_t n) {
  using A = acc_t<T>;
  constexpr int64_t W = kTile<A>;
  const int64_t len = kFull ? W : n;
  A pool[W] = {}, msum[W] = {};
  for (int64_t t = 0; t < frames; ++t) {
    A acc[W];
    const T* hr = h + t * hst;
    for (int64_t j = 0; j < len; ++j) acc[j] = static_cast<A>(hr[kUnit ? j : j * hsd]);
    for (int64_t s = 0; s < streams; ++s) {
      const T* mr = m + s * mss + t * mst;
      const A* as = a + s * ads;
      for (int64_t j = 0; j < len; ++j) {
        const A mv = static_cast<A>(mr[kUnit ? j : j * msd]);
        acc[j] += as[j] * mv;
        msum[j] += mv;
      }
    }
    T* ur = u + t * ust;
    for (int64_t j = 0; j < len; ++j) {
      ur[j] = static_cast<T>(acc[j]);
      pool[j] += acc[j];
    }
  }
  for (int64_t j = 0; j < len; ++j) {
    pool_out[j] = pool[j];
    msum_out[j] = msum[j];
  }
}

// v = pool / max(|pool|, eps) after pool *= inv_t, for one video.
template <typename T>
void normalize_row(acc_t<T>* pool, T* v, int64_t dim, acc_t<T> inv_t) {
  using A = acc_t<T>;
  A sq = 0;
  for (int64_t d = 0; d < dim; ++d) {
    pool[d] *= inv_t;
    sq += pool[d] * pool[d];
  }
  const A scale = A(1) / std::max(std::sqrt(sq), static_cast<A>(kEps));
  for (int64_t d = 0; d < dim; ++d) v[d] = static_cast<T>(pool[d] * scale);
}

template <typename T, bool kUnit>
void forward_impl(const at::TensorBase& h, const at::TensorBase& m, const at::TensorBase& gate,
                  const at::TensorBase& u, const at::TensorBase& v, const at::TensorBase& mu) {
  using A = acc_t<T>;
  constexpr int64_t W = kTile<A>;
  const int64_t batch = h.size(0), frames = h.size(1), dim = h.size(2), streams = m.size(1);
  const std::vector<A> a = tanh_gate<T>(gate);
  const View3<T> hv(h);
  const View4<T> mv(m);
  T* up = u.mutable_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  T* mup = mu.mutable_data_ptr<T>();
  const A inv_t = A(1) / static_cast<A>(frames);
  const A inv_st = A(1) / static_cast<A>(streams * frames);
  // Items: (video, chunk of D); a video is split only when the batch is too small to share.
  const int64_t min_chunks = ceil_div(4 * at::get_num_threads(), batch);
  const int64_t chunk = std::clamp<int64_t>(ceil_div(ceil_div(dim, min_chunks), W) * W, W, std::max<int64_t>(dim, W));
  const int64_t chunks = ceil_div(dim, chunk);
  std::vector<A> pooled(batch * dim);
  at::parallel_for(0, batch * chunks, grain_for(frames * (streams + 1) * std::min(chunk, dim)),
                   [&](int64_t begin, int64_t end) {
    A msum[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t d_end = std::min(dim, (item % chunks + 1) * chunk);
      for (int64_t d0 = (item % chunks) * chunk; d0 < d_end; d0 += W) {
        const int64_t n = std::min(W, d_end - d0);
        auto tile = n == W ? mix_tile<T, kUnit, true> : mix_tile<T, kUnit, false>;
        tile(hv.row(b, 0) + d0 * hv.sd, hv.st, hv.sd, mv.row(b, 0, 0) + d0 * mv.sd, mv.ss, mv.st, mv.sd, a.data() + d0,
             dim, up + b * frames * dim + d0, dim, pooled.data() + b * dim + d0, msum, frames, streams, n);
        for (int64_t i = 0; i < n; ++i) mup[b * dim + d0 + i] = static_cast<T>(msum[i] * inv_st);
      }
      if (chunks == 1) normalize_row<T>(pooled.data() + b * dim, vp + b * dim, dim, inv_t);
    }
  });
  if (chunks > 1) {
    at::parallel_for(0, batch, grain_for(dim), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) normalize_row<T>(pooled.data() + b * dim, vp + b * dim, dim, inv_t);
    });
  }
}

// acc += x
template <typename T, bool kUnit>
MPFAST_CLONES void sum_row(acc_t<T>* __restrict acc, const T* __restrict x, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<acc_t<T>>(x[kUnit ? i : i * stride]);
}

// gh = grad_u + gp (gp: gradient of the pooled mean, already divided by T); grad_h = gh
template <typename T, bool kUnit>
MPFAST_CLONES void grad_h_row(acc_t<T>* __restrict gh, T* __restrict grad_h, const T* __restrict grad_u,
                              const acc_t<T>* __restrict gp, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    gh[i] = static_cast<acc_t<T>>(grad_u[kUnit ? i : i * stride]) + gp[i];
    grad_h[i] = static_cast<T>(gh[i]);
  }
}

// grad_m = a * gh + gmu; gacc += gh * m
template <typename T, bool kUnit>
MPFAST_CLONES void grad_m_row(T* __restrict grad_m, acc_t<T>* __restrict gacc, const acc_t<T>* __restrict gh,
                              const acc_t<T>* __restrict a, const acc_t<T>* __restrict gmu, const T* __restrict m,
                              int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    grad_m[i] = static_cast<T>(a[i] * gh[i] + gmu[i]);
    gacc[i] += gh[i] * static_cast<acc_t<T>>(m[kUnit ? i : i * stride]);
  }
}

template <typename T, bool kUnit>
void backward_impl(const at::TensorBase& grad_u, const at::TensorBase& grad_v, const at::TensorBase& grad_mu,
                   const at::TensorBase& h, const at::TensorBase& m, const at::TensorBase& gate,
                   const at::TensorBase& grad_h, const at::TensorBase& grad_m, const at::TensorBase& grad_gate) {
  using A = acc_t<T>;
  const int64_t batch = h.size(0), frames = h.size(1), dim = h.size(2), streams = m.size(1);
  const std::vector<A> a = tanh_gate<T>(gate);
  const View3<T> hv(h), guv(grad_u);
  const View4<T> mv(m);
  const T* gvp = grad_v.const_data_ptr<T>();
  const T* gmup = grad_mu.const_data_ptr<T>();
  T* ghp = grad_h.mutable_data_ptr<T>();
  T* gmp = grad_m.mutable_data_ptr<T>();
  T* ggp = grad_gate.mutable_data_ptr<T>();

  // 1. pooled = mean_t h + sum_s a_s * mean_t m_s, then gp = d v / d pooled applied to grad_v, / T.
  std::vector<A> gp(batch * dim);
  const int64_t chunk1 = chunk_for(dim, 1);
  const int64_t chunks1 = ceil_div(dim, chunk1);
  at::parallel_for(0, batch * chunks1, grain_for(frames * (streams + 1) * std::min(chunk1, dim)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> msum(chunk1);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks1;
      const int64_t d0 = (item % chunks1) * chunk1;
      const int64_t n = std::min(chunk1, dim - d0);
      A* pool = gp.data() + b * dim + d0;
      std::fill(pool, pool + n, A(0));
      for (int64_t t = 0; t < frames; ++t) sum_row<T, kUnit>(pool, hv.row(b, t) + d0 * hv.sd, n, hv.sd);
      for (int64_t s = 0; s < streams; ++s) {
        std::fill(msum.begin(), msum.begin() + n, A(0));
        for (int64_t t = 0; t < frames; ++t) sum_row<T, kUnit>(msum.data(), mv.row(b, s, t) + d0 * mv.sd, n, mv.sd);
        const A* as = a.data() + s * dim + d0;
        for (int64_t i = 0; i < n; ++i) pool[i] += as[i] * msum[i];
      }
    }
  });
  at::parallel_for(0, batch, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      A* pool = gp.data() + b * dim;
      const A inv_t = A(1) / static_cast<A>(frames);
      A sq = 0;
      for (int64_t d = 0; d < dim; ++d) {
        pool[d] *= inv_t;
        sq += pool[d] * pool[d];
      }
      const A norm = std::sqrt(sq);
      const A eps = static_cast<A>(kEps);
      const T* gvb = gvp + b * grad_v.stride(0);
      const int64_t sd = grad_v.stride(1);
      if (norm > eps) {
        A dot = 0;
        for (int64_t d = 0; d < dim; ++d) dot += (pool[d] / norm) * static_cast<A>(gvb[d * sd]);
        for (int64_t d = 0; d < dim; ++d)
          pool[d] = (static_cast<A>(gvb[d * sd]) - (pool[d] / norm) * dot) / norm * inv_t;
      } else {
        for (int64_t d = 0; d < dim; ++d) pool[d] = static_cast<A>(gvb[d * sd]) / eps * inv_t;
      }
    }
  });

  // 2. grad_h, grad_m and grad_gate, one item per chunk of D over the whole batch.
  const int64_t chunk2 = chunk_for(dim, 4 * at::get_num_threads());
  const int64_t chunks2 = ceil_div(dim, chunk2);
  const A inv_st = A(1) / static_cast<A>(streams * frames);
  at::parallel_for(0, chunks2, grain_for(batch * frames * (2 * streams + 2) * std::min(chunk2, dim)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> buf((streams + 2) * chunk2);
    A* gh = buf.data();
    A* gmu = gh + chunk2;
    A* gacc = gmu + chunk2;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t d0 = item * chunk2;
      const int64_t n = std::min(chunk2, dim - d0);
      std::fill(gacc, gacc + streams * chunk2, A(0));
      for (int64_t b = 0; b < batch; ++b) {
        const T* gmub = gmup + b * grad_mu.stride(0) + d0 * grad_mu.stride(1);
        for (int64_t i = 0; i < n; ++i) gmu[i] = static_cast<A>(gmub[i * grad_mu.stride(1)]) * inv_st;
        for (int64_t t = 0; t < frames; ++t) {
          grad_h_row<T, kUnit>(gh, ghp + (b * frames + t) * dim + d0, guv.row(b, t) + d0 * guv.sd,
                               gp.data() + b * dim + d0, n, guv.sd);
          for (int64_t s = 0; s < streams; ++s)
            grad_m_row<T, kUnit>(gmp + ((b * streams + s) * frames + t) * dim + d0, gacc + s * chunk2, gh,
                                 a.data() + s * dim + d0, gmu, mv.row(b, s, t) + d0 * mv.sd, n, mv.sd);
        }
      }
      for (int64_t s = 0; s < streams; ++s)
        for (int64_t i = 0; i < n; ++i) {
          const A as = a[s * dim + d0 + i];
          ggp[s * dim + d0 + i] = static_cast<T>((A(1) - as * as) * gacc[s * chunk2 + i]);
        }
    }
  });
}

}  // namespace

void motion_mix_fwd_cpu(const at::TensorBase& h, const at::TensorBase& m, const at::TensorBase& gate,
                        const at::TensorBase& u, const at::TensorBase& v, const at::TensorBase& mu) {
  if (h.numel() == 0) return;
  const bool unit = h.stride(2) == 1 && m.stride(3) == 1;
  MPFAST_DISPATCH_FLOATS(h.scalar_type(), "motion_mix_fwd_cpu", [&] {
    if (unit) {
      forward_impl<scalar_t, true>(h, m, gate, u, v, mu);
    } else {
      forward_impl<scalar_t, false>(h, m, gate, u, v, mu);
    }
  });
}

void motion_mix_bwd_cpu(const at::TensorBase& grad_u, const at::TensorBase& grad_v, const at::TensorBase& grad_mu,
                        const at::TensorBase& h, const at::TensorBase& m, const at::TensorBase& gate,
                        const at::TensorBase& grad_h, const at::TensorBase& grad_m, const at::TensorBase& grad_gate) {
  if (grad_gate.numel() == 0 && h.numel() == 0) return;
  if (h.numel() == 0) {  // B == 0 or D == 0: nothing flows back; the gate gradient is 0
    MPFAST_DISPATCH_FLOATS(h.scalar_type(), "motion_mix_bwd_cpu", [&] {
      scalar_t* g = grad_gate.mutable_data_ptr<scalar_t>();
      std::fill(g, g + grad_gate.numel(), scalar_t(0));
    });
    return;
  }
  const bool unit = h.stride(2) == 1 && m.stride(3) == 1 && grad_u.stride(2) == 1;
  MPFAST_DISPATCH_FLOATS(h.scalar_type(), "motion_mix_bwd_cpu", [&] {
    if (unit) {
      backward_impl<scalar_t, true>(grad_u, grad_v, grad_mu, h, m, gate, grad_h, grad_m, grad_gate);
    } else {
      backward_impl<scalar_t, false>(grad_u, grad_v, grad_mu, h, m, gate, grad_h, grad_m, grad_gate);
    }
  });
}

}  // namespace mpfast
