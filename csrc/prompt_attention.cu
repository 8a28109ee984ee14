// prompt_attention on CUDA (formulas of prompt_attention_ref / _backward_ref).
//
// Tiles, staged in shared memory. A block of 8 warps owns 32 rows of one (video, head):
// query rows (c) for the forward and grad_q, key rows (l) for grad_k / grad_v; each warp
// holds 4 of them. The block walks the other side 32 columns at a time (keys, or queries
// for grad_k / grad_v), copying the tiles it needs into shared memory (coalesced: the
// threads read consecutive features of a row), converted to the accumulator type, with an
// odd row stride so that a lane reading its own column's row hits its own bank. Then lane j
// forms the dot products of column j with the warp's 4 rows from shared memory, the
// softmax is updated online (warp reductions), and the rows accumulate sum_j w_j col_j with
// the lanes splitting the features and w_j broadcast by shuffle. Every column row is read
// from global memory once per block instead of once per query (the earlier versions read
// each key row once per (query, key) pair: 32 cache lines per load instruction when a lane
// formed a whole dot product from global memory, about 80 SM cycles per pair).
//
// Features are staged kD at a time (64, 32 for float64); a wider head loops over chunks,
// and the output is produced kD features at a time (the scores recomputed per chunk).
// Padded keys get score -inf; a query with every key padded gets 0 and no gradient.
// Backward: attention_bwd_q_kernel forms each query row's log-sum-exp and
// D = sum_l p_l (dO . v_l) in a first pass over the keys, then grad_q in a second one (for
// queries shared by the batch, per video into a float32 (float64) workspace that ATen sums
// over the videos); attention_bwd_kv_kernel forms grad_k and grad_v of 32 keys per block
// from the stored statistics. No atomics; float16/bfloat16 accumulate in float32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>

#include "cuda_utils.cuh"

namespace mpfast {
namespace {

using cuda::acc_t;
using cuda::kFullMask;
using cuda::kThreads;
using cuda::kWarp;
using cuda::Mask;
using cuda::mask_of;
using cuda::Rows;
using cuda::rows_of;
using cuda::warp_max;
using cuda::warp_sum;

constexpr int kTile = kWarp;                            // rows per block; columns per step (one per lane)
constexpr int kRows = kTile / (kThreads / kWarp);       // rows per warp
static_assert(kRows * (kThreads / kWarp) == kTile, "the warps of a block split its rows evenly");
constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;  // per-video grad_q of shared queries, one chunk

// Features per staged chunk, the padded row stride of a tile, output features per lane.
template <typename A>
struct Chunk {
  static constexpr int kD = sizeof(A) == 8 ? 32 : 64;  // four tiles: 33 KiB of shared memory either way
  static constexpr int kStride = kD + 1;
  static constexpr int kPerLane = kD / kWarp;
};

template <typename A>
using Tile = A[kTile][Chunk<A>::kStride];

template <typename A>
using RowAcc = A[kRows][Chunk<A>::kPerLane];

// Copies features [f0, f0 + kD) of 32 rows into `tile`, converted to A; zeros past d and for
// rows whose pointer is null. Consecutive threads read consecutive features of a row.
template <typename T, typename A, typename RowOf>
__device__ __forceinline__ void stage(Tile<A>& tile, RowOf row_of, int64_t sd, int64_t f0, int64_t d) {
  constexpr int kD = Chunk<A>::kD;
  for (int e = threadIdx.x; e < kTile * kD; e += blockDim.x) {
    const int r = e / kD, f = e % kD;
    const T* p = row_of(r);
    tile[r][f] = p != nullptr && f0 + f < d ? static_cast<A>(p[(f0 + f) * sd]) : A(0);
  }
}

// s[r] += rows[row0 + r] . cols[lane] over the staged chunk: lane j takes column j.
template <typename A>
__device__ __forceinline__ void tile_dot(A (&s)[kRows], const Tile<A>& rows, const Tile<A>& cols, int row0,
                                         int lane) {
#pragma unroll 8
  for (int f = 0; f < Chunk<A>::kD; ++f) {
    const A c = cols[lane][f];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] += rows[row0 + r][f] * c;
  }
}

// acc[r][i] += sum_j w_j[r] cols[j][lane + 32 i]: lane j's weights broadcast in turn.
template <typename A>
__device__ __forceinline__ void tile_accumulate(RowAcc<A>& acc, const A (&w)[kRows], const Tile<A>& cols,
                                                int lane) {
  for (int j = 0; j < kTile; ++j) {
    A wj[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) wj[r] = __shfl_sync(kFullMask, w[r], j);
#pragma unroll
    for (int i = 0; i < Chunk<A>::kPerLane; ++i) {
      const A c = cols[j][lane + i * kWarp];
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r][i] += wj[r] * c;
    }
  }
}

