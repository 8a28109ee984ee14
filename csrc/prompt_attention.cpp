// prompt_attention on CPU: out[b,c,h] = softmax_l(scale * q[(b,)c,h] . k[b,l,h]) v[b,l,h],
// padded keys excluded, a query with every key padded gives 0; and its backward
// (formulas of prompt_attention_backward_ref).
//
// One work item is one (video, head) pair (and, in the forward, a block of queries).
// Its operands are packed into float32 (float64) buffers whose rows are padded to the
// vector width, except keys/values that are already in the compute type with unit
// stride and a padded width (read in place: a batch-expanded k costs no copy). The
// products run through one small register-blocked matmul compiled for AVX-512, AVX2
// and baseline x86-64 (cpu_utils.h); small query blocks use dot products instead, and
// the softmax uses a vectorisable exp. The backward recomputes the probabilities.
// With queries shared by the batch ([C,H,d]) the items are heads, each looping over
// the videos, so grad_q (a sum over the batch) needs no atomics and is deterministic.
#include "cpu_utils.h"
#include "mpfast.h"

#include <cstring>
#include <limits>
#include <type_traits>

namespace mpfast {
namespace {

template <typename F>
constexpr int64_t kNR = 64 / sizeof(F);  // columns per register tile (one AVX-512 vector)

constexpr int64_t kQueryBlock = 64;  // queries per forward item
constexpr int64_t kSmallC = 8;       // below this many queries, scores are dot products

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

// S[c][l] = A[c] . B[l] for c < M, l < L (rows of length K, row strides lda, ldb); S[c][L:lds] = 0.
template <typename F>
MPFAST_CLONES void dots(int64_t M, int64_t L, int64_t K, const F* A, int64_t lda, const F* B, int64_t ldb, F* S,
                        int64_t lds) {
  for (int64_t c = 0; c < M; ++c) {
    const F* a = A + c * lda;
    for (int64_t l = 0; l < L; ++l) {
      const F* b = B + l * ldb;
      F s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < K; ++j) s += a[j] * b[j];
      S[c * lds + l] = s;
    }
    for (int64_t l = L; l < lds; ++l) S[c * lds + l] = 0;
  }
}

// Row-wise masked softmax of scale * S[c][0:L] in place (columns L..Lp zeroed); returns
// through inv[c] 1 / sum (0 for a row with every key padded) and leaves P unnormalised
// unless `normalise`. bias[l] is 0 for a key and -inf for a padded one, keep[l] 1 or 0.
template <typename F>
MPFAST_CLONES void softmax_rows(int64_t M, int64_t L, int64_t Lp, F* S, const F* bias, const F* keep, F scale,
                                F* inv, bool normalise) {
  for (int64_t c = 0; c < M; ++c) {
    F* s = S + c * Lp;
    F mx = -std::numeric_limits<F>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t l = 0; l < L; ++l) mx = std::max(mx, s[l] * scale + bias[l]);
    if (mx == -std::numeric_limits<F>::infinity()) {  // every key padded
      for (int64_t l = 0; l < Lp; ++l) s[l] = 0;
      inv[c] = 0;
      continue;
    }
    F sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t l = 0; l < L; ++l) {
      const F p = exp_fast(s[l] * scale + bias[l] - mx) * keep[l];
      s[l] = p;
      sum += p;
    }
    for (int64_t l = L; l < Lp; ++l) s[l] = 0;
    const F r = F(1) / sum;
    inv[c] = r;
    if (normalise) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) s[l] *= r;
    }
  }
}

// exp of 16 floats (exp_poly in GCC vector arithmetic, so that it stays in registers).
MPFAST_INLINE Vec<float>::type exp_vec(Vec<float>::type x) {
  typedef int32_t I __attribute__((vector_size(64)));
  return exp_poly<Vec<float>::type, I>(x);
}

