"""Triton kernels of ``prompt_attention``: many queries over few keys, forward and backward.

Design (FlashAttention-style, specialised for ``C`` queries per head over ``L`` keys):

* Forward: one program per (video, head) and block of ``BLOCK_C`` queries; it streams
  the keys and values in blocks of ``BLOCK_L`` with an online softmax (running max and
  sum in float32, float64 for float64 inputs; one helper, ``_online_softmax``, serves
  every kernel) and never materialises the ``[C, L]`` scores. Queries shared by the
  batch (``[C, H, d]``) are read with a batch stride of 0, never copied; keys expanded
  over the batch (stride 0) are read the same way.
* Backward recomputes instead of storing probabilities. ``_prompt_attention_bwd_kernel``
  (one program per (video, head) and query block; for shared queries one per head, query
  block and group of videos, looping over the group's videos so that ``grad_q`` sums over
  them in registers, the groups' partial sums added by one reduction) forms each row's
  log-sum-exp and ``delta = rowsum(dO * O) = sum_l p_l dp_l`` (``dp = dO V^T``), stores
  both in a small float32 ``[B, H, C]`` workspace, and accumulates ``grad_q``. When every
  key fits one block (``ONE_KEY_BLOCK``: the model's few dozen keys) a video costs it three
  dots (``Q K^T``, ``dO V^T``, ``dS K``) on exact whole-row softmaxes; more keys take two
  streaming passes. ``_prompt_attention_bwd_dkdv_kernel`` (one program per (video, head)
  and short key block) streams the queries and accumulates ``grad_k`` and ``grad_v``.
  Deterministic, no atomics.
* ``key_padding_mask`` (True = padded) becomes a tiny additive ``[B, L]`` bias (0 or
  ``-inf``, float32) before launch, which sets a padded key's score to ``-inf``; a row
  whose keys are all padded has a zero sum, gets zeros and a log-sum-exp of ``+inf`` so
  that its recomputed probabilities (and every gradient through it) are exactly zero.

Limits: head dim ``d`` up to ``MAX_HEAD_DIM`` (``MAX_HEAD_DIM_FLOAT64`` for float64),
padded to a power of two >= 16 and masked, so odd sizes work; block sizes shrink with
``d`` and the element size so that shared memory fits sm_80 and sm_90. float32 matmuls
run in IEEE float32 (no TF32), float16 and bfloat16 ones on tensor cores with float32
accumulation (probabilities are rounded to the input dtype before ``P @ V``, as in
FlashAttention). The scale is passed as two float32 halves so float64 inputs keep a
float64 scale.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from mpfast.ops._registry import Limits

from ._utils import SUPPORTED_DTYPES, acc_dtype, acc_torch_dtype, cdiv, next_power_of_2, on_tensor_device

MAX_HEAD_DIM = 256
# float64 tiles of a 256-wide head stay near 200 KiB of shared memory even at the smallest
# blocks, beyond sm_80's 163 KiB.
MAX_HEAD_DIM_FLOAT64 = 128
LIMITS = Limits(SUPPORTED_DTYPES, max_sizes={"head_dim": MAX_HEAD_DIM},
                max_sizes_by_dtype={torch.float64: {"head_dim": MAX_HEAD_DIM_FLOAT64}})
# Bytes of one query or key tile; the kernels keep four to six of them in shared memory,
# pipelined up to two deep.
MAX_TILE_BYTES = 16 * 1024
# Key blocks (see _launch_config): up to MAX_BLOCK_L keys in one block of the grad_q
# kernel, score tiles of about SCORES_PER_TILE elements, BWD_KV_BLOCK_L keys per grad_k/grad_v program.
MAX_BLOCK_L = 128
SCORES_PER_TILE = 32 * 128
BWD_KV_BLOCK_L = 16


@triton.jit
def _dot(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584);
    # float32 products of bfloat16 values are exact, as on tensor cores.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=ACC, input_precision=PRECISION)


@triton.jit
def _key_bias(bias_ptrs, key_in, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    # [BLOCK_L] additive score bias: 0 for a key to attend, -inf for a padded key or one
    # past L. The mask arrives as a float bias: a [C, L] select whose condition comes from
    # an 8-bit tensor makes Triton 3.x pick a wrong dot-operand kWidth for P (an assertion
    # for float64, kWidth 4 instead of 2 for float16 on sm_80).
    if HAS_MASK:
        bias = tl.load(bias_ptrs, mask=key_in, other=float("-inf")).to(ACC)
    else:
        bias = tl.where(key_in, 0.0, float("-inf")).to(ACC)
    return bias


@triton.jit
def _scores(q, k, bias_ptrs, key_in, scale, HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
            DOT_UPCAST: tl.constexpr):
    # [BLOCK_C, BLOCK_L] scaled scores of a query tile against a key tile, -inf where a key
    # is padded or past L.
    bias = _key_bias(bias_ptrs, key_in, HAS_MASK, ACC)
    return _dot(q, tl.trans(k), ACC, PRECISION, DOT_UPCAST) * scale + bias[None, :]


@triton.jit
def _online_softmax(s, m_i, l_i):
    # One step of the streaming softmax over a key block: the new running maximum and sum,
    # the block's unnormalised probabilities p = exp(s - max) and the factor alpha that
    # rescales whatever was accumulated with the previous maximum. Rows whose keys so far
    # are all padded keep max = -inf, p = 0 and alpha = 0 (nothing accumulated yet).
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def _whole_rows(s, grad_p, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # Rows whose keys all lie in one block: probabilities, log-sum-exp and delta = rowsum(p * dp).
    p, _alpha, m_i, l_i = _online_softmax(s, tl.full([BLOCK_C], float("-inf"), dtype=ACC),
                                          tl.zeros([BLOCK_C], dtype=ACC))
    lse, delta = _row_stats(m_i, l_i, tl.sum(p * grad_p, axis=1))
    return p / tl.where(l_i > 0, l_i, 1.0)[:, None], lse, delta  # a row without keys keeps p = 0


@triton.jit
def _row_stats(m_i, l_i, w_i):
    # Log-sum-exp (+inf for a row without keys, so that its probabilities exp(s - lse) are
    # exactly zero) and delta = sum_l p_l dp_l = rowsum(dO * O) from the running sums.
    has_keys = l_i > 0
    safe_l = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, m_i + tl.log(safe_l), float("inf"))
    return lse, w_i / safe_l


# Counts that only bound loops and masks along non-contiguous dimensions are not
# specialised on (a count of 1 or a multiple of 16 would otherwise compile a new variant);
# HEAD_DIM is, as it masks the contiguous dimension.
_COUNTS = ["C", "L", "H"]


@triton.jit(do_not_specialize=_COUNTS)
def _prompt_attention_fwd_kernel(
    q_ptr, stride_qb, stride_qc, stride_qh, stride_qd,
    k_ptr, stride_kb, stride_kl, stride_kh, stride_kd,
    v_ptr, stride_vb, stride_vl, stride_vh, stride_vd,
    bias_ptr, stride_biasb, stride_biasl,
    out_ptr, stride_ob, stride_oc, stride_oh, stride_od,
    scale_hi, scale_lo,
    C, L, H, HEAD_DIM,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    b = pid_bh // H
    h = pid_bh % H
    scale = tl.full([], scale_hi, ACC) + tl.full([], scale_lo, ACC)
    rows = tl.arange(0, BLOCK_C)
    keys = tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    row_ok = c0 + rows < C
    col_ok = cols < HEAD_DIM

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + c0 * stride_qc
                + rows[:, None] * stride_qc + cols[None, :] * stride_qd,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    k_ptrs = k_ptr + b * stride_kb + h * stride_kh + keys[:, None] * stride_kl + cols[None, :] * stride_kd
    v_ptrs = v_ptr + b * stride_vb + h * stride_vh + keys[:, None] * stride_vl + cols[None, :] * stride_vd
    bias_ptrs = bias_ptr + b * stride_biasb + keys * stride_biasl

    m_i = tl.full([BLOCK_C], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_C], dtype=ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        key_in = l0 + keys < L
        k = tl.load(k_ptrs, mask=key_in[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_in[:, None] & col_ok[None, :], other=0.0)
        s = _scores(q, k, bias_ptrs, key_in, scale, HAS_MASK, ACC, PRECISION, DOT_UPCAST)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, ACC, PRECISION, DOT_UPCAST)
        k_ptrs += BLOCK_L * stride_kl
        v_ptrs += BLOCK_L * stride_vl
        bias_ptrs += BLOCK_L * stride_biasl
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a fully padded row has acc == 0
    tl.store(out_ptr + b * stride_ob + h * stride_oh + c0 * stride_oc
             + rows[:, None] * stride_oc + cols[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=[*_COUNTS, "B", "VIDEOS_PER_GROUP"])
def _prompt_attention_bwd_kernel(
    grad_out_ptr, stride_gob, stride_goc, stride_goh, stride_god,
    q_ptr, stride_qb, stride_qc, stride_qh, stride_qd,
    k_ptr, stride_kb, stride_kl, stride_kh, stride_kd,
    v_ptr, stride_vb, stride_vl, stride_vh, stride_vd,
    bias_ptr, stride_biasb, stride_biasl,
    grad_q_ptr, stride_gqb, stride_gqc, stride_gqh, stride_gqd,
    lse_ptr, delta_ptr, stride_sb, stride_sh,
    scale_hi, scale_lo,
    B, C, L, H, HEAD_DIM,
    VIDEOS_PER_GROUP,
    Q_SHARED: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    if Q_SHARED:  # one program per (head, group of VIDEOS_PER_GROUP videos) and query block
        h = pid % H
        group = pid // H
        b_first = group * VIDEOS_PER_GROUP
        num_videos = tl.minimum(VIDEOS_PER_GROUP, B - b_first)
        out_index = group  # one partial sum of grad_q per group of videos
    else:
        h = pid % H
        b_first = pid // H
        num_videos = 1
        out_index = b_first
    scale = tl.full([], scale_hi, ACC) + tl.full([], scale_lo, ACC)
    rows = tl.arange(0, BLOCK_C)
    keys = tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    row_ok = c0 + rows < C
    col_ok = cols < HEAD_DIM
    tile_ok = row_ok[:, None] & col_ok[None, :]
    key_tile_ok = (keys < L)[:, None] & col_ok[None, :]
    row_tile = rows[:, None] * stride_qc + cols[None, :] * stride_qd
    key_tile_k = keys[:, None] * stride_kl + cols[None, :] * stride_kd
    key_tile_v = keys[:, None] * stride_vl + cols[None, :] * stride_vd

    q_base = q_ptr + b_first * stride_qb + h * stride_qh + c0 * stride_qc
    grad_out_base = grad_out_ptr + b_first * stride_gob + h * stride_goh + c0 * stride_goc
    k_base = k_ptr + b_first * stride_kb + h * stride_kh
    v_base = v_ptr + b_first * stride_vb + h * stride_vh
    bias_base = bias_ptr + b_first * stride_biasb
    stat_base = b_first * stride_sb + h * stride_sh + c0
    grad_q = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    for _ in range(num_videos):
        q = tl.load(q_base + row_tile, mask=tile_ok, other=0.0)
        grad_out = tl.load(grad_out_base + rows[:, None] * stride_goc + cols[None, :] * stride_god,
                           mask=tile_ok, other=0.0)

        if ONE_KEY_BLOCK:  # L <= BLOCK_L (the model's case): three dots per video
            k = tl.load(k_base + key_tile_k, mask=key_tile_ok, other=0.0)
            v = tl.load(v_base + key_tile_v, mask=key_tile_ok, other=0.0)
            s = _scores(q, k, bias_base + keys * stride_biasl, keys < L, scale, HAS_MASK, ACC, PRECISION, DOT_UPCAST)
            grad_p = _dot(grad_out, tl.trans(v), ACC, PRECISION, DOT_UPCAST)
            p, lse, delta = _whole_rows(s, grad_p, BLOCK_C, ACC)
            grad_q += _dot((p * (grad_p - delta[:, None])).to(k.dtype), k, ACC, PRECISION, DOT_UPCAST)
        else:
            # Pass 1: the row statistics, lse and delta = sum_l p_l dp_l with dp = dO V^T.
            m_i = tl.full([BLOCK_C], float("-inf"), dtype=ACC)
            l_i = tl.zeros([BLOCK_C], dtype=ACC)
            w_i = tl.zeros([BLOCK_C], dtype=ACC)
            for l0 in range(0, L, BLOCK_L):
                key_in = l0 + keys < L
                k = tl.load(k_base + l0 * stride_kl + key_tile_k, mask=key_in[:, None] & col_ok[None, :], other=0.0)
                v = tl.load(v_base + l0 * stride_vl + key_tile_v, mask=key_in[:, None] & col_ok[None, :], other=0.0)
                s = _scores(q, k, bias_base + (l0 + keys) * stride_biasl, key_in, scale, HAS_MASK, ACC, PRECISION,
                            DOT_UPCAST)
                p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
                w_i = w_i * alpha + tl.sum(p * _dot(grad_out, tl.trans(v), ACC, PRECISION, DOT_UPCAST), axis=1)
            lse, delta = _row_stats(m_i, l_i, w_i)

            # Pass 2: grad_q += (P * (dP - delta)) @ K.
            for l0 in range(0, L, BLOCK_L):
                key_in = l0 + keys < L
                k = tl.load(k_base + l0 * stride_kl + key_tile_k, mask=key_in[:, None] & col_ok[None, :], other=0.0)
                v = tl.load(v_base + l0 * stride_vl + key_tile_v, mask=key_in[:, None] & col_ok[None, :], other=0.0)
                s = _scores(q, k, bias_base + (l0 + keys) * stride_biasl, key_in, scale, HAS_MASK, ACC, PRECISION,
                            DOT_UPCAST)
                grad_p = _dot(grad_out, tl.trans(v), ACC, PRECISION, DOT_UPCAST)
                grad_s = tl.exp(s - lse[:, None]) * (grad_p - delta[:, None])
                grad_q += _dot(grad_s.to(k.dtype), k, ACC, PRECISION, DOT_UPCAST)
        # The key-block programs of the other kernel read the row statistics.
        tl.store(lse_ptr + stat_base + rows, lse, mask=row_ok)
        tl.store(delta_ptr + stat_base + rows, delta, mask=row_ok)

        q_base += stride_qb
        grad_out_base += stride_gob
        k_base += stride_kb
        v_base += stride_vb
        bias_base += stride_biasb
        stat_base += stride_sb
    grad_q = grad_q * scale
    tl.store(grad_q_ptr + out_index * stride_gqb + h * stride_gqh + c0 * stride_gqc
             + rows[:, None] * stride_gqc + cols[None, :] * stride_gqd,
             grad_q.to(grad_q_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=_COUNTS)
def _prompt_attention_bwd_dkdv_kernel(
    grad_out_ptr, stride_gob, stride_goc, stride_goh, stride_god,
    q_ptr, stride_qb, stride_qc, stride_qh, stride_qd,
    k_ptr, stride_kb, stride_kl, stride_kh, stride_kd,
    v_ptr, stride_vb, stride_vl, stride_vh, stride_vd,
    bias_ptr, stride_biasb, stride_biasl,
    grad_k_ptr, stride_gkb, stride_gkl, stride_gkh, stride_gkd,
    grad_v_ptr, stride_gvb, stride_gvl, stride_gvh, stride_gvd,
    lse_ptr, delta_ptr, stride_sb, stride_sh,
    scale_hi, scale_lo,
    C, L, H, HEAD_DIM,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1).to(tl.int64) * BLOCK_L
    b = pid_bh // H
    h = pid_bh % H
    scale = tl.full([], scale_hi, ACC) + tl.full([], scale_lo, ACC)
    rows = tl.arange(0, BLOCK_C)
    keys = tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    key_in = l0 + keys < L
    key_tile_ok = key_in[:, None] & col_ok[None, :]

    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + l0 * stride_kl
                + keys[:, None] * stride_kl + cols[None, :] * stride_kd, mask=key_tile_ok, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + l0 * stride_vl
                + keys[:, None] * stride_vl + cols[None, :] * stride_vd, mask=key_tile_ok, other=0.0)
    bias_ptrs = bias_ptr + b * stride_biasb + (l0 + keys) * stride_biasl

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qc + cols[None, :] * stride_qd
    grad_out_ptrs = (grad_out_ptr + b * stride_gob + h * stride_goh
                     + rows[:, None] * stride_goc + cols[None, :] * stride_god)
    stat_offs = b * stride_sb + h * stride_sh + rows
    grad_k = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    grad_v = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        row_ok = c0 + rows < C
        tile_ok = row_ok[:, None] & col_ok[None, :]
        q = tl.load(q_ptrs, mask=tile_ok, other=0.0)
        grad_out = tl.load(grad_out_ptrs, mask=tile_ok, other=0.0)
        s = _scores(q, k, bias_ptrs, key_in, scale, HAS_MASK, ACC, PRECISION, DOT_UPCAST)
        grad_p = _dot(grad_out, tl.trans(v), ACC, PRECISION, DOT_UPCAST)
        lse = tl.load(lse_ptr + stat_offs, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stat_offs, mask=row_ok, other=0.0)
        p = tl.exp(s - lse[:, None])  # zero for padded keys, fully padded rows and rows past C
        grad_v += _dot(tl.trans(p.to(grad_out.dtype)), grad_out, ACC, PRECISION, DOT_UPCAST)
        grad_s = p * (grad_p - delta[:, None])
        grad_k += _dot(tl.trans(grad_s.to(q.dtype)), q, ACC, PRECISION, DOT_UPCAST)
        q_ptrs += BLOCK_C * stride_qc
        grad_out_ptrs += BLOCK_C * stride_goc
        stat_offs += BLOCK_C
    grad_k = grad_k * scale
    tl.store(grad_k_ptr + b * stride_gkb + h * stride_gkh + l0 * stride_gkl
             + keys[:, None] * stride_gkl + cols[None, :] * stride_gkd,
             grad_k.to(grad_k_ptr.dtype.element_ty), mask=key_tile_ok)
    tl.store(grad_v_ptr + b * stride_gvb + h * stride_gvh + l0 * stride_gvl
             + keys[:, None] * stride_gvl + cols[None, :] * stride_gvd,
             grad_v.to(grad_v_ptr.dtype.element_ty), mask=key_tile_ok)


# Under TRITON_INTERPRET=1, triton.jit returns interpreted functions instead of JITFunctions.
_INTERPRETED = not isinstance(_prompt_attention_fwd_kernel, triton.runtime.JITFunction)


def _launch_config(classes: int, keys: int, head_dim: int, dtype: torch.dtype, kernel: str = "fwd") -> dict:
    """Block sizes, warps and pipeline stages of one kernel (``fwd``, ``bwd_q`` for
    ``_prompt_attention_bwd_kernel``, ``bwd_kv`` for ``_prompt_attention_bwd_dkdv_kernel``),
    keyed on shape and dtype (``tl.dot`` needs blocks of at least 16).

    A ``[rows, BLOCK_D]`` tile of q, k or v holds at most ``MAX_TILE_BYTES``, so that every
    kernel's shared memory fits the smallest target's (sm_80: 163 KiB per program). Query
    blocks of 64 rows (one Hopper warpgroup MMA) for head dims up to 64 in 16-bit dtypes.
    ``bwd_q`` takes every key in one block when ``keys <= MAX_BLOCK_L`` (the model's key
    counts: prompts plus frames), so each video costs it three dots; its score tiles
    ``[BLOCK_C, BLOCK_L]`` stay near ``SCORES_PER_TILE`` elements (query blocks shrink as
    key blocks grow), at 8 warps from that size on. ``bwd_kv`` streams the queries past
    short key blocks (``BWD_KV_BLOCK_L``): many programs, small accumulators. A loop over
    several blocks is software-pipelined two deep; a single block is not pipelined.
    """
    block_d = max(16, next_power_of_2(head_dim))
    wide = block_d > 64 or dtype == torch.float64
    rows = max(16, MAX_TILE_BYTES // (block_d * dtype.itemsize))  # rows of one tile
    block_c = min(32 if wide else 64, rows, max(16, next_power_of_2(classes)))
    all_keys = max(16, next_power_of_2(keys))
    warps = 8 if block_d >= 128 else 4
    if kernel == "fwd":
        block_l = min(64, rows, all_keys)
        loops = keys > block_l
    elif kernel == "bwd_q":
        block_l = min(MAX_BLOCK_L, rows, all_keys)
        block_c = min(block_c, max(16, SCORES_PER_TILE // block_l))
        warps = 8 if block_c * block_l >= SCORES_PER_TILE else warps
        loops = keys > block_l
    elif kernel == "bwd_kv":
        block_l = min(BWD_KV_BLOCK_L, rows, all_keys)
        loops = classes > block_c
    else:
        raise ValueError(f"kernel must be 'fwd', 'bwd_q' or 'bwd_kv', got {kernel!r}")
    return dict(BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps, num_stages=2 if loops else 1)


# Programs to aim for per streaming multiprocessor when the grid is too small to fill
# the device; the interpreter pretends to have a few, so that tests exercise the split.
_PROGRAMS_PER_SM = 2
_INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _video_groups(batch: int, programs: int, device: torch.device) -> int:
    """How many groups of videos the shared-query ``grad_q`` kernel splits the batch into."""
    wanted = _PROGRAMS_PER_SM * _multiprocessors(device)
    return max(1, min(batch, -(-wanted // max(programs, 1))))


def _split_scale(scale: float) -> tuple[float, float]:
    """``scale`` as float32 ``hi + lo`` (Triton passes Python floats as float32)."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, scale - hi