// Writes features [j0, j0 + kD) of the warp's rows r < kRows, those with first + r < count:
// acc[r] (times scale[r] when scale is given) into row `row0 + r * row_step` of `out` (rows of d elements).
template <typename A, typename OutT>
__device__ __forceinline__ void store_rows(OutT* out, const RowAcc<A>& acc, const A* scale, int64_t row0,
                                           int64_t row_step, int64_t first, int64_t count, int64_t j0, int64_t d,
                                           int lane) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (first + r >= count) continue;
    OutT* o = out + (row0 + r * row_step) * d;
    const A factor = scale == nullptr ? A(1) : scale[r];
#pragma unroll
    for (int i = 0; i < Chunk<A>::kPerLane; ++i) {
      const int64_t j = j0 + lane + i * kWarp;
      if (j < d) o[j] = static_cast<OutT>(acc[r][i] * factor);
    }
  }
}

// Tiles of a launch: `per_head` tiles of 32 rows for each (video, head), tile index
// fastest, then head, then video.
struct TileOf {
  int64_t b, h, first;
  __device__ __forceinline__ TileOf(int64_t tile, int64_t per_head, int64_t H)
      : b(tile / (per_head * H)), h(tile / per_head % H), first(tile % per_head * kTile) {}
};

inline unsigned blocks_for_tiles(int64_t tiles) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(tiles, cuda::kMaxBlocks)));
}

__host__ __device__ __forceinline__ int64_t tiles_of(int64_t n) { return (n + kTile - 1) / kTile; }

template <typename T>
__global__ void
    attention_fwd_kernel(Rows<T> q, Rows<T> k, Rows<T> v, Mask mask, acc_t<T> scale, T* __restrict__ out, int64_t B,
                         int64_t C, int64_t L, int64_t H, int64_t d) {
  using A = acc_t<T>;
  constexpr int kD = Chunk<A>::kD;
  __shared__ Tile<A> qs, ks, vs;
  const int lane = threadIdx.x % kWarp, row0 = threadIdx.x / kWarp * kRows;
  const int64_t per_head = tiles_of(C);
  for (int64_t tile = blockIdx.x; tile < B * H * per_head; tile += gridDim.x) {  // uniform in the block
    const TileOf t(tile, per_head, H);
    const int64_t b = t.b, h = t.h, c0 = t.first;
    const bool active = c0 + row0 < C;  // the warp has a query row (uniform in the warp)
    for (int64_t j0 = 0; j0 < d; j0 += kD) {
      A mx[kRows], sum[kRows];
      RowAcc<A> o{};
#pragma unroll
      for (int r = 0; r < kRows; ++r) mx[r] = -INFINITY, sum[r] = 0;
      for (int64_t l0 = 0; l0 < L; l0 += kTile) {
        A s[kRows] = {};
        for (int64_t f0 = 0; f0 < d; f0 += kD) {
          __syncthreads();  // every warp is done with the tiles
          stage<T>(qs, [&](int r) { return c0 + r < C ? q.row(b, c0 + r, h) : nullptr; }, q.sd, f0, d);
          stage<T>(ks, [&](int r) { return l0 + r < L ? k.row(b, l0 + r, h) : nullptr; }, k.sd, f0, d);
          if (f0 == j0) stage<T>(vs, [&](int r) { return l0 + r < L ? v.row(b, l0 + r, h) : nullptr; }, v.sd, j0, d);
          __syncthreads();
          if (active) tile_dot(s, qs, ks, row0, lane);
        }
        if (!active) continue;
        const int64_t l = l0 + lane;
        const bool attend = l < L && !mask.padded(b, l);
        A p[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const A sr = attend ? s[r] * scale : -INFINITY;
          const A m_new = max(mx[r], warp_max(sr));
          p[r] = 0;
          if (m_new == -INFINITY) continue;  // every key of the row so far padded (uniform in the warp)
          p[r] = exp(sr - m_new);
          const A corr = exp(mx[r] - m_new);
          sum[r] = sum[r] * corr + warp_sum(p[r]);
#pragma unroll
          for (int i = 0; i < Chunk<A>::kPerLane; ++i) o[r][i] *= corr;
          mx[r] = m_new;
        }
        tile_accumulate(o, p, vs, lane);
      }
      if (!active) continue;
      A inv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) inv[r] = sum[r] > 0 ? A(1) / sum[r] : A(0);
      store_rows(out, o, static_cast<const A*>(inv), (b * C + c0 + row0) * H + h, H, c0 + row0, C, j0, d, lane);
    }
  }
}

