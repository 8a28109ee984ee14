// class_logits on CPU: the core op of mpfast/ops/class_logits.py (the formulas of
// class_cosine_ref and class_cosine_backward_ref). For video b and class c, with the L H
// attention weights a = softmax_l(scale * q[c,h] . k[b,l,h]) (padded keys excluded),
//   g[j]  = base_v[c,h] . v[b,l,h]                        (j = h L + l: one (head, key) pair)
//   dot   = base_dot[b,c] + a . proj[b]
//   sq    = base_sq[c] + a . (2 g + M a),  M = (gram[b] + gram[b]^T) / 2
//   cosine[b,c] = dot / sqrt(max(sq, eps^2))
// and the backward, which recomputes a, g and M a tile by tile.
//
// A work item is one video and a tile of kClassTile classes. Classes lie along the
// vector lanes (the "column layout" of prompt_attention's forward): the tile's scores,
// g and M a are [L H][classes] buffers, rows head-major (j = h L + l), so the softmax of
// a head is a column-wise softmax over its L rows and every per-class sum is a sum of
// rows, with no horizontal reductions; gram and proj come in that order (M is
// symmetrised once per video). The products go through the register-blocked matmul of
// cpu_attention.h. Nothing of size [B, C, L H] is stored: the backward recomputes each
// tile. Its items are videos; the class-side gradients (q, base_v, base_sq: sums over
// the videos) go to per-thread accumulators added up at the end, in thread order, so the
// result does not depend on scheduling.
#include "cpu_attention.h"
#include "cpu_utils.h"
#include "mpfast.h"

#include <cmath>
#include <vector>

namespace mpfast {
namespace {

constexpr int64_t kClassTile = 64;  // classes per work item
constexpr double kEps = 1e-12;      // the norm is clamped at kEps, as F.normalize does

// What every item reads: the shapes, the class-side operands packed once (transposed for
// the scores, row-major for the backward's products), and the op's strided inputs.
template <typename T, typename F>
struct Problem {
  int64_t B, C, L, H, d, LH, dp, Cp;
  F scale;
  const at::TensorBase &q, &k, &base_v, &v, &gram, &proj, &base_dot, &base_sq;
  const at::TensorBase* mask;
  std::vector<F> qt, rt;  // [H][d][Cp]: q and base_v transposed, zero-padded columns
  std::vector<F> qr, rr;  // [H][C][dp]: q and base_v rows (backward only)

  Problem(const at::TensorBase& q_, const at::TensorBase& k_, const at::TensorBase& base_v_,
          const at::TensorBase& v_, const at::TensorBase& gram_, const at::TensorBase& proj_,
          const at::TensorBase& base_dot_, const at::TensorBase& base_sq_, double scale_,
          const at::TensorBase* mask_, bool rows)
      : B(k_.size(0)), C(q_.size(0)), L(k_.size(1)), H(k_.size(2)), d(k_.size(3)), LH(L * H),
        dp(round_up(d, kNR<F>)), Cp(round_up(C, kNR<F>)), scale(static_cast<F>(scale_)), q(q_), k(k_),
        base_v(base_v_), v(v_), gram(gram_), proj(proj_), base_dot(base_dot_), base_sq(base_sq_), mask(mask_) {
    qt.resize(H * d * Cp);
    rt.resize(H * d * Cp);
    if (rows) {
      qr.resize(H * C * dp);
      rr.resize(H * C * dp);
    }
    at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        pack_queries_transposed<T, F>(slice<T>(q, 0, h), 0, C, d, qt.data() + h * d * Cp, Cp);
        pack_queries_transposed<T, F>(slice<T>(base_v, 0, h), 0, C, d, rt.data() + h * d * Cp, Cp);
        if (rows) {
          pack_rows<T, F>(slice<T>(q, 0, h), 0, C, d, qr.data() + h * C * dp, dp);
          pack_rows<T, F>(slice<T>(base_v, 0, h), 0, C, d, rr.data() + h * C * dp, dp);
        }
      }
    });
  }
};

// One video's operands: keys and values of each head as matmul rows, the mask, M
// (symmetrised) and proj.
template <typename T, typename F>
struct Video {
  std::vector<F> kbuf, vbuf, bias, keep, m, y;
  std::vector<const F*> kr, vr;
  std::vector<int64_t> ldk, ldv;

