// class_logits on CUDA (formulas of class_cosine_ref / class_cosine_backward_ref): for
// video b and class c, a = softmax_l(scale * q[c,h] . k[b,l,h]) over the H L pairs
// j = h L + l, g[j] = base_v[c,h] . v[b,l,h], M = (gram[b] + gram[b]^T) / 2,
// cosine[b,c] = (base_dot[b,c] + a . proj[b]) / sqrt(max(base_sq[c] + a . (2 g + M a), eps^2)).
//
// Forward: one warp per (video, class) pair. The lanes split the head dimension for each
// (head, key) pair's two dot products (score and g; coalesced when the head dimension has
// stride 1) and reduce them with shuffles; a, g and the product with the Gram matrix live in
// the warp's slice of shared memory; one lane per head runs its softmax. The quadratic form
// needs only a^T gram a = a . (gram^T a), whose entries the lanes form reading rows of gram
// (coalesced): (gram^T a)[j] = sum_i gram[i, j] a[i].
// Backward: the same warp per pair recomputes its tile, with M a read the same way from a
// symmetrised copy of the Gram matrices ((gram + gram^T) / 2 per video, float32 or float64),
// and, for a chunk of videos, writes the attention weights a, the score gradients and g's
// gradient as float32 (float64) [videos, C, H L] workspaces (B C H L is D / (H L) times
// smaller than the unfused path's B C D, and a chunk is capped at kWorkspaceBytes); the sums
// over videos or classes that make the input gradients are then matrix products through
// cuBLAS (ATen). (The first version had each lane form a whole dot product, and read gram's
// columns, from global memory: 32 cache lines per load instruction, 15.8 ms for the head's
// forward at B = 256, C = 400 where Triton took 2.3.)
// This is the fallback of the Triton kernels (kernels/class_logits.py), which need no
// workspace; it takes H L up to what one warp's scratch in shared memory holds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <limits>

#include "cuda_utils.cuh"

