"""Triton kernels of ``class_logits`` (the core op of ``mpfast/ops/class_logits.py``).

For video ``b`` and class ``c``: attention weights ``a = softmax_l(scale * q[c,h] . k[b,l,h])``
over the ``H L`` (head, key) pairs ``j = h L + l``, ``g[j] = base_v[c,h] . v[b,l,h]``,
``M = (gram[b] + gram[b]^T) / 2``; ``cosine = (base_dot + a . proj) / sqrt(max(base_sq + a . (2 g + M a), eps^2))``.

Design:

* Forward: one program per (video, block of ``BLOCK_C`` classes). Queries, ``base_v``,
  keys and values are read as 3-D tiles ``[heads, rows, head_dim]`` (heads padded to a
  power of two), so the scores and ``g`` of every head are two batched dots; the softmax
  runs over the last axis. ``M a`` goes by column blocks of ``M`` (one head's keys at a
  time, symmetrised as loaded): ``a`` flattened to ``[BLOCK_C, H L]`` times a ``[H L, L]``
  block. Nothing of size ``[B, C, ...]`` is written but the cosines.
* Backward, flash-style (the tile is recomputed, nothing was saved), in two kernels so
  that no sum needs atomics: ``_class_logits_bwd_video_kernel`` (one program per video and
  group of class blocks) accumulates the video-side gradients (``k``, ``v``, ``gram``,
  ``proj``) and writes ``base_dot``'s; ``_class_logits_bwd_class_kernel`` (one program per
  class block and group of videos) accumulates the class-side ones (``q``, ``base_v``,
  ``base_sq``). Groups write float32 partial sums that one reduction adds up (so a small
  grid still fills the device); the order of every sum is fixed, so results are
  deterministic.

Limits: one ``[heads, keys, head_dim]`` tile (each padded to a power of two, keys and
``head_dim`` to at least 16) holds at most ``MAX_KEY_TILE`` elements (the model's 8 heads
of 64 over 16 or 32 keys fit), ``head_dim`` at most ``MAX_HEAD_DIM``. float32 products
run in IEEE float32, float16/bfloat16 on tensor cores with float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpfast.ops._registry import Limits

from ._utils import SUPPORTED_DTYPES, acc_dtype, acc_torch_dtype, cdiv, next_power_of_2, on_tensor_device
from .prompt_attention import _bias_args, _dot, _dot_flags, _multiprocessors, _split_scale

MAX_HEAD_DIM = 128
MAX_KEY_TILE = 16384
# Shared memory of the largest tile stays within sm_80's 163 KiB per program (float32 and
# float64 products run on CUDA cores from larger staged operands: smaller tiles).
LIMITS = Limits(SUPPORTED_DTYPES, max_sizes={"head_dim": MAX_HEAD_DIM, "key_tile": MAX_KEY_TILE},
                max_sizes_by_dtype={torch.float32: {"key_tile": MAX_KEY_TILE // 4},
                                    torch.float64: {"key_tile": MAX_KEY_TILE // 8}})
EPS_SQUARED: tl.constexpr = tl.constexpr(1e-24)  # |t'|^2 is clamped at eps^2 (eps = 1e-12, mpfast.ops.class_logits.EPS)
_PROGRAMS_PER_SM = 2

_COUNTS = ["C", "L", "H", "B", "GROUPS"]


@triton.jit
def _tile(q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
          k_ptr, skl, skh, skd, v_ptr, svl, svh, svd,
          m_ptr, sm1, sm2, y_ptr, sy1, sy2, bias_ptr, sbl,
          n0_ptr, sn0, s_ptr, ss, c0, C, L, H, HEAD_DIM, scale,
          HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
          HP: tl.constexpr, BLOCK_C: tl.constexpr, LP: tl.constexpr, BLOCK_D: tl.constexpr):
    # One (video, class block) tile: the pointers of k, v, gram, proj, bias and base_dot are
    # already at the video. Returns the operands and a, g, M a, <w, t'> and |t'|^2.
    hh = tl.arange(0, HP)
    cc = tl.arange(0, BLOCK_C)
    ll = tl.arange(0, LP)
    dd = tl.arange(0, BLOCK_D)
    h_ok = hh < H
    c_ok = c0 + cc < C
    l_ok = ll < L
    d_ok = dd < HEAD_DIM
    row_mask = h_ok[:, None, None] & c_ok[None, :, None] & d_ok[None, None, :]
    key_mask = h_ok[:, None, None] & l_ok[None, :, None] & d_ok[None, None, :]
    q = tl.load(q_ptr + (c0 + cc)[None, :, None] * sqc + hh[:, None, None] * sqh + dd[None, None, :] * sqd,
                mask=row_mask, other=0.0)
    r = tl.load(r_ptr + (c0 + cc)[None, :, None] * src + hh[:, None, None] * srh + dd[None, None, :] * srd,
                mask=row_mask, other=0.0)
    k = tl.load(k_ptr + ll[None, :, None] * skl + hh[:, None, None] * skh + dd[None, None, :] * skd,
                mask=key_mask, other=0.0)
    v = tl.load(v_ptr + ll[None, :, None] * svl + hh[:, None, None] * svh + dd[None, None, :] * svd,
                mask=key_mask, other=0.0)
    if HAS_MASK:
        bias = tl.load(bias_ptr + ll * sbl, mask=l_ok, other=float("-inf")).to(ACC)
    else:
        bias = tl.where(l_ok, 0.0, float("-inf")).to(ACC)
    s = _dot(q, tl.permute(k, (0, 2, 1)), ACC, PRECISION, DOT_UPCAST) * scale + bias[None, None, :]
    s_max = tl.max(s, axis=2)
    p = tl.exp(s - tl.where(s_max == float("-inf"), 0.0, s_max)[:, :, None])
    total = tl.sum(p, axis=2)
    a = p / tl.where(total > 0, total, 1.0)[:, :, None]  # a video without keys keeps a = 0
    a = tl.where(h_ok[:, None, None], a, 0.0)
    g = _dot(r, tl.permute(v, (0, 2, 1)), ACC, PRECISION, DOT_UPCAST)
    y = tl.load(y_ptr + hh[:, None] * sy1 + ll[None, :] * sy2, mask=h_ok[:, None] & l_ok[None, :], other=0.0).to(ACC)

    # M a, one head's columns of M at a time, a flattened to [BLOCK_C, H L].
    a_flat = tl.reshape(tl.permute(a, (1, 0, 2)), (BLOCK_C, HP * LP))
    jj = tl.arange(0, HP * LP)
    j_ok = (jj // LP < H) & (jj % LP < L)
    j_off = (jj // LP) * L + jj % LP
    a_flat_op = a_flat.to(k.dtype)
    ma = tl.zeros([HP, BLOCK_C, LP], dtype=ACC)
    for h2 in range(H):
        col = h2 * L + ll
        block_ok = j_ok[:, None] & l_ok[None, :]
        m_cols = tl.load(m_ptr + j_off[:, None] * sm1 + col[None, :] * sm2, mask=block_ok, other=0.0).to(ACC)
        m_rows = tl.load(m_ptr + col[None, :] * sm1 + j_off[:, None] * sm2, mask=block_ok, other=0.0).to(ACC)
        m_sym = ((m_cols + m_rows) * 0.5).to(k.dtype)
        ma_h = _dot(a_flat_op, m_sym, ACC, PRECISION, DOT_UPCAST)
        ma += tl.where(hh[:, None, None] == h2, ma_h[None, :, :], 0.0)
    quad = tl.sum(tl.sum(a * (2.0 * g + ma), axis=2), axis=0)
    dot = tl.load(n0_ptr + cc * sn0, mask=c_ok, other=0.0).to(ACC) + tl.sum(tl.sum(a * y[:, None, :], axis=2), axis=0)
    sq = tl.load(s_ptr + (c0 + cc) * ss, mask=c_ok, other=1.0).to(ACC) + quad
    return q, r, k, v, a, g, ma, y, a_flat, dot, sq


@triton.jit
def _tile_grads(grad_ptr, sgb, sgc,
                q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
                k_ptr, skb, skl, skh, skd, v_ptr, svb, svl, svh, svd,
                m_ptr, smb, sm1, sm2, y_ptr, syb, sy1, sy2, bias_ptr, sbb, sbl,
                n0_ptr, sn0b, sn0c, s_ptr, ss, b, c0, C, L, H, HEAD_DIM, scale,
                HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                HP: tl.constexpr, BLOCK_C: tl.constexpr, LP: tl.constexpr, BLOCK_D: tl.constexpr):
    # The tile of video b and classes [c0, c0 + BLOCK_C) recomputed, and its gradients:
    # d/d<w, t'> and d/d|t'|^2 of each class (0 past C and below the clamp), of the scores
    # (grad_s, softmax backward included) and of g (grad_g).
    q, r, k, v, a, g, ma, y, a_flat, dot, sq = _tile(
        q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
        k_ptr + b * skb, skl, skh, skd, v_ptr + b * svb, svl, svh, svd,
        m_ptr + b * smb, sm1, sm2, y_ptr + b * syb, sy1, sy2, bias_ptr + b * sbb, sbl,
        n0_ptr + b * sn0b + c0 * sn0c, sn0c, s_ptr, ss, c0, C, L, H, HEAD_DIM, scale,
        HAS_MASK, ACC, PRECISION, DOT_UPCAST, HP, BLOCK_C, LP, BLOCK_D)
    cc = tl.arange(0, BLOCK_C)
    grad = tl.load(grad_ptr + b * sgb + (c0 + cc) * sgc, mask=c0 + cc < C, other=0.0).to(ACC)
    norm = tl.sqrt(tl.maximum(sq, EPS_SQUARED))
    grad_dot = grad / norm
    grad_sq = tl.where(sq > EPS_SQUARED, -0.5 * grad * dot / (norm * norm * norm), 0.0)
    grad_a = grad_dot[None, :, None] * y[:, None, :] + 2.0 * grad_sq[None, :, None] * (g + ma)
    grad_g = 2.0 * grad_sq[None, :, None] * a
    grad_s = a * (grad_a - tl.sum(a * grad_a, axis=2)[:, :, None]) * scale
    return q, r, k, v, a, a_flat, grad_dot, grad_sq, grad_s, grad_g


@triton.jit(do_not_specialize=_COUNTS)
def _class_logits_fwd_kernel(
    q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
    k_ptr, skb, skl, skh, skd, v_ptr, svb, svl, svh, svd,
    m_ptr, smb, sm1, sm2, y_ptr, syb, sy1, sy2, bias_ptr, sbb, sbl,
    n0_ptr, sn0b, sn0c, s_ptr, ss,
    out_ptr, sob, soc,
    scale_hi, scale_lo, C, L, H, HEAD_DIM,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    HP: tl.constexpr, BLOCK_C: tl.constexpr, LP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    scale = tl.full([], scale_hi, ACC) + tl.full([], scale_lo, ACC)
    _, _, _, _, _, _, _, _, _, dot, sq = _tile(
        q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
        k_ptr + b * skb, skl, skh, skd, v_ptr + b * svb, svl, svh, svd,
        m_ptr + b * smb, sm1, sm2, y_ptr + b * syb, sy1, sy2, bias_ptr + b * sbb, sbl,
        n0_ptr + b * sn0b + c0 * sn0c, sn0c, s_ptr, ss, c0, C, L, H, HEAD_DIM, scale,
        HAS_MASK, ACC, PRECISION, DOT_UPCAST, HP, BLOCK_C, LP, BLOCK_D)
    cc = tl.arange(0, BLOCK_C)
    cosine = dot / tl.sqrt(tl.maximum(sq, EPS_SQUARED))
    tl.store(out_ptr + b * sob + (c0 + cc) * soc, cosine.to(out_ptr.dtype.element_ty), mask=c0 + cc < C)


@triton.jit(do_not_specialize=_COUNTS)
def _class_logits_bwd_video_kernel(
    grad_ptr, sgb, sgc,
    q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
    k_ptr, skb, skl, skh, skd, v_ptr, svb, svl, svh, svd,
    m_ptr, smb, sm1, sm2, y_ptr, syb, sy1, sy2, bias_ptr, sbb, sbl,
    n0_ptr, sn0b, sn0c, s_ptr, ss,
    grad_n0_ptr, sgn0b, sgn0c,
    dk_ptr, dv_ptr, dm_ptr, dy_ptr,  # float32 partial sums [GROUPS, B, H, LP, BLOCK_D], [GROUPS, B, H L, H L], [GROUPS, B, H, L]
    scale_hi, scale_lo, B, C, L, H, HEAD_DIM, GROUPS,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    HP: tl.constexpr, BLOCK_C: tl.constexpr, LP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    scale = tl.full([], scale_hi, ACC) + tl.full([], scale_lo, ACC)
    hh = tl.arange(0, HP)
    cc = tl.arange(0, BLOCK_C)
    ll = tl.arange(0, LP)
    dd = tl.arange(0, BLOCK_D)
    jj = tl.arange(0, HP * LP)
    j_ok = (jj // LP < H) & (jj % LP < L)
    j_off = (jj // LP) * L + jj % LP
    lh = L * H
    dm_base = dm_ptr + (group * B + b) * lh * lh
    grad_k = tl.zeros([HP, LP, BLOCK_D], dtype=ACC)
    grad_v = tl.zeros([HP, LP, BLOCK_D], dtype=ACC)
    grad_y = tl.zeros([HP, LP], dtype=ACC)
    for c0 in range(group * BLOCK_C, C, GROUPS * BLOCK_C):
        q, r, k, v, a, a_flat, grad_dot, grad_sq, grad_s, grad_g = _tile_grads(
            grad_ptr, sgb, sgc, q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
            k_ptr, skb, skl, skh, skd, v_ptr, svb, svl, svh, svd,
            m_ptr, smb, sm1, sm2, y_ptr, syb, sy1, sy2, bias_ptr, sbb, sbl,
            n0_ptr, sn0b, sn0c, s_ptr, ss, b, c0, C, L, H, HEAD_DIM, scale,
            HAS_MASK, ACC, PRECISION, DOT_UPCAST, HP, BLOCK_C, LP, BLOCK_D)
        tl.store(grad_n0_ptr + b * sgn0b + (c0 + cc) * sgn0c, grad_dot.to(grad_n0_ptr.dtype.element_ty),
                 mask=c0 + cc < C)
        grad_k += _dot(tl.permute(grad_s, (0, 2, 1)).to(q.dtype), q, ACC, PRECISION, DOT_UPCAST)
        grad_v += _dot(tl.permute(grad_g, (0, 2, 1)).to(r.dtype), r, ACC, PRECISION, DOT_UPCAST)
        grad_y += tl.sum(grad_dot[None, :, None] * a, axis=1)
        # gram: += sum_c grad_sq a a^T, one head's columns at a time (this program owns its partial sum).
        weighted = tl.trans(a_flat * grad_sq[:, None]).to(q.dtype)
        for h2 in range(H):
            a_h2 = tl.sum(tl.where(hh[:, None, None] == h2, a, 0.0), axis=0).to(q.dtype)
            block = _dot(weighted, a_h2, ACC, PRECISION, DOT_UPCAST)  # [H L, LP]
            ptrs = dm_base + j_off[:, None] * lh + (h2 * L + ll)[None, :]
            block_ok = j_ok[:, None] & (ll < L)[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=block_ok, other=0.0) + block, mask=block_ok)
    out = ((group * B + b) * HP + hh[:, None, None]) * LP + ll[None, :, None]
    tl.store(dk_ptr + out * BLOCK_D + dd[None, None, :], grad_k)
    tl.store(dv_ptr + out * BLOCK_D + dd[None, None, :], grad_v)
    tl.store(dy_ptr + ((group * B + b) * HP + hh[:, None]) * LP + ll[None, :], grad_y)


@triton.jit(do_not_specialize=_COUNTS)
def _class_logits_bwd_class_kernel(
    grad_ptr, sgb, sgc,
    q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
    k_ptr, skb, skl, skh, skd, v_ptr, svb, svl, svh, svd,
    m_ptr, smb, sm1, sm2, y_ptr, syb, sy1, sy2, bias_ptr, sbb, sbl,
    n0_ptr, sn0b, sn0c, s_ptr, ss,
    dq_ptr, dr_ptr, ds_ptr,  # float32 partial sums [GROUPS, HP, CP, BLOCK_D] and [GROUPS, CP]
    scale_hi, scale_lo, B, C, L, H, HEAD_DIM, GROUPS, CP,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    HP: tl.constexpr, BLOCK_C: tl.constexpr, LP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c0 = tl.program_id(0).to(tl.int64) * BLOCK_C
    group = tl.program_id(1).to(tl.int64)
    scale = tl.full([], scale_hi, ACC) + tl.full([], scale_lo, ACC)
    hh = tl.arange(0, HP)
    cc = tl.arange(0, BLOCK_C)
    dd = tl.arange(0, BLOCK_D)
    grad_q = tl.zeros([HP, BLOCK_C, BLOCK_D], dtype=ACC)
    grad_r = tl.zeros([HP, BLOCK_C, BLOCK_D], dtype=ACC)
    grad_base_sq = tl.zeros([BLOCK_C], dtype=ACC)
    for b in range(group, B, GROUPS):
        q, r, k, v, a, a_flat, grad_dot, grad_sq, grad_s, grad_g = _tile_grads(
            grad_ptr, sgb, sgc, q_ptr, sqc, sqh, sqd, r_ptr, src, srh, srd,
            k_ptr, skb, skl, skh, skd, v_ptr, svb, svl, svh, svd,
            m_ptr, smb, sm1, sm2, y_ptr, syb, sy1, sy2, bias_ptr, sbb, sbl,
            n0_ptr, sn0b, sn0c, s_ptr, ss, b, c0, C, L, H, HEAD_DIM, scale,
            HAS_MASK, ACC, PRECISION, DOT_UPCAST, HP, BLOCK_C, LP, BLOCK_D)
        grad_q += _dot(grad_s.to(k.dtype), k, ACC, PRECISION, DOT_UPCAST)
        grad_r += _dot(grad_g.to(v.dtype), v, ACC, PRECISION, DOT_UPCAST)
        grad_base_sq += grad_sq
    out = (group * HP + hh[:, None, None]) * CP + c0 + cc[None, :, None]
    tl.store(dq_ptr + out * BLOCK_D + dd[None, None, :], grad_q)
    tl.store(dr_ptr + out * BLOCK_D + dd[None, None, :], grad_r)
    tl.store(ds_ptr + group * CP + c0 + cc, grad_base_sq)


# ---- launchers --------------------------------------------------------------------------

def _config(classes: int, keys: int, heads: int, head_dim: int) -> dict:
    """Block sizes (``tl.dot`` takes blocks of at least 16; the key tile is the spec's
    ``key_tile``) and warps."""
    lp = max(16, next_power_of_2(keys))
    block_d = max(16, next_power_of_2(head_dim))
    hp = next_power_of_2(heads)
    return dict(HP=hp, BLOCK_C=16, LP=lp, BLOCK_D=block_d, num_warps=8 if hp * lp * block_d >= 8192 else 4)


def _args(q, k, base_v, v, gram, proj, base_dot, base_sq, key_padding_mask, scale):
    bias = _bias_args(key_padding_mask, q)
    return ((q, *q.stride(), base_v, *base_v.stride(), k, *k.stride(), v, *v.stride(), gram, *gram.stride(),
             proj, *proj.stride(), *bias, base_dot, *base_dot.stride(), base_sq, *base_sq.stride()),
            _split_scale(scale))


def _groups(items: int, others: int, device: torch.device) -> int:
    """How many groups to split ``items`` (looped over by a program) into when ``others`` programs are too few."""
    wanted = _PROGRAMS_PER_SM * _multiprocessors(device)
    return max(1, min(items, -(-wanted // max(others, 1))))


@on_tensor_device
def class_logits_fwd(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask, cosine) -> None:
    """Fills ``cosine [B, C]``."""
    batch, keys, heads, head_dim = k.shape
    classes = q.shape[0]
    tensors, scales = _args(q, k, base_v, v, gram, proj, base_dot, base_sq, key_padding_mask, scale)
    config = _config(classes, keys, heads, head_dim)
    grid = (batch, cdiv(classes, config["BLOCK_C"]))
    _class_logits_fwd_kernel[grid](
        *tensors, cosine, *cosine.stride(), *scales, classes, keys, heads, head_dim,
        HAS_MASK=key_padding_mask is not None, ACC=acc_dtype(q.dtype), **_dot_flags(q.dtype), **config)


@on_tensor_device
def class_logits_bwd(grad, q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask,
                     grad_q, grad_k, grad_base_v, grad_v, grad_gram, grad_proj, grad_base_dot, grad_base_sq) -> None:
    """Fills the gradients of the eight tensor inputs."""
    batch, keys, heads, head_dim = k.shape
    classes = q.shape[0]
    tensors, scales = _args(q, k, base_v, v, gram, proj, base_dot, base_sq, key_padding_mask, scale)
    config = _config(classes, keys, heads, head_dim)
    hp, lp, block_c, block_d = config["HP"], config["LP"], config["BLOCK_C"], config["BLOCK_D"]
    flags = dict(HAS_MASK=key_padding_mask is not None, ACC=acc_dtype(q.dtype), **_dot_flags(q.dtype), **config)
    work = dict(dtype=acc_torch_dtype(q.dtype), device=q.device)
    blocks = cdiv(classes, block_c)

    groups = _groups(blocks, batch, q.device)
    dk = torch.empty((groups, batch, hp, lp, block_d), **work)
    dv = torch.empty_like(dk)
    dm = torch.zeros((groups, batch, keys * heads, keys * heads), **work)
    dy = torch.empty((groups, batch, hp, lp), **work)
    _class_logits_bwd_video_kernel[(batch, groups)](
        grad, *grad.stride(), *tensors, grad_base_dot, *grad_base_dot.stride(), dk, dv, dm, dy,
        *scales, batch, classes, keys, heads, head_dim, groups, **flags)
    grad_k.copy_(dk.sum(0)[:, :heads, :keys, :head_dim].transpose(1, 2))
    grad_v.copy_(dv.sum(0)[:, :heads, :keys, :head_dim].transpose(1, 2))
    grad_gram.copy_(dm.sum(0))
    grad_proj.copy_(dy.sum(0)[:, :heads, :keys])

    groups = _groups(batch, blocks, q.device)
    padded = blocks * block_c
    dq = torch.empty((groups, hp, padded, block_d), **work)
    dr = torch.empty_like(dq)
    ds = torch.empty((groups, padded), **work)
    _class_logits_bwd_class_kernel[(blocks, groups)](
        grad, *grad.stride(), *tensors, dq, dr, ds,
        *scales, batch, classes, keys, heads, head_dim, groups, padded, **flags)
    grad_q.copy_(dq.sum(0)[:heads, :classes, :head_dim].transpose(0, 1))
    grad_base_v.copy_(dr.sum(0)[:heads, :classes, :head_dim].transpose(0, 1))
    grad_base_sq.copy_(ds.sum(0)[:classes])