  void load(const Problem<T, F>& p, int64_t b) {
    const int64_t L = p.L, H = p.H, LH = p.LH;
    kbuf.resize(H * L * p.dp);
    vbuf.resize(H * L * p.dp);
    kr.resize(H);
    vr.resize(H);
    ldk.resize(H);
    ldv.resize(H);
    for (int64_t h = 0; h < H; ++h) {
      kr[h] = rows_of(slice<T>(p.k, b, h), p, kbuf.data() + h * L * p.dp, ldk[h]);
      vr[h] = rows_of(slice<T>(p.v, b, h), p, vbuf.data() + h * L * p.dp, ldv[h]);
    }
    mask_row<F>(p.mask, b, L, round_up(L, kNR<F>), bias, keep);
    const T* g = p.gram.template const_data_ptr<T>() + b * p.gram.stride(0);
    const int64_t s1 = p.gram.stride(1), s2 = p.gram.stride(2);
    m.resize(LH * LH);
    for (int64_t i = 0; i < LH; ++i) {
      for (int64_t j = 0; j < LH; ++j) {
        m[i * LH + j] = F(0.5) * (static_cast<F>(g[i * s1 + j * s2]) + static_cast<F>(g[j * s1 + i * s2]));
      }
    }
    const T* y_in = p.proj.template const_data_ptr<T>() + b * p.proj.stride(0);
    y.resize(LH);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t l = 0; l < L; ++l) y[h * L + l] = static_cast<F>(y_in[h * p.proj.stride(1) + l * p.proj.stride(2)]);
  }

 private:
  // Rows of one head's keys or values: in place when already in the compute type with unit
  // stride and a padded width, else packed into dst (row stride dp).
  static const F* rows_of(const Slice<T>& src, const Problem<T, F>& p, F* dst, int64_t& ld) {
    if constexpr (std::is_same_v<T, F>) {
      if (src.ds == 1 && p.d == p.dp) {
        ld = src.rs;
        return src.p;
      }
    }
    pack_rows<T, F>(src, 0, p.L, p.d, dst, p.dp);
    ld = p.dp;
    return dst;
  }
};

// One tile's buffers, [L H][cmp] each, and the per-class sums.
template <typename F>
struct Tile {
  std::vector<F> a, g, ma, inv, dot, sq;
  int64_t c0 = 0, cm = 0, cmp = 0;
};

// Recomputes a tile: a (normalised weights), g, M a, dot and sq for classes [c0, c0 + cm).
template <typename T, typename F>
MPFAST_CLONES void tile_forward(const Problem<T, F>& p, const Video<T, F>& vid, int64_t b, Tile<F>& t) {
  const int64_t L = p.L, LH = p.LH, cmp = t.cmp;
  t.a.resize(LH * cmp);
  t.g.resize(LH * cmp);
  t.ma.resize(LH * cmp);
  t.inv.resize(cmp);
  t.dot.assign(cmp, F(0));
  t.sq.assign(cmp, F(0));
  for (int64_t h = 0; h < p.H; ++h) {
    F* a = t.a.data() + h * L * cmp;
    const F* qt = p.qt.data() + h * p.d * p.Cp + t.c0;
    const F* rt = p.rt.data() + h * p.d * p.Cp + t.c0;
    matmul<F>(L, cmp, p.d, vid.kr[h], vid.ldk[h], 1, qt, p.Cp, a, cmp, false);
    softmax_cols<F>(L, cmp, a, vid.bias.data(), vid.keep.data(), p.scale, t.inv.data());
    for (int64_t l = 0; l < L; ++l) {
      F* row = a + l * cmp;
#pragma omp simd
      for (int64_t c = 0; c < cmp; ++c) row[c] *= t.inv[c];
    }
    matmul<F>(L, cmp, p.d, vid.vr[h], vid.ldv[h], 1, rt, p.Cp, t.g.data() + h * L * cmp, cmp, false);
  }
  matmul<F>(LH, cmp, LH, vid.m.data(), LH, 1, t.a.data(), cmp, t.ma.data(), cmp, false);
  const T* n0 = p.base_dot.template const_data_ptr<T>() + b * p.base_dot.stride(0);
  const T* s = p.base_sq.template const_data_ptr<T>();
  for (int64_t c = 0; c < t.cm; ++c) {
    t.dot[c] = static_cast<F>(n0[(t.c0 + c) * p.base_dot.stride(1)]);
    t.sq[c] = static_cast<F>(s[(t.c0 + c) * p.base_sq.stride(0)]);
  }
  F* dot = t.dot.data();
  F* sq = t.sq.data();
  for (int64_t j = 0; j < LH; ++j) {
    const F* a = t.a.data() + j * cmp;
    const F* g = t.g.data() + j * cmp;
    const F* ma = t.ma.data() + j * cmp;
    const F y = vid.y[j];
#pragma omp simd
    for (int64_t c = 0; c < cmp; ++c) {
      dot[c] += y * a[c];
      sq[c] += a[c] * (F(2) * g[c] + ma[c]);
    }
  }
}

