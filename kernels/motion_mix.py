"""Triton kernels of ``motion_mix``: gated two-stream sum, temporal mean, L2 norm, motion mean.

Design: one program per video ``b`` (the L2 norm needs the whole width ``D``). The
width is tiled in blocks of ``BLOCK_D`` (up to 1024: the model's widths in one block);
all ``S`` streams of a block are one ``[BLOCK_S, BLOCK_D]`` tile, so ``tanh(gate)`` is
computed once per block, and the frames are read ``BLOCK_T`` at a time: one loop step
loads ``[BLOCK_T, BLOCK_D]`` of ``h`` and ``[BLOCK_T, BLOCK_S, BLOCK_D]`` of ``m``
together (several KiB per program in flight, see ``_launch_config``). With one or two
streams the warps split only the width, so the sums over frames and streams stay
inside each thread. ``S`` and ``T`` are not specialised on.

* Forward, one pass over ``h`` and ``m``: writes ``u``, ``mu`` and the unnormalised
  temporal mean into a float32 (float64) ``[B, D]`` workspace while summing its
  squares; a second loop over the workspace writes ``v``.
* Backward: a first pass recomputes the temporal mean (``pooled``), its norm and
  ``v . grad_v``; a second pass writes ``grad_h``, ``grad_m`` and the per-video gate
  gradient ``(1 - tanh^2) * sum_t grad_h * m`` into a float32 ``[B, S, D]`` workspace,
  which one ``sum`` over the batch reduces (deterministic, no atomics).

Limits: ``S`` (streams) is at most ``MAX_STREAMS``; ``tanh`` is built from ``exp``
(the interpreter has no libdevice), exact to a few ulps. All accumulation is in
float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpfast.ops._registry import Limits
from mpfast.ops.motion_mix import EPS

from ._utils import SUPPORTED_DTYPES, acc_dtype, acc_torch_dtype, cdiv, next_power_of_2, on_tensor_device

MAX_STREAMS = 64
LIMITS = Limits(SUPPORTED_DTYPES, max_sizes={"streams": MAX_STREAMS})
# Tiles (see _launch_config): at most MAX_BLOCK_D features (MAX_TILE_D_MANY_STREAMS
# elements of m per frame beyond two streams) and about ELEMENTS_PER_THREAD elements of h
# and m per thread and loop step, at most MAX_BLOCK_T frames.
MAX_BLOCK_D = 1024
MAX_TILE_D_MANY_STREAMS = 1024
ELEMENTS_PER_THREAD = 48
MAX_BLOCK_T = 16
_EPS = tl.constexpr(EPS)


@triton.jit
def _tanh(x):
    # Odd Taylor series near 0 (where 1 - exp(-2|x|) cancels), the exp form elsewhere.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.03, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _frame_tiles(t0, frames, dims, streams, stream_ok, dim_ok, T):
    # Offsets and masks of a chunk of frames: [BLOCK_T, BLOCK_D] rows of h (and u, grad_u,
    # grad_h) and the matching [BLOCK_T, BLOCK_S, BLOCK_D] rows of every stream of m.
    t = t0 + frames
    row_ok = (t < T)[:, None] & dim_ok[None, :]
    tile_ok = row_ok[:, None, :] & stream_ok[None, :, None]
    return t[:, None], t[:, None, None], dims[None, :], dims[None, None, :], streams[None, :, None], row_ok, tile_ok


@triton.jit(do_not_specialize=["S", "T"])
def _motion_mix_fwd_kernel(
    h_ptr, stride_hb, stride_ht, stride_hd,
    m_ptr, stride_mb, stride_ms, stride_mt, stride_md,
    gate_ptr, stride_gs, stride_gd,
    u_ptr, stride_ub, stride_ut, stride_ud,
    v_ptr, stride_vb, stride_vd,
    mu_ptr, stride_mub, stride_mud,
    pooled_ptr, stride_pb,
    S, T, D,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    streams = tl.arange(0, BLOCK_S)
    frames = tl.arange(0, BLOCK_T)
    stream_ok = streams < S
    h_base = h_ptr + b * stride_hb
    m_base = m_ptr + b * stride_mb
    u_base = u_ptr + b * stride_ub
    sum_sq = tl.zeros([], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        gate_ok = stream_ok[:, None] & dim_ok[None, :]
        gate = tl.load(gate_ptr + streams[:, None] * stride_gs + dims[None, :] * stride_gd, mask=gate_ok, other=0.0)
        a = _tanh(gate.to(ACC))[None, :, :]
        pooled = tl.zeros([BLOCK_D], dtype=ACC)
        motion = tl.zeros([BLOCK_D], dtype=ACC)
        for t0 in range(0, T, BLOCK_T):
            # BLOCK_T frames of h and of every stream of m at once: all loads in flight together.
            t2, t3, d2, d3, s3, row_ok, tile_ok = _frame_tiles(t0, frames, dims, streams, stream_ok, dim_ok, T)
            h = tl.load(h_base + t2 * stride_ht + d2 * stride_hd, mask=row_ok, other=0.0).to(ACC)
            m = tl.load(m_base + s3 * stride_ms + t3 * stride_mt + d3 * stride_md, mask=tile_ok, other=0.0).to(ACC)
            u = h + tl.sum(a * m, axis=1)
            tl.store(u_base + t2 * stride_ut + d2 * stride_ud, u.to(u_ptr.dtype.element_ty), mask=row_ok)
            pooled += tl.sum(u, axis=0)
            motion += tl.sum(tl.sum(m, axis=1), axis=0)
        pooled = pooled / T
        sum_sq += tl.sum(pooled * pooled, axis=0)
        tl.store(mu_ptr + b * stride_mub + dims * stride_mud, (motion / (S * T)).to(mu_ptr.dtype.element_ty),
                 mask=dim_ok)
        tl.store(pooled_ptr + b * stride_pb + dims, pooled, mask=dim_ok)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_sq), _EPS)
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        pooled = tl.load(pooled_ptr + b * stride_pb + dims, mask=dim_ok, other=0.0)
        tl.store(v_ptr + b * stride_vb + dims * stride_vd, (pooled * inv_norm).to(v_ptr.dtype.element_ty), mask=dim_ok)


@triton.jit(do_not_specialize=["S", "T"])
def _motion_mix_bwd_kernel(
    grad_u_ptr, stride_gub, stride_gut, stride_gud,
    grad_v_ptr, stride_gvb, stride_gvd,
    grad_mu_ptr, stride_gmub, stride_gmud,
    h_ptr, stride_hb, stride_ht, stride_hd,
    m_ptr, stride_mb, stride_ms, stride_mt, stride_md,
    gate_ptr, stride_gs, stride_gd,
    grad_h_ptr, stride_ghb, stride_ght, stride_ghd,
    grad_m_ptr, stride_gmb, stride_gms, stride_gmt, stride_gmd,
    grad_gate_ptr, stride_ggb, stride_ggs,
    pooled_ptr, stride_pb,
    S, T, D,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    streams = tl.arange(0, BLOCK_S)
    frames = tl.arange(0, BLOCK_T)
    stream_ok = streams < S
    h_base = h_ptr + b * stride_hb
    m_base = m_ptr + b * stride_mb
    grad_u_base = grad_u_ptr + b * stride_gub
    grad_h_base = grad_h_ptr + b * stride_ghb
    grad_m_base = grad_m_ptr + b * stride_gmb

    # Pass 1: the temporal mean, its squared norm and its dot product with grad_v.
    sum_sq = tl.zeros([], dtype=ACC)
    dot = tl.zeros([], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        gate_ok = stream_ok[:, None] & dim_ok[None, :]
        gate = tl.load(gate_ptr + streams[:, None] * stride_gs + dims[None, :] * stride_gd, mask=gate_ok, other=0.0)
        a = _tanh(gate.to(ACC))
        h_sum = tl.zeros([BLOCK_D], dtype=ACC)
        m_sum = tl.zeros([BLOCK_S, BLOCK_D], dtype=ACC)
        for t0 in range(0, T, BLOCK_T):
            t2, t3, d2, d3, s3, row_ok, tile_ok = _frame_tiles(t0, frames, dims, streams, stream_ok, dim_ok, T)
            h = tl.load(h_base + t2 * stride_ht + d2 * stride_hd, mask=row_ok, other=0.0)
            m = tl.load(m_base + s3 * stride_ms + t3 * stride_mt + d3 * stride_md, mask=tile_ok, other=0.0)
            h_sum += tl.sum(h.to(ACC), axis=0)
            m_sum += tl.sum(m.to(ACC), axis=0)
        pooled = (h_sum + tl.sum(a * m_sum, axis=0)) / T
        grad_v = tl.load(grad_v_ptr + b * stride_gvb + dims * stride_gvd, mask=dim_ok, other=0.0).to(ACC)
        sum_sq += tl.sum(pooled * pooled, axis=0)
        dot += tl.sum(pooled * grad_v, axis=0)
        tl.store(pooled_ptr + b * stride_pb + dims, pooled, mask=dim_ok)
    norm = tl.sqrt(sum_sq)
    inv_norm = 1.0 / tl.maximum(norm, _EPS)
    v_dot_grad_v = dot * inv_norm
    tl.debug_barrier()

    # Pass 2: grad_h, grad_m and this video's share of grad_gate.
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        gate_ok = stream_ok[:, None] & dim_ok[None, :]
        gate = tl.load(gate_ptr + streams[:, None] * stride_gs + dims[None, :] * stride_gd, mask=gate_ok, other=0.0)
        a = _tanh(gate.to(ACC))
        pooled = tl.load(pooled_ptr + b * stride_pb + dims, mask=dim_ok, other=0.0)
        grad_v = tl.load(grad_v_ptr + b * stride_gvb + dims * stride_gvd, mask=dim_ok, other=0.0).to(ACC)
        if norm > _EPS:
            grad_pooled = (grad_v - pooled * inv_norm * v_dot_grad_v) * inv_norm
        else:
            grad_pooled = grad_v / _EPS
        grad_mean = grad_pooled / T
        grad_mu = tl.load(grad_mu_ptr + b * stride_gmub + dims * stride_gmud, mask=dim_ok, other=0.0).to(ACC)
        grad_mu = grad_mu / (S * T)
        grad_gate = tl.zeros([BLOCK_S, BLOCK_D], dtype=ACC)
        for t0 in range(0, T, BLOCK_T):
            t2, t3, d2, d3, s3, row_ok, tile_ok = _frame_tiles(t0, frames, dims, streams, stream_ok, dim_ok, T)
            # Both loads first, then the stores: nothing makes a load wait for a store.
            grad_u = tl.load(grad_u_base + t2 * stride_gut + d2 * stride_gud, mask=row_ok, other=0.0)
            m = tl.load(m_base + s3 * stride_ms + t3 * stride_mt + d3 * stride_md, mask=tile_ok, other=0.0)
            grad_h = tl.where(row_ok, grad_u.to(ACC) + grad_mean[None, :], 0.0)
            tl.store(grad_h_base + t2 * stride_ght + d2 * stride_ghd, grad_h.to(grad_h_ptr.dtype.element_ty),
                     mask=row_ok)
            grad_m = a[None, :, :] * grad_h[:, None, :] + grad_mu[None, None, :]
            tl.store(grad_m_base + s3 * stride_gms + t3 * stride_gmt + d3 * stride_gmd,
                     grad_m.to(grad_m_ptr.dtype.element_ty), mask=tile_ok)
            grad_gate += tl.sum(grad_h[:, None, :] * m.to(ACC), axis=0)
        tl.store(grad_gate_ptr + b * stride_ggb + streams[:, None] * stride_ggs + dims[None, :],
                 (1.0 - a * a) * grad_gate, mask=gate_ok)


def _launch_config(streams: int, dim: int, itemsize: int) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_S, BLOCK_D, num_warps)``.

    Every stream in one tile, the width in blocks of ``BLOCK_D``. With one or two streams
    (the model's case) there is one warp per 512 elements of a frame's ``[BLOCK_S,
    BLOCK_D]`` tile of m (16 a thread), so the warps split only the width, in 16-byte
    vectors: frames and streams stay inside a thread and the sums over them need no shared
    memory. ``BLOCK_T`` frames per loop step then give each thread about
    ``ELEMENTS_PER_THREAD`` elements of h and m to load at once (half for float64). More
    streams spread over threads and warps (their sums go through shared memory): narrower
    blocks, 8 elements of m per thread, one frame per step.
    """
    block_s = next_power_of_2(streams)
    if block_s > 2:
        block_d = min(next_power_of_2(dim), max(16, MAX_TILE_D_MANY_STREAMS // block_s))
        return 1, block_s, block_d, max(1, min(8, block_s * block_d // 256))
    block_d = min(next_power_of_2(dim), MAX_BLOCK_D)
    warps = max(1, min(8, block_s * block_d // (32 * 16)))
    per_frame = cdiv((block_s + 1) * block_d, 32 * warps)  # elements of h and m per thread and frame
    budget = ELEMENTS_PER_THREAD * 4 // max(4, itemsize)  # float64 takes two registers an element
    rows = max(1, min(MAX_BLOCK_T, budget // per_frame))
    return 1 << (rows.bit_length() - 1), block_s, block_d, warps  # BLOCK_T: a power of two <= rows


@on_tensor_device
def motion_mix_fwd(h: torch.Tensor, m: torch.Tensor, gate: torch.Tensor,
                   u: torch.Tensor, v: torch.Tensor, mu: torch.Tensor) -> None:
    """Fills ``u [B,T,D], v [B,D], mu [B,D]`` from ``h [B,T,D], m [B,S,T,D], gate [S,D]``."""
    batch, streams, frames, dim = m.shape
    pooled = torch.empty((batch, dim), dtype=acc_torch_dtype(h.dtype), device=h.device)
    block_t, block_s, block_d, warps = _launch_config(streams, dim, h.element_size())
    _motion_mix_fwd_kernel[(batch,)](
        h, *h.stride(),
        m, *m.stride(),
        gate, *gate.stride(),
        u, *u.stride(),
        v, *v.stride(),
        mu, *mu.stride(),
        pooled, pooled.stride(0),
        streams, frames, dim,
        ACC=acc_dtype(h.dtype), BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps,
    )


@on_tensor_device
def motion_mix_bwd(grad_u: torch.Tensor, grad_v: torch.Tensor, grad_mu: torch.Tensor, h: torch.Tensor,
                   m: torch.Tensor, gate: torch.Tensor,
                   grad_h: torch.Tensor, grad_m: torch.Tensor, grad_gate: torch.Tensor) -> None:
    """Fills ``grad_h [B,T,D], grad_m [B,S,T,D], grad_gate [S,D]``; incoming grads may be strided or expanded."""
    batch, streams, frames, dim = m.shape
    work_dtype = acc_torch_dtype(h.dtype)
    pooled = torch.empty((batch, dim), dtype=work_dtype, device=h.device)
    gate_partial = torch.empty((batch, streams, dim), dtype=work_dtype, device=h.device)
    block_t, block_s, block_d, warps = _launch_config(streams, dim, h.element_size())
    _motion_mix_bwd_kernel[(batch,)](
        grad_u, *grad_u.stride(),
        grad_v, *grad_v.stride(),
        grad_mu, *grad_mu.stride(),
        h, *h.stride(),
        m, *m.stride(),
        gate, *gate.stride(),
        grad_h, *grad_h.stride(),
        grad_m, *grad_m.stride(),
        gate_partial, gate_partial.stride(0), gate_partial.stride(1),
        pooled, pooled.stride(0),
        streams, frames, dim,
        ACC=acc_dtype(h.dtype), BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps,
    )
    grad_gate.copy_(gate_partial.sum(0))