// Query rows (b, c, h) of videos [b0, b0 + nb): their log-sum-exp (+inf when every key is
// padded) and delta = sum_l p_l (dO . v_l) into lse / delta, and grad_q into dq (rows
// ((b - b0) C + c) H + h of d elements: grad_q itself, or a per-video workspace of OutT =
// the accumulator type when the queries are shared by the batch).
template <typename T, typename OutT>
__global__ void
    attention_bwd_q_kernel(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> go, Mask mask, acc_t<T> scale,
                           acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ delta, OutT* __restrict__ dq,
                           int64_t b0, int64_t nb, int64_t C, int64_t L, int64_t H, int64_t d) {
  using A = acc_t<T>;
  constexpr int kD = Chunk<A>::kD;
  __shared__ Tile<A> qs, gs, ks, vs;
  const int lane = threadIdx.x % kWarp, row0 = threadIdx.x / kWarp * kRows;
  const int64_t per_head = tiles_of(C);
  for (int64_t tile = blockIdx.x; tile < nb * H * per_head; tile += gridDim.x) {  // uniform in the block
    const TileOf t(tile, per_head, H);
    const int64_t b = b0 + t.b, h = t.h, c0 = t.first;
    const bool active = c0 + row0 < C;
    // Scores s = q . k and dp = dO . v of the warp's rows against keys [l0, l0 + 32), lane j
    // taking key l0 + j; for j0 >= 0 the keys' features [j0, j0 + kD) are left in ks.
    auto scores = [&](int64_t l0, int64_t j0, A (&s)[kRows], A (&dp)[kRows]) {
      for (int64_t f0 = 0; f0 < d; f0 += kD) {
        __syncthreads();
        stage<T>(qs, [&](int r) { return c0 + r < C ? q.row(b, c0 + r, h) : nullptr; }, q.sd, f0, d);
        stage<T>(gs, [&](int r) { return c0 + r < C ? go.row(b, c0 + r, h) : nullptr; }, go.sd, f0, d);
        stage<T>(ks, [&](int r) { return l0 + r < L ? k.row(b, l0 + r, h) : nullptr; }, k.sd, f0, d);
        stage<T>(vs, [&](int r) { return l0 + r < L ? v.row(b, l0 + r, h) : nullptr; }, v.sd, f0, d);
        __syncthreads();
        if (active) {
          tile_dot(s, qs, ks, row0, lane);
          tile_dot(dp, gs, vs, row0, lane);
        }
      }
      if (j0 >= 0 && d > kD) {  // uniform in the block: the last chunk staged was not [j0, j0 + kD)
        __syncthreads();
        stage<T>(ks, [&](int r) { return l0 + r < L ? k.row(b, l0 + r, h) : nullptr; }, k.sd, j0, d);
        __syncthreads();
      }
    };

    // Pass 1: the row statistics, online over the key tiles.
    A mx[kRows], sum[kRows], w[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) mx[r] = -INFINITY, sum[r] = 0, w[r] = 0;
    for (int64_t l0 = 0; l0 < L; l0 += kTile) {
      A s[kRows] = {}, dp[kRows] = {};
      scores(l0, -1, s, dp);
      if (!active) continue;
      const int64_t l = l0 + lane;
      const bool attend = l < L && !mask.padded(b, l);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const A sr = attend ? s[r] * scale : -INFINITY;
        const A m_new = max(mx[r], warp_max(sr));
        if (m_new == -INFINITY) continue;
        const A p = exp(sr - m_new);
        const A corr = exp(mx[r] - m_new);
        sum[r] = sum[r] * corr + warp_sum(p);
        w[r] = w[r] * corr + warp_sum(p * dp[r]);
        mx[r] = m_new;
      }
    }
    A row_lse[kRows], row_delta[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_lse[r] = sum[r] > 0 ? mx[r] + log(sum[r]) : A(INFINITY);
      row_delta[r] = sum[r] > 0 ? w[r] / sum[r] : A(0);
      const int64_t c = c0 + row0 + r;
      if (active && lane == 0 && c < C) {
        lse[(b * C + c) * H + h] = row_lse[r];
        delta[(b * C + c) * H + h] = row_delta[r];
      }
    }

    // Pass 2: grad_q = scale * sum_l p_l (dp_l - delta) k_l, kD features at a time.
    for (int64_t j0 = 0; j0 < d; j0 += kD) {
      RowAcc<A> acc{};
      for (int64_t l0 = 0; l0 < L; l0 += kTile) {
        A s[kRows] = {}, dp[kRows] = {};
        scores(l0, j0, s, dp);
        if (!active) continue;
        const int64_t l = l0 + lane;
        const bool attend = l < L && !mask.padded(b, l);
        A ds[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {  // exp(s - lse) is 0 for a row without keys (lse = +inf)
          ds[r] = attend ? exp(s[r] * scale - row_lse[r]) * (dp[r] - row_delta[r]) * scale : A(0);
        }
        tile_accumulate(acc, ds, ks, lane);
      }
      if (!active) continue;
      store_rows(dq, acc, static_cast<const A*>(nullptr), ((b - b0) * C + c0 + row0) * H + h, H, c0 + row0, C, j0, d, lane);
    }
  }
}