// Column-wise softmax backward: dS = P * (dP - colsum(P * dP)) * scale, in place in dP
// (P, dP: [L][N]; sum: a scratch row of N).
template <typename F>
MPFAST_CLONES void softmax_grad_cols(int64_t L, int64_t N, const F* P, F* dP, F scale, F* sum) {
  std::fill(sum, sum + N, F(0));
  for (int64_t l = 0; l < L; ++l) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) sum[c] += P[l * N + c] * dP[l * N + c];
  }
  for (int64_t l = 0; l < L; ++l) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) dP[l * N + c] = P[l * N + c] * (dP[l * N + c] - sum[c]) * scale;
  }
}

template <typename F>
inline F clamped_norm(F sq) {
  return std::sqrt(std::max(sq, static_cast<F>(kEps * kEps)));
}

template <typename T>
void forward_impl(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& base_v,
                  const at::TensorBase& v, const at::TensorBase& gram, const at::TensorBase& proj,
                  const at::TensorBase& base_dot, const at::TensorBase& base_sq, double scale,
                  const at::TensorBase* mask, const at::TensorBase& out) {
  using F = acc_t<T>;
  const Problem<T, F> p(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, mask, false);
  const int64_t tiles = ceil_div(p.C, kClassTile);
  T* o = out.mutable_data_ptr<T>();
  const int64_t work = std::min(p.C, kClassTile) * (2 * p.L * p.d * p.H + p.LH * p.LH);
  at::parallel_for(0, p.B * tiles, grain_for(work), [&](int64_t begin, int64_t end) {
    Video<T, F> vid;
    Tile<F> t;
    int64_t loaded = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles;
      if (b != loaded) {
        vid.load(p, b);
        loaded = b;
      }
      t.c0 = (item % tiles) * kClassTile;
      t.cm = std::min(kClassTile, p.C - t.c0);
      t.cmp = round_up(t.cm, kNR<F>);
      tile_forward<T, F>(p, vid, b, t);
      for (int64_t c = 0; c < t.cm; ++c) o[b * p.C + t.c0 + c] = static_cast<T>(t.dot[c] / clamped_norm(t.sq[c]));
    }
  });
}

// Per-thread sums over the videos of the class-side gradients.
template <typename F>
struct ClassGrads {
  std::vector<F> q, r, sq;  // [H][C][dp], [H][C][dp], [C]
};