namespace mpfast {
namespace {

using cuda::acc_t;
using cuda::dot;
using cuda::global_warp;
using cuda::kWarp;
using cuda::Mask;
using cuda::mask_of;
using cuda::num_warps;
using cuda::Rows;
using cuda::rows_of;

constexpr int64_t kScratchBytes = 48 * 1024;         // dynamic shared memory per block, no opt-in needed
constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;  // backward workspaces of one chunk of videos
constexpr double kEps = 1e-12;

template <typename T>
struct Inputs {
  Rows<T> q, r, k, v;  // q, base_v: [C, H, d] (sb = 0); k, v: [B, L, H, d]
  const T* gram;
  int64_t smb, sm1, sm2;
  const T* proj;
  int64_t syb, sy1, sy2;
  const T* base_dot;
  int64_t sn0b, sn0c;
  const T* base_sq;
  int64_t ss;
  Mask mask;
  int64_t B, C, L, H, d;
  acc_t<T> scale;
};

template <typename T>
Inputs<T> inputs_of(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& base_v,
                    const at::TensorBase& v, const at::TensorBase& gram, const at::TensorBase& proj,
                    const at::TensorBase& base_dot, const at::TensorBase& base_sq, double scale,
                    const at::TensorBase* mask) {
  return {rows_of<T>(q), rows_of<T>(base_v), rows_of<T>(k), rows_of<T>(v),
          gram.const_data_ptr<T>(), gram.stride(0), gram.stride(1), gram.stride(2),
          proj.const_data_ptr<T>(), proj.stride(0), proj.stride(1), proj.stride(2),
          base_dot.const_data_ptr<T>(), base_dot.stride(0), base_dot.stride(1),
          base_sq.const_data_ptr<T>(), base_sq.stride(0),
          mask_of(mask), k.size(0), q.size(0), k.size(1), k.size(2), k.size(3), static_cast<acc_t<T>>(scale)};
}

// One (video, class) pair by one warp: a and g into the warp's scratch, and ma[j] =
// sum_i gram[i, j] a[i] from `gram` (rows i at gram + i * s1, element j at j * s2; read by
// rows, so that consecutive lanes read consecutive elements); returns <w, t'> and
// |t'|^2 = base_sq + a . (2 g + ma) in every lane (a^T gram a = a^T M a: the forward passes
// gram itself, the backward its symmetrised copy, for which ma = M a).
template <typename T, typename G>
__device__ void pair_tile(const Inputs<T>& in, const G* gram, int64_t s1, int64_t s2, int64_t b, int64_t c,
                          acc_t<T>* a, acc_t<T>* g, acc_t<T>* ma, acc_t<T>& dot_out, acc_t<T>& sq_out) {
  using A = acc_t<T>;
  constexpr A kInf = std::numeric_limits<A>::infinity();
  const int lane = threadIdx.x % kWarp;
  const int64_t L = in.L, LH = in.L * in.H;
  for (int64_t h = 0; h < in.H; ++h) {  // uniform in the warp: the lanes split the head dimension
    const T* qh = in.q.row(0, c, h);
    const T* rh = in.r.row(0, c, h);
    for (int64_t l = 0; l < L; ++l) {
      const bool padded = in.mask.padded(b, l);
      A score = 0, value = 0;
      if (!padded) {
        const T* kr = in.k.row(b, l, h);
        const T* vr = in.v.row(b, l, h);
        for (int64_t f = lane; f < in.d; f += kWarp) {
          score += static_cast<A>(qh[f * in.q.sd]) * static_cast<A>(kr[f * in.k.sd]);
          value += static_cast<A>(rh[f * in.r.sd]) * static_cast<A>(vr[f * in.v.sd]);
        }
        score = cuda::warp_sum(score);
        value = cuda::warp_sum(value);
      }
      if (lane == 0) {
        a[h * L + l] = padded ? -kInf : in.scale * score;
        g[h * L + l] = value;  // 0 for a padded key, whose weight is 0
      }
    }
  }
  __syncwarp();
  for (int64_t h = lane; h < in.H; h += kWarp) {  // one lane per head: its softmax over L keys
    A* s = a + h * L;
    A top = -kInf;
    for (int64_t l = 0; l < L; ++l) top = max(top, s[l]);
    if (top == -kInf) {  // every key of the video padded: no attention
      for (int64_t l = 0; l < L; ++l) s[l] = 0;
      continue;
    }
    A total = 0;
    for (int64_t l = 0; l < L; ++l) {
      s[l] = exp(s[l] - top);
      total += s[l];
    }
    for (int64_t l = 0; l < L; ++l) s[l] /= total;
  }
  __syncwarp();
  const T* y = in.proj + b * in.syb;
  A dot_sum = 0, sq_sum = 0;
  for (int64_t j = lane; j < LH; j += kWarp) {
    A acc = 0;
    for (int64_t i = 0; i < LH; ++i) acc += static_cast<A>(gram[i * s1 + j * s2]) * a[i];
    ma[j] = acc;
    dot_sum += a[j] * static_cast<A>(y[(j / L) * in.sy1 + (j % L) * in.sy2]);
    sq_sum += a[j] * (A(2) * g[j] + acc);
  }
  dot_out = cuda::warp_sum(dot_sum) + static_cast<A>(in.base_dot[b * in.sn0b + c * in.sn0c]);
  sq_out = cuda::warp_sum(sq_sum) + static_cast<A>(in.base_sq[c * in.ss]);
  __syncwarp();
}

template <typename A>
__device__ __forceinline__ A clamped_norm(A sq) {
  return sqrt(max(sq, static_cast<A>(kEps * kEps)));
}

template <typename T>
__global__ void class_logits_fwd_kernel(Inputs<T> in, T* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ unsigned char scratch_bytes[];
  const int64_t LH = in.L * in.H;
  A* scratch = reinterpret_cast<A*>(scratch_bytes) + (threadIdx.x / kWarp) * 3 * LH;
  for (int64_t pair = global_warp(); pair < in.B * in.C; pair += num_warps()) {
    const int64_t b = pair / in.C, c = pair % in.C;
    A dot_value, sq;
    pair_tile<T>(in, in.gram + b * in.smb, in.sm1, in.sm2, b, c, scratch, scratch + LH, scratch + 2 * LH, dot_value,
                 sq);
    if (threadIdx.x % kWarp == 0) out[pair] = static_cast<T>(dot_value / clamped_norm(sq));
  }
}

// Videos [b0, b0 + Bc): per pair, grad_base_dot and the workspaces a, dS (score gradient,
// scale included), dG (g's gradient) [Bc, C, H L] and grad_dot, grad_sq [Bc, C]; sym holds
// (gram + gram^T) / 2 of the chunk's videos ([Bc, H L, H L], contiguous).
template <typename T>
__global__ void class_logits_bwd_pairs_kernel(Inputs<T> in, const acc_t<T>* __restrict__ sym,
                                              const T* __restrict__ grad, int64_t sgb, int64_t sgc,
                                              int64_t b0, int64_t Bc, T* __restrict__ grad_base_dot,
                                              acc_t<T>* __restrict__ ws_a, acc_t<T>* __restrict__ ws_ds,
                                              acc_t<T>* __restrict__ ws_dg, acc_t<T>* __restrict__ ws_gdot,
                                              acc_t<T>* __restrict__ ws_gsq) {
  using A = acc_t<T>;
  extern __shared__ unsigned char scratch_bytes[];
  const int lane = threadIdx.x % kWarp;
  const int64_t L = in.L, LH = in.L * in.H;
  A* a = reinterpret_cast<A*>(scratch_bytes) + (threadIdx.x / kWarp) * 3 * LH;
  A* g = a + LH;
  A* ma = a + 2 * LH;
  for (int64_t pair = global_warp(); pair < Bc * in.C; pair += num_warps()) {
    const int64_t bb = pair / in.C, c = pair % in.C, b = b0 + bb;
    A dot_value, sq;
    pair_tile<T>(in, sym + bb * LH * LH, LH, 1, b, c, a, g, ma, dot_value, sq);
    const A gr = static_cast<A>(grad[b * sgb + c * sgc]);
    const A norm = clamped_norm(sq);
    const A grad_dot = gr / norm;
    const A grad_sq = sq > static_cast<A>(kEps * kEps) ? A(-0.5) * gr * dot_value / (norm * norm * norm) : A(0);
    const T* y = in.proj + b * in.syb;
    A* out_a = ws_a + pair * LH;
    A* out_dg = ws_dg + pair * LH;
    for (int64_t j = lane; j < LH; j += kWarp) {
      ma[j] = grad_dot * static_cast<A>(y[(j / L) * in.sy1 + (j % L) * in.sy2]) + A(2) * grad_sq * (g[j] + ma[j]);
      out_a[j] = a[j];
      out_dg[j] = A(2) * grad_sq * a[j];
    }
    __syncwarp();
    A* out_ds = ws_ds + pair * LH;
    for (int64_t h = lane; h < in.H; h += kWarp) {  // softmax backward, one lane per head
      const A* p = a + h * L;
      const A* dp = ma + h * L;
      A inner = 0;
      for (int64_t l = 0; l < L; ++l) inner += p[l] * dp[l];
      for (int64_t l = 0; l < L; ++l) out_ds[h * L + l] = p[l] * (dp[l] - inner) * in.scale;
    }
    if (lane == 0) {
      grad_base_dot[b * in.C + c] = static_cast<T>(grad_dot);
      ws_gdot[pair] = grad_dot;
      ws_gsq[pair] = grad_sq;
    }
    __syncwarp();
  }
}

// Warps per block whose scratch (3 H L accumulators each) fits kScratchBytes.
template <typename A>
int warps_per_block(int64_t LH, const char* op) {
  const int64_t per_warp = 3 * LH * static_cast<int64_t>(sizeof(A));
  TORCH_CHECK_VALUE(per_warp <= kScratchBytes, op, ": the CUDA kernels take L*H up to ",
                    kScratchBytes / (3 * sizeof(A)), " (keys times heads), got ", LH);
  return static_cast<int>(std::min<int64_t>(cuda::kThreads / kWarp, kScratchBytes / per_warp));
}

}  // namespace

void class_logits_fwd_cuda(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& base_v,
                           const at::TensorBase& v, const at::TensorBase& gram, const at::TensorBase& proj,
                           const at::TensorBase& base_dot, const at::TensorBase& base_sq, double scale,
                           const at::TensorBase* key_padding_mask, const at::TensorBase& cosine) {
  if (cosine.numel() == 0) return;
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "class_logits_fwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    const auto in = inputs_of<scalar_t>(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask);
    const int64_t LH = in.L * in.H;
    const int warps = warps_per_block<A>(LH, "mpfast_cuda.class_logits_fwd");
    const size_t shared = static_cast<size_t>(warps) * 3 * LH * sizeof(A);
    class_logits_fwd_kernel<scalar_t><<<cuda::blocks_for_warps(in.B * in.C, warps * kWarp), warps * kWarp, shared,
                                        cuda::stream()>>>(in, cosine.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void class_logits_bwd_cuda(const at::TensorBase& grad_cosine, const at::TensorBase& q, const at::TensorBase& k,
                           const at::TensorBase& base_v, const at::TensorBase& v, const at::TensorBase& gram,
                           const at::TensorBase& proj, const at::TensorBase& base_dot, const at::TensorBase& base_sq,
                           double scale, const at::TensorBase* key_padding_mask, const at::TensorBase& grad_q,
                           const at::TensorBase& grad_k, const at::TensorBase& grad_base_v,
                           const at::TensorBase& grad_v, const at::TensorBase& grad_gram,
                           const at::TensorBase& grad_proj, const at::TensorBase& grad_base_dot,
                           const at::TensorBase& grad_base_sq) {
  if (grad_cosine.numel() == 0) {  // no (video, class) pair: every gradient is 0
    for (const at::TensorBase* g : {&grad_q, &grad_k, &grad_base_v, &grad_v, &grad_gram, &grad_proj, &grad_base_dot,
                                    &grad_base_sq}) {
      at::Tensor(*g).zero_();
    }
    return;
  }
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "class_logits_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    const auto acc_type = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
    const auto in = inputs_of<scalar_t>(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask);
    const int64_t B = in.B, C = in.C, L = in.L, H = in.H, LH = L * H;
    const at::Tensor qa = at::Tensor(q).to(acc_type), ra = at::Tensor(base_v).to(acc_type);
    const at::Tensor ka = at::Tensor(k), va = at::Tensor(v);
    at::Tensor dq = at::zeros({C, H, in.d}, qa.options()), dr = at::zeros_like(dq), ds = at::zeros({C}, qa.options());
    {
      const int warps = warps_per_block<A>(LH, "mpfast_cuda.class_logits_bwd");
      const size_t shared = static_cast<size_t>(warps) * 3 * LH * sizeof(A);
      const int64_t per_video = ((3 * LH + 2) * C + LH * LH) * static_cast<int64_t>(sizeof(A));
      const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, kWorkspaceBytes / per_video));
      const auto options = qa.options();
      at::Tensor ws_a = at::empty({chunk, C, H, L}, options), ws_ds = at::empty_like(ws_a);
      at::Tensor ws_dg = at::empty_like(ws_a), ws_gdot = at::empty({chunk, C}, options);
      at::Tensor ws_gsq = at::empty_like(ws_gdot);
      const at::Tensor ga = at::Tensor(gram);
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t bc = std::min(chunk, B - b0);
        const at::Tensor gc = ga.narrow(0, b0, bc).to(acc_type);
        const at::Tensor sym = gc.add(gc.transpose(1, 2)).mul_(0.5).contiguous();
        class_logits_bwd_pairs_kernel<scalar_t>
            <<<cuda::blocks_for_warps(bc * C, warps * kWarp), warps * kWarp, shared, cuda::stream()>>>(
                in, sym.const_data_ptr<A>(), grad_cosine.const_data_ptr<scalar_t>(), grad_cosine.stride(0), grad_cosine.stride(1), b0, bc,
                grad_base_dot.mutable_data_ptr<scalar_t>(), ws_a.mutable_data_ptr<A>(), ws_ds.mutable_data_ptr<A>(),
                ws_dg.mutable_data_ptr<A>(), ws_gdot.mutable_data_ptr<A>(), ws_gsq.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const at::Tensor a = ws_a.narrow(0, 0, bc), dS = ws_ds.narrow(0, 0, bc), dG = ws_dg.narrow(0, 0, bc);
        const at::Tensor gdot = ws_gdot.narrow(0, 0, bc), gsq = ws_gsq.narrow(0, 0, bc);
        const at::Tensor kc = ka.narrow(0, b0, bc).to(acc_type), vc = va.narrow(0, b0, bc).to(acc_type);
        dq.add_(at::einsum("bchl,blhd->chd", {dS, kc}));
        dr.add_(at::einsum("bchl,blhd->chd", {dG, vc}));
        ds.add_(gsq.sum(0));
        at::Tensor(grad_k).narrow(0, b0, bc).copy_(at::einsum("bchl,chd->blhd", {dS, qa}));
        at::Tensor(grad_v).narrow(0, b0, bc).copy_(at::einsum("bchl,chd->blhd", {dG, ra}));
        at::Tensor(grad_proj).narrow(0, b0, bc).copy_(at::einsum("bc,bchl->bhl", {gdot, a}));
        const at::Tensor flat = a.reshape({bc, C, LH});
        at::Tensor(grad_gram).narrow(0, b0, bc).copy_(at::bmm(flat.mul(gsq.unsqueeze(-1)).transpose(1, 2), flat));
      }
    }
    at::Tensor(grad_q).copy_(dq);
    at::Tensor(grad_base_v).copy_(dr);
    at::Tensor(grad_base_sq).copy_(ds);
  });
}

}  // namespace mpfast