// grad_k and grad_v of key rows (b, l, h): 32 keys per block, the queries 32 at a time
// (lane j taking query c0 + j), from the statistics of attention_bwd_q_kernel.
template <typename T>
__global__ void
    attention_bwd_kv_kernel(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> go, Mask mask, acc_t<T> scale,
                            const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ delta,
                            T* __restrict__ grad_k, T* __restrict__ grad_v, int64_t B, int64_t C, int64_t L,
                            int64_t H, int64_t d) {
  using A = acc_t<T>;
  constexpr int kD = Chunk<A>::kD;
  __shared__ Tile<A> ks, vs, qs, gs;
  const int lane = threadIdx.x % kWarp, row0 = threadIdx.x / kWarp * kRows;
  const int64_t per_head = tiles_of(L);
  for (int64_t tile = blockIdx.x; tile < B * H * per_head; tile += gridDim.x) {  // uniform in the block
    const TileOf t(tile, per_head, H);
    const int64_t b = t.b, h = t.h, l0 = t.first;
    const bool active = l0 + row0 < L;
    bool padded[kRows];  // a padded key (or one past L) gets no gradient
#pragma unroll
    for (int r = 0; r < kRows; ++r) padded[r] = l0 + row0 + r >= L || mask.padded(b, l0 + row0 + r);
    for (int64_t j0 = 0; j0 < d; j0 += kD) {
      RowAcc<A> gk{}, gv{};
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        A s[kRows] = {}, dp[kRows] = {};
        for (int64_t f0 = 0; f0 < d; f0 += kD) {
          __syncthreads();
          stage<T>(ks, [&](int r) { return l0 + r < L ? k.row(b, l0 + r, h) : nullptr; }, k.sd, f0, d);
          stage<T>(vs, [&](int r) { return l0 + r < L ? v.row(b, l0 + r, h) : nullptr; }, v.sd, f0, d);
          stage<T>(qs, [&](int r) { return c0 + r < C ? q.row(b, c0 + r, h) : nullptr; }, q.sd, f0, d);
          stage<T>(gs, [&](int r) { return c0 + r < C ? go.row(b, c0 + r, h) : nullptr; }, go.sd, f0, d);
          __syncthreads();
          if (active) {
            tile_dot(s, ks, qs, row0, lane);
            tile_dot(dp, vs, gs, row0, lane);
          }
        }
        if (d > kD) {  // uniform in the block: stage the queries' features [j0, j0 + kD)
          __syncthreads();
          stage<T>(qs, [&](int r) { return c0 + r < C ? q.row(b, c0 + r, h) : nullptr; }, q.sd, j0, d);
          stage<T>(gs, [&](int r) { return c0 + r < C ? go.row(b, c0 + r, h) : nullptr; }, go.sd, j0, d);
          __syncthreads();
        }
        if (!active) continue;
        const int64_t c = c0 + lane;
        const A row_lse = c < C ? lse[(b * C + c) * H + h] : A(INFINITY);  // p = 0 past C
        const A row_delta = c < C ? delta[(b * C + c) * H + h] : A(0);
        A p[kRows], ds[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          p[r] = padded[r] ? A(0) : exp(s[r] * scale - row_lse);  // 0 for a query without keys (lse = +inf)
          ds[r] = p[r] * (dp[r] - row_delta) * scale;
        }
        tile_accumulate(gk, ds, qs, lane);
        tile_accumulate(gv, p, gs, lane);
      }
      if (!active) continue;
      const int64_t first_row = (b * L + l0 + row0) * H + h;
      store_rows(grad_k, gk, static_cast<const A*>(nullptr), first_row, H, l0 + row0, L, j0, d, lane);
      store_rows(grad_v, gv, static_cast<const A*>(nullptr), first_row, H, l0 + row0, L, j0, d, lane);
    }
  }
}

}  // namespace