template <typename T>
void backward_impl(const at::TensorBase& grad, const at::TensorBase& q, const at::TensorBase& k,
                   const at::TensorBase& base_v, const at::TensorBase& v, const at::TensorBase& gram,
                   const at::TensorBase& proj, const at::TensorBase& base_dot, const at::TensorBase& base_sq,
                   double scale, const at::TensorBase* mask, const at::TensorBase& grad_q,
                   const at::TensorBase& grad_k, const at::TensorBase& grad_base_v, const at::TensorBase& grad_v,
                   const at::TensorBase& grad_gram, const at::TensorBase& grad_proj,
                   const at::TensorBase& grad_base_dot, const at::TensorBase& grad_base_sq) {
  using F = acc_t<T>;
  const Problem<T, F> p(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, mask, true);
  const int64_t B = p.B, C = p.C, L = p.L, H = p.H, d = p.d, LH = p.LH, dp = p.dp;
  const int64_t LHp = round_up(LH, kNR<F>);
  const T* gin = grad.const_data_ptr<T>();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  std::vector<ClassGrads<F>> partial(at::get_num_threads());
  const int64_t work = C * (6 * L * d * H + 2 * LH * LH);
  at::parallel_for(0, B, grain_for(work), [&](int64_t begin, int64_t end) {
    ClassGrads<F>& acc = partial[at::get_thread_num()];
    if (acc.sq.empty()) {  // this thread's first videos
      acc.q.assign(H * C * dp, F(0));
      acc.r.assign(H * C * dp, F(0));
      acc.sq.assign(C, F(0));
    }
    Video<T, F> vid;
    Tile<F> t;
    std::vector<F> dy, dm, dk, dv, at_rows, gdot, gsq;
    for (int64_t b = begin; b < end; ++b) {
      vid.load(p, b);
      dy.assign(LH, F(0));
      dm.assign(LH * LHp, F(0));
      dk.assign(H * L * dp, F(0));
      dv.assign(H * L * dp, F(0));
      for (int64_t c0 = 0; c0 < C; c0 += kClassTile) {
        t.c0 = c0;
        t.cm = std::min(kClassTile, C - c0);
        t.cmp = round_up(t.cm, kNR<F>);
        const int64_t cm = t.cm, cmp = t.cmp;
        tile_forward<T, F>(p, vid, b, t);
        // Per class: d/d dot and d/d sq (zero below the clamp); classes past the tile get 0.
        gdot.assign(cmp, F(0));
        gsq.assign(cmp, F(0));
        T* gbd = grad_base_dot.mutable_data_ptr<T>() + b * C + c0;
        for (int64_t c = 0; c < cm; ++c) {
          const F gr = static_cast<F>(gin[b * gs0 + (c0 + c) * gs1]);
          const F norm = clamped_norm(t.sq[c]);
          gdot[c] = gr / norm;
          gsq[c] = t.sq[c] > static_cast<F>(kEps * kEps) ? F(-0.5) * gr * t.dot[c] / (norm * norm * norm) : F(0);
          gbd[c] = static_cast<T>(gdot[c]);
          acc.sq[c0 + c] += gsq[c];
        }
        // dy += a gdot; da = gdot y + 2 gsq (g + M a) (into ma); dg = 2 gsq a (into g).
        for (int64_t j = 0; j < LH; ++j) {
          const F* a = t.a.data() + j * cmp;
          F* g = t.g.data() + j * cmp;
          F* ma = t.ma.data() + j * cmp;
          const F y = vid.y[j];
          F sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < cmp; ++c) {
            sum += gdot[c] * a[c];
            ma[c] = gdot[c] * y + F(2) * gsq[c] * (g[c] + ma[c]);
            g[c] = F(2) * gsq[c] * a[c];
          }
          dy[j] += sum;
        }
        // dM += sum_c gsq a a^T = (dg a^T) / 2: the halving is applied when M's gradient is written.
        at_rows.resize(cmp * LHp);
        for (int64_t c = 0; c < cmp; ++c) {
          for (int64_t j = 0; j < LH; ++j) at_rows[c * LHp + j] = t.a[j * cmp + c];
          for (int64_t j = LH; j < LHp; ++j) at_rows[c * LHp + j] = 0;
        }
        matmul<F>(LH, LHp, cmp, t.g.data(), cmp, 1, at_rows.data(), LHp, dm.data(), LHp, true);
        for (int64_t h = 0; h < H; ++h) {
          const F* a = t.a.data() + h * L * cmp;
          F* ds = t.ma.data() + h * L * cmp;  // da, then the score gradient in place
          const F* dg = t.g.data() + h * L * cmp;
          softmax_grad_cols<F>(L, cmp, a, ds, p.scale, t.inv.data());
          const F* qr = p.qr.data() + (h * C + c0) * dp;
          const F* rr = p.rr.data() + (h * C + c0) * dp;
          matmul<F>(cm, dp, L, ds, 1, cmp, vid.kr[h], vid.ldk[h], acc.q.data() + (h * C + c0) * dp, dp, true);
          matmul<F>(L, dp, cm, ds, cmp, 1, qr, dp, dk.data() + h * L * dp, dp, true);
          matmul<F>(cm, dp, L, dg, 1, cmp, vid.vr[h], vid.ldv[h], acc.r.data() + (h * C + c0) * dp, dp, true);
          matmul<F>(L, dp, cm, dg, cmp, 1, rr, dp, dv.data() + h * L * dp, dp, true);
        }
      }
      // This video's gradients (k and v back in their [L, H, d] layout).
      T* gk = grad_k.mutable_data_ptr<T>() + b * L * H * d;
      T* gv = grad_v.mutable_data_ptr<T>() + b * L * H * d;
      T* gy = grad_proj.mutable_data_ptr<T>() + b * LH;
      T* gm = grad_gram.mutable_data_ptr<T>() + b * LH * LH;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t j = 0; j < d; ++j) {
            gk[(l * H + h) * d + j] = static_cast<T>(dk[(h * L + l) * dp + j]);
            gv[(l * H + h) * d + j] = static_cast<T>(dv[(h * L + l) * dp + j]);
          }
        }
      }
      for (int64_t j = 0; j < LH; ++j) gy[j] = static_cast<T>(dy[j]);
      for (int64_t i = 0; i < LH; ++i) {
        for (int64_t j = 0; j < LH; ++j) gm[i * LH + j] = static_cast<T>(F(0.5) * dm[i * LHp + j]);
      }
    }
  });
  // The class-side sums, thread by thread in a fixed order.
  T* gq = grad_q.mutable_data_ptr<T>();
  T* gr = grad_base_v.mutable_data_ptr<T>();
  T* gs = grad_base_sq.mutable_data_ptr<T>();
  at::parallel_for(0, C, grain_for(2 * H * d * static_cast<int64_t>(partial.size())), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      F s = 0;
      for (const ClassGrads<F>& part : partial) s += part.sq.empty() ? F(0) : part.sq[c];
      gs[c] = static_cast<T>(s);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t j = 0; j < d; ++j) {
          F sum_q = 0, sum_r = 0;
          for (const ClassGrads<F>& part : partial) {
            if (part.q.empty()) continue;
            sum_q += part.q[(h * C + c) * dp + j];
            sum_r += part.r[(h * C + c) * dp + j];
          }
          gq[(c * H + h) * d + j] = static_cast<T>(sum_q);
          gr[(c * H + h) * d + j] = static_cast<T>(sum_r);
        }
      }
    }
  });
}

}  // namespace