// softmax_rows for float, 16 columns at a time (Lp is a multiple of 16; bias and keep
// are padded to Lp with -inf and 0).
template <>
MPFAST_CLONES void softmax_rows<float>(int64_t M, [[maybe_unused]] int64_t L, int64_t Lp, float* S, const float* bias,
                                       const float* keep, float scale, float* inv, bool normalise) {
  using V = Vec<float>::type;
  constexpr int64_t W = 16;
  for (int64_t c = 0; c < M; ++c) {
    float* s = S + c * Lp;
    V vmax = V{} - std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < Lp; l += W) {
      V x, bv;
      std::memcpy(&x, s + l, sizeof(V));
      std::memcpy(&bv, bias + l, sizeof(V));
      x = x * scale + bv;
      vmax = x > vmax ? x : vmax;
    }
    float mx = vmax[0];
    for (int i = 1; i < W; ++i) mx = std::max(mx, vmax[i]);
    if (mx == -std::numeric_limits<float>::infinity()) {  // every key padded
      std::fill(s, s + Lp, 0.0f);
      inv[c] = 0;
      continue;
    }
    V vsum = V{};
    for (int64_t l = 0; l < Lp; l += W) {
      V x, bv, kv;
      std::memcpy(&x, s + l, sizeof(V));
      std::memcpy(&bv, bias + l, sizeof(V));
      std::memcpy(&kv, keep + l, sizeof(V));
      const V p = exp_vec(x * scale + bv - mx) * kv;
      std::memcpy(s + l, &p, sizeof(V));
      vsum += p;
    }
    float sum = 0;
    for (int i = 0; i < W; ++i) sum += vsum[i];
    const float r = 1.0f / sum;
    inv[c] = r;
    if (normalise) {
      for (int64_t l = 0; l < Lp; ++l) s[l] *= r;
    }
  }
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

// dS = P * (dP - rowsum(P * dP)) * scale, in place in dP.
template <typename F>
MPFAST_CLONES void softmax_grad_rows(int64_t M, int64_t Lp, const F* P, F* dP, F scale) {
  for (int64_t c = 0; c < M; ++c) {
    const F* p = P + c * Lp;
    F* g = dP + c * Lp;
    F dot = 0;
    for (int64_t l = 0; l < Lp; ++l) dot += p[l] * g[l];
    for (int64_t l = 0; l < Lp; ++l) g[l] = p[l] * (g[l] - dot) * scale;
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

// Writes rows of a [rows][ld] buffer (times mul[r] if given) into a contiguous [B, rows, H, d] tensor at (b, h).
template <typename T, typename F>
void store_rows(const F* src, int64_t ld, int64_t n, int64_t d, T* dst, int64_t row_stride, const F* mul) {
  for (int64_t r = 0; r < n; ++r) {
    const F f = mul ? mul[r] : F(1);
    for (int64_t j = 0; j < d; ++j) dst[r * row_stride + j] = static_cast<T>(src[r * ld + j] * f);
  }
}

// Rows [r0, r0 + n) of q as the left matmul operand (row stride lda, unit element stride):
// in place when already in the compute type with unit stride, else packed into buf.
template <typename T, typename F>
const F* query_rows(const Slice<T>& src, int64_t r0, int64_t n, int64_t d, int64_t dp, std::vector<F>& buf,
                    int64_t& lda) {
  if constexpr (std::is_same_v<T, F>) {
    if (src.ds == 1) {
      lda = src.rs;
      return src.row(r0);
    }
  }
  buf.resize(n * dp);
  pack_rows<T, F>(src, r0, n, d, buf.data(), dp);
  lda = dp;
  return buf.data();
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

template <typename T>
void forward_impl(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& v, double scale,
                  const at::TensorBase* mask, const at::TensorBase& out) {
  using F = acc_t<T>;
  const int64_t B = k.size(0), L = k.size(1), H = k.size(2), d = k.size(3), C = q.size(q.dim() - 3);
  const int64_t Lp = round_up(L, kNR<F>), dp = round_up(d, kNR<F>), Cp = round_up(C, kNR<F>);
  const bool shared = q.dim() == 3;
  // Many queries: scores are computed transposed, ST[l][c] = K Q^T, from Q^T packed
  // once per head when q is shared by the batch. Few queries: dot products per row.
  const bool small = C < kSmallC;
  std::vector<F> shared_qt;
  if (shared && !small) {
    shared_qt.resize(H * d * Cp);
    at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h)
        pack_queries_transposed<T, F>(slice<T>(q, 0, h), 0, C, d, shared_qt.data() + h * d * Cp, Cp);
    });
  }
  // Items: (video, head, group of query blocks); groups only when B * H is too few to share.
  const int64_t blocks = ceil_div(C, kQueryBlock);
  const int64_t groups = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), B * H), 1, blocks);
  const int64_t blocks_per_group = ceil_div(blocks, groups);
  T* op = out.mutable_data_ptr<T>();
  const int64_t work = 4 * std::min(C, blocks_per_group * kQueryBlock) * L * d;
  at::parallel_for(0, B * H * groups, grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<F> qbuf, kbuf, vbuf, sbuf, obuf, inv, bias, keep;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % groups, h = (item / groups) % H, b = item / (groups * H);
      const int64_t c_begin = g * blocks_per_group * kQueryBlock;
      const int64_t c_end = std::min(C, c_begin + blocks_per_group * kQueryBlock);
      if (c_begin >= c_end) continue;
      mask_row<F>(mask, b, L, Lp, bias, keep);
      const Slice<T> qs = slice<T>(q, b, h), ks = slice<T>(k, b, h), vs = slice<T>(v, b, h);
      int64_t ldk = 0, ldv = 0;
      const F* kr = operand_rows<T, F>(ks, L, d, dp, kbuf, ldk);
      const F* vr = operand_rows<T, F>(vs, L, d, dp, vbuf, ldv);
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kQueryBlock) {
        const int64_t cm = std::min(kQueryBlock, c_end - c0);
        const int64_t cmp = round_up(cm, kNR<F>);
        inv.resize(cmp);
        obuf.resize(cm * dp);
        if (small) {
          int64_t ldq = 0;
          const F* qr = query_rows<T, F>(qs, c0, cm, d, dp, qbuf, ldq);
          sbuf.resize(cm * Lp);
          dots<F>(cm, L, d, qr, ldq, kr, ldk, sbuf.data(), Lp);
          softmax_rows<F>(cm, L, Lp, sbuf.data(), bias.data(), keep.data(), static_cast<F>(scale), inv.data(),
                          false);
          matmul<F>(cm, dp, L, sbuf.data(), Lp, 1, vr, ldv, obuf.data(), dp, false);
        } else {
          const F* qt;
          int64_t ldqt;
          if (shared) {
            qt = shared_qt.data() + h * d * Cp + c0;
            ldqt = Cp;
          } else {
            qbuf.resize(d * cmp);
            pack_queries_transposed<T, F>(qs, c0, cm, d, qbuf.data(), cmp);
            qt = qbuf.data();
            ldqt = cmp;
          }
          sbuf.resize(L * cmp);
          matmul<F>(L, cmp, d, kr, ldk, 1, qt, ldqt, sbuf.data(), cmp, false);
          softmax_cols<F>(L, cmp, sbuf.data(), bias.data(), keep.data(), static_cast<F>(scale), inv.data());
          matmul<F>(cm, dp, L, sbuf.data(), 1, cmp, vr, ldv, obuf.data(), dp, false);
        }
        store_rows<T, F>(obuf.data(), dp, cm, d, op + ((b * C + c0) * H + h) * d, H * d, inv.data());
      }
    }
  });
}