void prompt_attention_fwd_cuda(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& v,
                               double scale, const at::TensorBase* key_padding_mask, const at::TensorBase& out) {
  if (out.numel() == 0) return;
  const int64_t B = k.size(0), L = k.size(1), H = k.size(2), d = k.size(3), C = q.size(q.dim() - 3);
  MPFAST_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_fwd_cuda", [&] {
    attention_fwd_kernel<scalar_t><<<blocks_for_tiles(B * H * tiles_of(C)), kThreads, 0, cuda::stream()>>>(
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
  if (B * C * H == 0) {  // no query: nothing depends on the inputs
    for (const at::TensorBase* g : {&grad_q, &grad_k, &grad_v}) at::Tensor(*g).zero_();
    return;
  }
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
    if (!shared) {
      attention_bwd_q_kernel<scalar_t, scalar_t><<<blocks_for_tiles(B * H * tiles_of(C)), kThreads, 0,
                                                   cuda::stream()>>>(
          qr, kr, vr, gr, mask, sc, lse.mutable_data_ptr<A>(), delta.mutable_data_ptr<A>(),
          grad_q.mutable_data_ptr<scalar_t>(), 0, B, C, L, H, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {  // per-video grad_q of a chunk of videos, summed over the videos by ATen (deterministic)
      const int64_t per_video = C * H * d * static_cast<int64_t>(sizeof(A));
      const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, kWorkspaceBytes / per_video));
      const at::Tensor work = at::empty({chunk, C, H, d}, q.options().dtype(acc_type));
      at::Tensor total = at::zeros({C, H, d}, q.options().dtype(acc_type));
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t nb = std::min(chunk, B - b0);
        attention_bwd_q_kernel<scalar_t, A><<<blocks_for_tiles(nb * H * tiles_of(C)), kThreads, 0, cuda::stream()>>>(
            qr, kr, vr, gr, mask, sc, lse.mutable_data_ptr<A>(), delta.mutable_data_ptr<A>(),
            work.mutable_data_ptr<A>(), b0, nb, C, L, H, d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        total.add_(work.narrow(0, 0, nb).sum(0));
      }
      at::Tensor(grad_q).copy_(total);
    }
    attention_bwd_kv_kernel<scalar_t><<<blocks_for_tiles(B * H * tiles_of(L)), kThreads, 0, cuda::stream()>>>(
        qr, kr, vr, gr, mask, sc, lse.const_data_ptr<A>(), delta.const_data_ptr<A>(),
        grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(), B, C, L, H, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mpfast
