"""Triton kernels of ``temporal_diff``: multi-stride frame differencing, forward and backward.

Design: the trailing feature dimensions ``*F`` are collapsed into one (a view; only a
layout that cannot be viewed that way is copied) and tiled in blocks of ``BLOCK_F``
(16 elements per thread: 16-byte vectors for 16-bit dtypes). The forward runs one
program per output tile ``out[b, s, t, block]``: it loads ``x[b, t]`` and ``x[b, t + k_s]``
(both skipped where ``t + k_s >= T``, which writes zeros) and stores the difference, with
no loop, so every program has both loads in flight at once and the grid
(``B * S * T * F / BLOCK_F`` programs) fills the GPU many times over; with ``t``
fastest, a frame read as ``x[b, t + k]`` is read again as ``x[b, t]`` from L2, so DRAM
sees ``x`` about once. The backward gathers, per frame tile, ``+grad[b, s, t - k]``
(where ``t >= k``) and ``-grad[b, s, t]`` (where ``t + k < T``) over all strides in one
loop without stores. ``S`` and ``T`` are not specialised on (one compilation serves
every frame count); grids are one-dimensional (feature block fastest), so any
``B * S * T * F`` fits.

Limits: strides live in a small int32 table on the device (made once per stride list
and device); strides at or beyond ``T`` are clamped to ``T`` (they give zeros either
way). Differences and sums are computed in float32 (float64 for float64 inputs).
Offsets are 64-bit throughout.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, cdiv, flatten_features, int_table, next_power_of_2, on_tensor_device

# One program moves BLOCK_F elements of every tensor it touches: up to 16 per thread, in
# 16-byte vectors for 16-bit dtypes, so that each SM keeps enough bytes in flight.
MAX_BLOCK_F = 4096
ELEMENTS_PER_THREAD = 16


@triton.jit(do_not_specialize=["S", "T"])
def _temporal_diff_fwd_kernel(
    x_ptr, stride_xb, stride_xt, stride_xf,
    out_ptr, stride_ob, stride_os, stride_ot, stride_of,
    strides_ptr,
    S, T, F,
    ACC: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # One program per output tile out[b, s, t, block]: two independent loads and one
    # store, no loop, so nothing serialises the memory traffic of a program.
    pid = tl.program_id(0).to(tl.int64)
    num_f_blocks = tl.cdiv(F, BLOCK_F)
    f_block = pid % num_f_blocks
    row = pid // num_f_blocks  # (b, s, t), t fastest: x[b, t + k] is read again as x[b, t] soon after
    t = row % T
    s = (row // T) % S
    b = row // (T * S)
    offs = f_block * BLOCK_F + tl.arange(0, BLOCK_F)
    in_range = offs < F

    k = tl.load(strides_ptr + s).to(tl.int64)
    valid = t + k < T
    x_row = x_ptr + b * stride_xb + offs * stride_xf
    x_t = tl.load(x_row + t * stride_xt, mask=in_range & valid, other=0.0).to(ACC)
    x_next = tl.load(x_row + (t + k) * stride_xt, mask=in_range & valid, other=0.0).to(ACC)
    tl.store(out_ptr + b * stride_ob + s * stride_os + t * stride_ot + offs * stride_of,
             (x_next - x_t).to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit(do_not_specialize=["S", "T"])
def _temporal_diff_bwd_kernel(
    grad_ptr, stride_gb, stride_gs, stride_gt, stride_gf,
    grad_x_ptr, stride_xb, stride_xt, stride_xf,
    strides_ptr,
    S, T, F,
    ACC: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # One program per frame tile grad_x[b, t, block], summing over the strides; the loop
    # has no store, and each iteration has two BLOCK_F loads in flight.
    pid = tl.program_id(0).to(tl.int64)
    num_f_blocks = tl.cdiv(F, BLOCK_F)
    f_block = pid % num_f_blocks
    frame = pid // num_f_blocks
    t = frame % T
    b = frame // T
    offs = f_block * BLOCK_F + tl.arange(0, BLOCK_F)
    in_range = offs < F

    grad_row = grad_ptr + b * stride_gb + offs * stride_gf
    total = tl.zeros([BLOCK_F], dtype=ACC)
    for s in range(S):
        k = tl.load(strides_ptr + s).to(tl.int64)
        # x[b, t] is the minuend of out[b, s, t - k] and the subtrahend of out[b, s, t].
        as_next = t >= k
        as_prev = t + k < T
        g_next = tl.load(grad_row + (t - k) * stride_gt, mask=in_range & as_next, other=0.0)
        g_prev = tl.load(grad_row + t * stride_gt, mask=in_range & as_prev, other=0.0)
        total += g_next.to(ACC) - g_prev.to(ACC)
        grad_row += stride_gs  # a pointer step, never s * stride in 32 bits
    tl.store(grad_x_ptr + b * stride_xb + t * stride_xt + offs * stride_xf,
             total.to(grad_x_ptr.dtype.element_ty), mask=in_range)


def _launch_config(num_features: int) -> tuple[int, int]:
    """``(BLOCK_F, num_warps)`` for a feature size: whole rows up to ``MAX_BLOCK_F``,
    ``ELEMENTS_PER_THREAD`` elements per thread (at most 8 warps)."""
    block = min(next_power_of_2(max(num_features, 1)), MAX_BLOCK_F)
    return block, max(1, min(8, block // (32 * ELEMENTS_PER_THREAD)))


def _table(strides: Sequence[int], frames: int, device: torch.device) -> torch.Tensor:
    return int_table(tuple(min(int(k), frames) for k in strides), device)


@on_tensor_device
def temporal_diff_fwd(x: torch.Tensor, strides: Sequence[int], out: torch.Tensor) -> None:
    """Fills ``out [B, S, T, *F]`` with ``x[:, t + k_s] - x[:, t]`` (0 past the end) for ``x [B, T, *F]``."""
    batch, frames = x.shape[:2]
    x3 = flatten_features(x, 2)
    out4 = flatten_features(out, 3)
    num_features = x3.shape[2]
    block, warps = _launch_config(num_features)
    grid = (batch * len(strides) * frames * cdiv(num_features, block),)
    _temporal_diff_fwd_kernel[grid](
        x3, *x3.stride(),
        out4, *out4.stride(),
        _table(strides, frames, x.device),
        len(strides), frames, num_features,
        ACC=acc_dtype(x.dtype), BLOCK_F=block, num_warps=warps,
    )


@on_tensor_device
def temporal_diff_bwd(grad: torch.Tensor, strides: Sequence[int], grad_x: torch.Tensor) -> None:
    """Fills ``grad_x [B, T, *F]`` from ``grad [B, S, T, *F]`` (which may be strided or expanded)."""
    batch, frames = grad.shape[0], grad.shape[2]
    grad4 = flatten_features(grad, 3)
    grad_x3 = flatten_features(grad_x, 2)
    num_features = grad4.shape[3]
    block, warps = _launch_config(num_features)
    grid = (batch * frames * cdiv(num_features, block),)
    _temporal_diff_bwd_kernel[grid](
        grad4, *grad4.stride(),
        grad_x3, *grad_x3.stride(),
        _table(strides, frames, grad.device),
        len(strides), frames, num_features,
        ACC=acc_dtype(grad.dtype), BLOCK_F=block, num_warps=warps,
    )