def _as_4d(q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``q`` and its strides as ``[B or 1, C, H, d]``; shared queries get batch stride 0."""
    if q.dim() == 3:
        return q, (0, *q.stride())
    return q, tuple(q.stride())


def _bias_args(key_padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """The mask as an additive ``[B, L]`` score bias (0 or -inf) in the accumulator dtype."""
    if key_padding_mask is None:
        return like, 0, 0
    bias = torch.zeros(key_padding_mask.shape, dtype=acc_torch_dtype(like.dtype), device=like.device)
    bias.masked_fill_(key_padding_mask, float("-inf"))
    return bias, *bias.stride()


def _common_args(q, k, v, key_padding_mask, scale):
    _, q_strides = _as_4d(q)
    return (q, *q_strides), (k, *k.stride()), (v, *v.stride()), _bias_args(key_padding_mask, q), _split_scale(scale)


def _dot_flags(dtype: torch.dtype) -> dict:
    """``PRECISION`` and ``DOT_UPCAST``: float32 keeps IEEE products (TF32 would lose ~3
    decimal digits); bfloat16 is upcast before ``tl.dot`` only in the interpreter."""
    upcast = _INTERPRETED and dtype == torch.bfloat16
    return dict(PRECISION="ieee" if upcast or dtype in (torch.float32, torch.float64) else "tf32", DOT_UPCAST=upcast)


@on_tensor_device
def prompt_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         key_padding_mask: torch.Tensor | None, out: torch.Tensor) -> None:
    """Fills ``out [B,C,H,d]`` from ``q [C,H,d] or [B,C,H,d], k, v [B,L,H,d], mask [B,L]?``."""
    batch, keys, heads, head_dim = k.shape
    classes = q.shape[-3]
    q_args, k_args, v_args, bias_args, scales = _common_args(q, k, v, key_padding_mask, scale)
    config = _launch_config(classes, keys, head_dim, q.dtype)
    grid = (batch * heads, cdiv(classes, config["BLOCK_C"]))
    _prompt_attention_fwd_kernel[grid](
        *q_args, *k_args, *v_args, *bias_args,
        out, *out.stride(),
        *scales,
        classes, keys, heads, head_dim,
        HAS_MASK=key_padding_mask is not None, ACC=acc_dtype(q.dtype), **_dot_flags(q.dtype), **config,
    )


@on_tensor_device
def prompt_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         key_padding_mask: torch.Tensor | None,
                         grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor) -> None:
    """Fills ``grad_q`` (``q``'s shape, summed over B when shared), ``grad_k`` and ``grad_v``."""
    batch, keys, heads, head_dim = k.shape
    classes = q.shape[-3]
    shared = q.dim() == 3
    q_args, k_args, v_args, bias_args, scales = _common_args(q, k, v, key_padding_mask, scale)
    _, grad_q_strides = _as_4d(grad_q)
    lse = torch.empty((batch, heads, classes), dtype=acc_torch_dtype(q.dtype), device=q.device)
    delta = torch.empty_like(lse)
    config = _launch_config(classes, keys, head_dim, q.dtype, "bwd_q")
    flags = dict(HAS_MASK=key_padding_mask is not None, ACC=acc_dtype(q.dtype), **_dot_flags(q.dtype))
    query_blocks = cdiv(classes, config["BLOCK_C"])
    groups, per_group = 1, 1
    grad_q_out = grad_q
    if shared:
        # grad_q sums over the batch. Groups of videos run side by side, each writing a
        # partial sum (accumulator dtype) that one reduction adds up, so that a small
        # heads x query-blocks grid still fills the device.
        groups = _video_groups(batch, heads * query_blocks, q.device)
        per_group = cdiv(batch, groups)
        groups = cdiv(batch, per_group)
        if groups > 1:
            grad_q_out = torch.empty((groups, classes, heads, head_dim), dtype=acc_torch_dtype(q.dtype),
                                     device=q.device)
            grad_q_strides = grad_q_out.stride()
    grid = ((groups if shared else batch) * heads, query_blocks)
    _prompt_attention_bwd_kernel[grid](
        grad_out, *grad_out.stride(),
        *q_args, *k_args, *v_args, *bias_args,
        grad_q_out, *grad_q_strides,
        lse, delta, lse.stride(0), lse.stride(1),
        *scales,
        batch, classes, keys, heads, head_dim,
        per_group,
        Q_SHARED=shared, ONE_KEY_BLOCK=keys <= config["BLOCK_L"], **flags, **config,
    )
    if grad_q_out is not grad_q:  # one reduction kernel, plus a cast for float16/bfloat16
        if grad_q_out.dtype == grad_q.dtype:
            torch.sum(grad_q_out, dim=0, out=grad_q)
        else:
            grad_q.copy_(grad_q_out.sum(0))
    config = _launch_config(classes, keys, head_dim, q.dtype, "bwd_kv")
    grid = (batch * heads, cdiv(keys, config["BLOCK_L"]))
    _prompt_attention_bwd_dkdv_kernel[grid](
        grad_out, *grad_out.stride(),
        *q_args, *k_args, *v_args, *bias_args,
        grad_k, *grad_k.stride(),
        grad_v, *grad_v.stride(),
        lse, delta, lse.stride(0), lse.stride(1),
        *scales,
        classes, keys, heads, head_dim,
        **flags, **config,
    )