template <typename T>
void backward_impl(const at::TensorBase& grad_out, const at::TensorBase& q, const at::TensorBase& k,
                   const at::TensorBase& v, double scale, const at::TensorBase* mask, const at::TensorBase& grad_q,
                   const at::TensorBase& grad_k, const at::TensorBase& grad_v) {
  using F = acc_t<T>;
  const int64_t B = k.size(0), L = k.size(1), H = k.size(2), d = k.size(3), C = q.size(q.dim() - 3);
  const int64_t Lp = round_up(L, kNR<F>), dp = round_up(d, kNR<F>);
  const bool shared = q.dim() == 3;
  T* gqp = grad_q.mutable_data_ptr<T>();
  T* gkp = grad_k.mutable_data_ptr<T>();
  T* gvp = grad_v.mutable_data_ptr<T>();
  const F sc = static_cast<F>(scale);
  // Shared queries: one item per head (looping over the videos); else one per (video, head).
  const int64_t items = shared ? H : B * H;
  const int64_t videos_per_item = shared ? B : 1;
  at::parallel_for(0, items, grain_for(8 * videos_per_item * C * L * d), [&](int64_t begin, int64_t end) {
    std::vector<F> qbuf, gobuf, kbuf, vbuf, ktbuf, vtbuf, pbuf, dpbuf, gqbuf, gkbuf, gvbuf, inv, bias, keep;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % H;
      const int64_t b_first = shared ? 0 : item / H;
      gqbuf.assign(C * dp, F(0));
      int64_t ldq = 0, ldgo = 0;
      const F* qr = shared ? operand_rows<T, F>(slice<T>(q, 0, h), C, d, dp, qbuf, ldq) : nullptr;
      for (int64_t b = b_first; b < b_first + videos_per_item; ++b) {
        if (!shared) qr = operand_rows<T, F>(slice<T>(q, b, h), C, d, dp, qbuf, ldq);
        mask_row<F>(mask, b, L, Lp, bias, keep);
        const Slice<T> ks = slice<T>(k, b, h), vs = slice<T>(v, b, h), gos = slice<T>(grad_out, b, h);
        const F* gor = operand_rows<T, F>(gos, C, d, dp, gobuf, ldgo);
        int64_t ldk = 0, ldv = 0;
        const F* kr = operand_rows<T, F>(ks, L, d, dp, kbuf, ldk);
        const F* vr = operand_rows<T, F>(vs, L, d, dp, vbuf, ldv);
        pbuf.resize(C * Lp);
        dpbuf.resize(C * Lp);
        inv.resize(C);
        if (C >= kSmallC) {
          ktbuf.resize(d * Lp);
          vtbuf.resize(d * Lp);
          pack_transposed<T, F>(ks, L, d, ktbuf.data(), Lp);
          pack_transposed<T, F>(vs, L, d, vtbuf.data(), Lp);
          matmul<F>(C, Lp, d, qr, ldq, 1, ktbuf.data(), Lp, pbuf.data(), Lp, false);
          matmul<F>(C, Lp, d, gor, ldgo, 1, vtbuf.data(), Lp, dpbuf.data(), Lp, false);
        } else {
          dots<F>(C, L, d, qr, ldq, kr, ldk, pbuf.data(), Lp);
          dots<F>(C, L, d, gor, ldgo, vr, ldv, dpbuf.data(), Lp);
        }
        softmax_rows<F>(C, L, Lp, pbuf.data(), bias.data(), keep.data(), sc, inv.data(), true);
        softmax_grad_rows<F>(C, Lp, pbuf.data(), dpbuf.data(), sc);  // dpbuf now holds dS
        // grad_q (+)= dS K
        matmul<F>(C, dp, L, dpbuf.data(), Lp, 1, kr, ldk, gqbuf.data(), dp, shared && b > 0);
        // grad_k = dS^T Q, grad_v = P^T dO
        gkbuf.resize(L * dp);
        gvbuf.resize(L * dp);
        matmul<F>(L, dp, C, dpbuf.data(), 1, Lp, qr, ldq, gkbuf.data(), dp, false);
        matmul<F>(L, dp, C, pbuf.data(), 1, Lp, gor, ldgo, gvbuf.data(), dp, false);
        store_rows<T, F>(gkbuf.data(), dp, L, d, gkp + (b * L * H + h) * d, H * d, nullptr);
        store_rows<T, F>(gvbuf.data(), dp, L, d, gvp + (b * L * H + h) * d, H * d, nullptr);
        if (!shared) store_rows<T, F>(gqbuf.data(), dp, C, d, gqp + (b * C * H + h) * d, H * d, nullptr);
      }
      if (shared) store_rows<T, F>(gqbuf.data(), dp, C, d, gqp + h * d, H * d, nullptr);
    }
  });
}

}  // namespace

void prompt_attention_fwd_cpu(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& v,
                              double scale, const at::TensorBase* key_padding_mask, const at::TensorBase& out) {
  if (out.numel() == 0) return;
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_fwd_cpu",
                         [&] { forward_impl<scalar_t>(q, k, v, scale, key_padding_mask, out); });
}

void prompt_attention_bwd_cpu(const at::TensorBase& grad_out, const at::TensorBase& q, const at::TensorBase& k,
                              const at::TensorBase& v, double scale, const at::TensorBase* key_padding_mask,
                              const at::TensorBase& grad_q, const at::TensorBase& grad_k,
                              const at::TensorBase& grad_v) {
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_bwd_cpu", [&] {
    if (k.numel() == 0 || q.numel() == 0) {  // no pair of query and key: every gradient is 0
      for (const at::TensorBase* g : {&grad_q, &grad_k, &grad_v}) {
        scalar_t* p = g->mutable_data_ptr<scalar_t>();
        std::fill(p, p + g->numel(), scalar_t(0));
      }
      return;
    }
    backward_impl<scalar_t>(grad_out, q, k, v, scale, key_padding_mask, grad_q, grad_k, grad_v);
  });
}

}  // namespace mpfast
