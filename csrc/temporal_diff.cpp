// temporal_diff on CPU: out[b,s,t,f] = x[b,t+k_s,f] - x[b,t,f] (0 where t+k_s >= T).
//
// The feature dimensions of x are merged into strided rows (mpfast::collapse_dims), so
// any layout works without a copy. One work item is (batch, feature row, chunk of the
// innermost dimension); it runs over every frame and stride, so the T frames of its
// chunk stay in cache and x is read from memory about once. The backward gathers
//   grad_x[b,t] = sum_s [t >= k_s] grad[b,s,t-k_s] - [t + k_s < T] grad[b,s,t]
// per item in the same order as the reference (add, then subtract, stride by stride).
#include "cpu_utils.h"
#include "mpfast.h"

namespace mpfast {
namespace {

constexpr int64_t kChunk = 2048;

// Layout of the features of a tensor [B, (S,) T, *F] split into rows of `inner` elements.
struct Rows {
  std::vector<Dim> outer;  // merged feature dimensions above the innermost one
  int64_t inner;           // elements per row
  int64_t inner_stride;
  int64_t count;           // number of rows

  Rows(const at::TensorBase& t, int64_t first_feature_dim) {
    outer = collapse_dims(t, first_feature_dim);
    inner = outer.back().size;
    inner_stride = outer.back().stride;
    outer.pop_back();
    count = 1;
    for (const Dim& d : outer) count *= d.size;
  }

  int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int64_t i = static_cast<int64_t>(outer.size()) - 1; i >= 0; --i) {
      off += (row % outer[i].size) * outer[i].stride;
      row /= outer[i].size;
    }
    return off;
  }
};

template <typename T, bool kUnit>
MPFAST_CLONES void diff_row(T* __restrict out, const T* __restrict later, const T* __restrict earlier,
                            int64_t n, int64_t stride) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = kUnit ? i : i * stride;
    out[i] = static_cast<T>(static_cast<A>(later[j]) - static_cast<A>(earlier[j]));
  }
}

template <typename T, bool kUnit>
MPFAST_CLONES void add_row(acc_t<T>* __restrict acc, const T* __restrict g, int64_t n, int64_t stride, bool add) {
  using A = acc_t<T>;
  if (add) {
    for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(g[kUnit ? i : i * stride]);
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] -= static_cast<A>(g[kUnit ? i : i * stride]);
  }
}

template <typename T>
MPFAST_CLONES void store_row(T* __restrict out, const acc_t<T>* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T, bool kUnit>
void forward_impl(const at::TensorBase& x, c10::IntArrayRef strides, const at::TensorBase& out) {
  const int64_t batch = x.size(0), frames = x.size(1), num_strides = static_cast<int64_t>(strides.size());
  const Rows rows(x, 2);
  const int64_t chunks = ceil_div(rows.inner, kChunk);
  const int64_t features = rows.count * rows.inner;  // out is contiguous: [B, S, T, features]
  const int64_t sb = x.stride(0), st = x.stride(1);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const std::vector<int64_t> ks(strides.begin(), strides.end());
  const int64_t items = batch * rows.count * chunks;
  at::parallel_for(0, items, grain_for(frames * num_strides * std::min(rows.inner, kChunk)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item % chunks;
      const int64_t row = (item / chunks) % rows.count;
      const int64_t b = item / (chunks * rows.count);
      const int64_t f0 = chunk * kChunk;
      const int64_t n = std::min(kChunk, rows.inner - f0);
      const T* xrow = xp + b * sb + rows.offset(row) + f0 * rows.inner_stride;
      T* orow = op + b * num_strides * frames * features + row * rows.inner + f0;
      for (int64_t s = 0; s < num_strides; ++s) {
        const int64_t k = ks[s];
        for (int64_t t = 0; t < frames; ++t) {
          T* o = orow + (s * frames + t) * features;
          if (k < frames - t) {  // t + k < frames, without overflow for huge k
            diff_row<T, kUnit>(o, xrow + (t + k) * st, xrow + t * st, n, rows.inner_stride);
          } else {
            std::fill(o, o + n, T(0));
          }
        }
      }
    }
  });
}

template <typename T, bool kUnit>
void backward_impl(const at::TensorBase& grad, c10::IntArrayRef strides, const at::TensorBase& grad_x) {
  using A = acc_t<T>;
  const int64_t batch = grad.size(0), num_strides = grad.size(1), frames = grad.size(2);
  const Rows rows(grad, 3);
  const int64_t chunks = ceil_div(rows.inner, kChunk);
  const int64_t features = rows.count * rows.inner;  // grad_x is contiguous: [B, T, features]
  const int64_t sb = grad.stride(0), ss = grad.stride(1), st = grad.stride(2);
  const T* gp = grad.const_data_ptr<T>();
  T* op = grad_x.mutable_data_ptr<T>();
  const std::vector<int64_t> ks(strides.begin(), strides.end());
  const int64_t items = batch * rows.count * chunks;
  at::parallel_for(0, items, grain_for(frames * num_strides * std::min(rows.inner, kChunk)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> acc(std::min(kChunk, rows.inner));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item % chunks;
      const int64_t row = (item / chunks) % rows.count;
      const int64_t b = item / (chunks * rows.count);
      const int64_t f0 = chunk * kChunk;
      const int64_t n = std::min(kChunk, rows.inner - f0);
      const T* grow = gp + b * sb + rows.offset(row) + f0 * rows.inner_stride;
      T* orow = op + b * frames * features + row * rows.inner + f0;
      for (int64_t t = 0; t < frames; ++t) {
        std::fill(acc.begin(), acc.begin() + n, A(0));
        for (int64_t s = 0; s < num_strides; ++s) {
          const int64_t k = ks[s];
          if (t >= k) add_row<T, kUnit>(acc.data(), grow + s * ss + (t - k) * st, n, rows.inner_stride, true);
          if (k < frames - t) add_row<T, kUnit>(acc.data(), grow + s * ss + t * st, n, rows.inner_stride, false);
        }
        store_row<T>(orow + t * features, acc.data(), n);
      }
    }
  });
}

}  // namespace

void temporal_diff_fwd_cpu(const at::TensorBase& x, c10::IntArrayRef strides, const at::TensorBase& out) {
  if (out.numel() == 0) return;
  const bool unit = Rows(x, 2).inner_stride == 1;
  MPFAST_DISPATCH_FLOATS(x.scalar_type(), "temporal_diff_fwd_cpu", [&] {
    if (unit) {
      forward_impl<scalar_t, true>(x, strides, out);
    } else {
      forward_impl<scalar_t, false>(x, strides, out);
    }
  });
}

void temporal_diff_bwd_cpu(const at::TensorBase& grad, c10::IntArrayRef strides, const at::TensorBase& grad_x) {
  if (grad_x.numel() == 0) return;
  const bool unit = Rows(grad, 3).inner_stride == 1;
  MPFAST_DISPATCH_FLOATS(grad.scalar_type(), "temporal_diff_bwd_cpu", [&] {
    if (unit) {
      backward_impl<scalar_t, true>(grad, strides, grad_x);
    } else {
      backward_impl<scalar_t, false>(grad, strides, grad_x);
    }
  });
}

}  // namespace mpfast