void class_logits_fwd_cpu(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& base_v,
                          const at::TensorBase& v, const at::TensorBase& gram, const at::TensorBase& proj,
                          const at::TensorBase& base_dot, const at::TensorBase& base_sq, double scale,
                          const at::TensorBase* key_padding_mask, const at::TensorBase& cosine) {
  if (cosine.numel() == 0) return;
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "class_logits_fwd_cpu", [&] {
    forward_impl<scalar_t>(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask, cosine);
  });
}

void class_logits_bwd_cpu(const at::TensorBase& grad_cosine, const at::TensorBase& q, const at::TensorBase& k,
                          const at::TensorBase& base_v, const at::TensorBase& v, const at::TensorBase& gram,
                          const at::TensorBase& proj, const at::TensorBase& base_dot, const at::TensorBase& base_sq,
                          double scale, const at::TensorBase* key_padding_mask, const at::TensorBase& grad_q,
                          const at::TensorBase& grad_k, const at::TensorBase& grad_base_v,
                          const at::TensorBase& grad_v, const at::TensorBase& grad_gram,
                          const at::TensorBase& grad_proj, const at::TensorBase& grad_base_dot,
                          const at::TensorBase& grad_base_sq) {
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "class_logits_bwd_cpu", [&] {
    if (grad_cosine.numel() == 0) {  // no (video, class) pair: every gradient is 0
      for (const at::TensorBase* g : {&grad_q, &grad_k, &grad_base_v, &grad_v, &grad_gram, &grad_proj,
                                      &grad_base_dot, &grad_base_sq}) {
        scalar_t* ptr = g->mutable_data_ptr<scalar_t>();
        std::fill(ptr, ptr + g->numel(), scalar_t(0));
      }
      return;
    }
    backward_impl<scalar_t>(grad_cosine, q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask,
                            grad_q, grad_k, grad_base_v, grad_v, grad_gram, grad_proj, grad_base_dot, grad_base_sq);
  });
}

}  // namespace mpfast
