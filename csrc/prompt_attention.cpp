// prompt_attention on CPU: out[b,c,h] = softmax_l(scale * q[(b,)c,h] . k[b,l,h]) v[b,l,h],
// padded keys excluded, a query with every key padded gives 0; and its backward
// (formulas of prompt_attention_backward_ref).
//
// One work item is one (video, head) pair (and, in the forward, a block of queries).
// Its operands are packed into float32 (float64) buffers whose rows are padded to the
// vector width, except keys/values that are already in the compute type with unit
// stride and a padded width (read in place: a batch-expanded k costs no copy). The
// products run through one small register-blocked matmul compiled for AVX-512, AVX2
// and baseline x86-64 (cpu_attention.h); small query blocks use dot products instead, and
// the softmax uses a vectorisable exp. The backward recomputes the probabilities.
// With queries shared by the batch ([C,H,d]) the items are heads, each looping over
// the videos, so grad_q (a sum over the batch) needs no atomics and is deterministic.
#include "cpu_attention.h"
#include "cpu_utils.h"
#include "mpfast.h"

#include <cstring>
#include <limits>
#include <type_traits>

namespace mpfast {
namespace {

constexpr int64_t kQueryBlock = 64;  // queries per forward item
constexpr int64_t kSmallC = 8;       // below this many queries, scores are dot products

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
