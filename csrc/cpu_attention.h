// Building blocks of the CPU attention kernels (prompt_attention.cpp, class_logits.cpp):
// one register-blocked matmul on padded float32/float64 buffers, the masked column-wise
// softmax, and the packing of [B, rows, H, d] operands into such buffers.
//
// Everything here has internal linkage (an unnamed namespace): each kernel file gets its
// own copies, and the ISA clones (MPFAST_CLONES) of each are resolved per file.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_utils.h"

namespace mpfast {
namespace {

template <typename F>
constexpr int64_t kNR = 64 / sizeof(F);  // columns per register tile (one AVX-512 vector)

inline int64_t round_up(int64_t n, int64_t m) { return ceil_div(n, m) * m; }

// One 64-byte vector of F (GCC vector extension: one AVX-512 register, two AVX2
// registers or four SSE registers, depending on the clone being compiled).
template <typename F>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};

// C[MR][0:NR] (+)= sum_k A(r, k) * B[k][0:NR], the accumulators held in registers.
template <typename F, int MR>
MPFAST_INLINE void tile(int64_t K, const F* __restrict A, int64_t ars, int64_t acs, const F* __restrict B,
                        int64_t ldb, F* __restrict C, int64_t ldc, bool accumulate) {
  using V = typename Vec<F>::type;
  V acc[MR];
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      std::memcpy(&acc[r], C + r * ldc, sizeof(V));
    } else {
      acc[r] = V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V b;
    std::memcpy(&b, B + k * ldb, sizeof(V));
    for (int r = 0; r < MR; ++r) acc[r] += A[r * ars + k * acs] * b;
  }
  for (int r = 0; r < MR; ++r) std::memcpy(C + r * ldc, &acc[r], sizeof(V));
}

// C[M][N] (+)= A[M][K] B[K][N] with A(m, k) = A[m * ars + k * acs], B and C row-major,
// N a multiple of kNR<F> (buffers are padded).
template <typename F>
MPFAST_CLONES void matmul(int64_t M, int64_t N, int64_t K, const F* A, int64_t ars, int64_t acs, const F* B,
                          int64_t ldb, F* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kNR<F>) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile<F, 4>(K, A + m * ars, ars, acs, B + n0, ldb, C + m * ldc + n0, ldc, accumulate);
    for (; m < M; ++m) tile<F, 1>(K, A + m * ars, ars, acs, B + n0, ldb, C + m * ldc + n0, ldc, accumulate);
  }
}

// exp of 16 floats (exp_poly in GCC vector arithmetic, so that it stays in registers).
MPFAST_INLINE Vec<float>::type exp_vec(Vec<float>::type x) {
  typedef int32_t I __attribute__((vector_size(64)));
  return exp_poly<Vec<float>::type, I>(x);
}

// Column-wise masked softmax of the transposed scores ST[l][c] (l < L keys, c < N
// queries, N a multiple of kNR): a vector holds kNR queries, so no horizontal
// reductions. bias/keep are per key (see mask_row); inv[c] = 1 / sum, 0 when every
// key is padded (then the column is all 0). P is left unnormalised.
template <typename F>
MPFAST_CLONES void softmax_cols(int64_t L, int64_t N, F* ST, const F* bias, const F* keep, F scale, F* inv) {
  using V = typename Vec<F>::type;
  constexpr int64_t W = kNR<F>;
  constexpr F kInf = std::numeric_limits<F>::infinity();
  for (int64_t c = 0; c < N; c += W) {
    V vmax = V{} - kInf;
    for (int64_t l = 0; l < L; ++l) {
      V x;
      std::memcpy(&x, ST + l * N + c, sizeof(V));
      x = x * scale + bias[l];
      vmax = x > vmax ? x : vmax;
    }
    const V shift = vmax == -kInf ? V{} : vmax;  // all padded: any finite shift, keep zeroes it
    V vsum = V{};
    for (int64_t l = 0; l < L; ++l) {
      V x;
      std::memcpy(&x, ST + l * N + c, sizeof(V));
      V p;
      if constexpr (std::is_same_v<F, float>) {
        p = exp_vec(x * scale + bias[l] - shift) * keep[l];
      } else {
        const V arg = x * scale + bias[l] - shift;
        for (int64_t i = 0; i < W; ++i) p[i] = std::exp(arg[i]);
        p *= keep[l];
      }
      std::memcpy(ST + l * N + c, &p, sizeof(V));
      vsum += p;
    }
    const V r = vsum > 0 ? F(1) / vsum : V{};
    std::memcpy(inv + c, &r, sizeof(V));
  }
}

// A [rows, d] slice of a [B, rows, H, d] (or [rows, H, d]) tensor at (b, h), with strides.
template <typename T>
struct Slice {
  const T* p;
  int64_t rs, ds;  // row stride, element stride
  const T* row(int64_t r) const { return p + r * rs; }
};

template <typename T>
Slice<T> slice(const at::TensorBase& t, int64_t b, int64_t h) {
  const T* p = t.const_data_ptr<T>();
  if (t.dim() == 3) return {p + h * t.stride(1), t.stride(0), t.stride(2)};
  return {p + b * t.stride(0) + h * t.stride(2), t.stride(1), t.stride(3)};
}

// Copies rows [r0, r0 + n) of a slice into dst (row stride ld, zero padding to ld) as F * mul.
template <typename T, typename F>
void pack_rows(const Slice<T>& src, int64_t r0, int64_t n, int64_t d, F* dst, int64_t ld, F mul = F(1)) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src.row(r0 + r);
    F* o = dst + r * ld;
    if (src.ds == 1) {
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<F>(s[j]) * mul;
    } else {
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<F>(s[j * src.ds]) * mul;
    }
    for (int64_t j = d; j < ld; ++j) o[j] = 0;
  }
}

// Transposed copy: dst[j][r] = src[r][j], columns padded with zeros to ld.
template <typename T, typename F>
void pack_transposed(const Slice<T>& src, int64_t n, int64_t d, F* dst, int64_t ld) {
  for (int64_t j = 0; j < d; ++j) {
    F* o = dst + j * ld;
    for (int64_t r = 0; r < n; ++r) o[r] = static_cast<F>(src.row(r)[j * src.ds]);
    for (int64_t r = n; r < ld; ++r) o[r] = 0;
  }
}

// Rows of k or v as a matmul operand: in place when possible, else packed into buf.
template <typename T, typename F>
const F* operand_rows(const Slice<T>& src, int64_t n, int64_t d, int64_t dp, std::vector<F>& buf, int64_t& ld) {
  if constexpr (std::is_same_v<T, F>) {
    if (src.ds == 1 && d == dp) {
      ld = src.rs;
      return src.p;
    }
  }
  buf.resize(n * dp);
  pack_rows<T, F>(src, 0, n, d, buf.data(), dp);
  ld = dp;
  return buf.data();
}

// bias[l] = -inf and keep[l] = 0 for a padded key of video b (and for l >= L), else 0 and 1.
template <typename F>
void mask_row(const at::TensorBase* mask, int64_t b, int64_t L, int64_t Lp, std::vector<F>& bias,
              std::vector<F>& keep) {
  bias.assign(Lp, -std::numeric_limits<F>::infinity());
  keep.assign(Lp, F(0));
  std::fill(bias.begin(), bias.begin() + L, F(0));
  std::fill(keep.begin(), keep.begin() + L, F(1));
  if (mask == nullptr) return;
  const bool* p = mask->const_data_ptr<bool>() + b * mask->stride(0);
  for (int64_t l = 0; l < L; ++l) {
    if (p[l * mask->stride(1)]) {
      bias[l] = -std::numeric_limits<F>::infinity();
      keep[l] = 0;
    }
  }
}

// Transposed copy of rows [r0, r0 + n) of q: dst[j][c] (row stride ld >= n, zero padded).
template <typename T, typename F>
void pack_queries_transposed(const Slice<T>& src, int64_t r0, int64_t n, int64_t d, F* dst, int64_t ld) {
  for (int64_t j = 0; j < d; ++j) std::fill(dst + j * ld + n, dst + (j + 1) * ld, F(0));
  for (int64_t c = 0; c < n; ++c) {
    const T* row = src.row(r0 + c);
    for (int64_t j = 0; j < d; ++j) dst[j * ld + c] = static_cast<F>(row[j * src.ds]);
  }
}

}  // namespace
}  // namespace mpfast
