"""``class_logits``: the text <- video attention, its output projection, the residual and
the cosine logits in one op, without a ``[B, C, D]`` tensor.

What it computes (the specification, :func:`class_logits_ref`): for videos ``b`` and
classes ``c``, with ``H`` heads of width ``d`` over ``L`` keys,

* ``o[b,c] = concat_h sum_l softmax_l(scale * q[c,h] . k[b,l,h]) v[b,l,h]`` (``[H d]``;
  ``key_padding_mask[b,l]`` True excludes a key; a video with every key padded gives 0),
* ``t'[b,c] = base[c] + out_scale * (out_weight @ o[b,c] + out_bias)`` (``[D]``),
* ``logits[b,c] = logit_scale * <normalize(video[b]), normalize(t'[b,c])> + logit_bias``.

This is the MotionCLIP head's text side (:class:`mpfast.model.MultimodalCommunicationBlock`)
and its logits. Computed as written, every (video, class) pair gets its own ``[D]`` vector
and a ``D x D`` projection: ``B C D^2`` multiply-adds and several ``[B, C, D]`` activations.

How it is computed instead. The logit needs two numbers of ``t'``: ``<w, t'>`` (``w`` the
unit video embedding) and ``|t'|^2``. Write ``e_c = base_c + out_scale * out_bias`` and
fold the output projection (and ``out_scale``) into the values, once per video:
``z[b,h,l] = out_scale * W_h v[b,l,h]`` (``[D]``, ``W_h`` the columns of head ``h``). With
``a[b,c]`` the ``H L`` attention weights of the pair (index ``j = h L + l``),
``t' = e_c + sum_j a_j z_j``, so

* ``<w, t'> = <w, e_c> + a . y_b`` with ``y_b[j] = <w_b, z_j>`` (per video),
* ``|t'|^2 = |e_c|^2 + 2 a . g + a^T M_b a`` with ``g[j] = <e_c, z_j> = r_c[h] . v[b,l,h]``,
  ``r_c = W^T (out_scale * e_c)`` (per class, ``[H, d]``: a dot product of width ``d``, like
  a score) and ``M_b = Z_b Z_b^T`` the ``[H L, H L]`` Gram matrix of the folded values.

Per pair that is ``2 H L d + (H L)^2`` multiply-adds (scores, ``g``, the quadratic form)
instead of ``D^2 + 2 H L d``; per video ``H L d D + (H L)^2 D`` for ``Z`` and ``M``; per
call ``C D H d`` for ``r`` (cached with the class list at inference by MotionCLIP). The
core op ``torch.ops.mpfast.class_logits`` takes these small per-class and per-video pieces
and computes each tile of (videos x classes) in one pass; its backward recomputes the tile
(flash-style) from the same inputs. Autograd keeps the ``[B, H L, H L]`` Gram matrices and
the inputs, nothing of size ``[B, C, D]``; the Triton and C++ kernels write nothing of size
``[B, C, ...]`` but the logits (the CUDA fallback's backward holds ``[videos, C, H L]``
workspaces for a chunk of videos).

When the fold does not pay: the pair cost ``(H L)^2`` exceeds the projection's ``D^2``
when ``H L >= D`` (for ``D = 512`` and 8 heads: 64 keys or more). The op still computes the
same logits without a ``[B, C, D]`` tensor, at more multiply-adds per pair than the
unfused projection; :class:`mpfast.model.MotionCLIP` then uses the unfused path.

Precision: ``|t'|^2`` is a sum of terms about as large as ``|e_c|^2`` and ``|z|^2``; when
``t'`` is much shorter than they are (``t'`` near 0), its relative error grows by their
ratio squared (float32: 1e-3 relative at a ``t'`` 100x shorter than ``e_c``). The norm is
clamped at ``eps = 1e-12`` as in ``F.normalize``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common
from ._spec import OpSpec, register
from .prompt_attention import _probabilities, prompt_attention_ref

EPS = 1e-12  # the norms are clamped at EPS, as F.normalize does


# ---- the specification ------------------------------------------------------------------

def class_logits_ref(
    q: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, out_bias: Tensor | None, out_scale: Tensor,
    base: Tensor, video: Tensor, scale: float | None = None, key_padding_mask: Tensor | None = None,
    logit_scale: Tensor | float = 1.0, logit_bias: Tensor | float | None = None,
) -> Tensor:
    """The specification, written as the unfused model computes it (``[B, C, D]`` included).

    Returns:
        logits ``[B, C]``.
    """
    batch, classes = k.shape[0], q.shape[0]
    attended = prompt_attention_ref(q, k, v, scale, key_padding_mask).reshape(batch, classes, -1)
    text = base + out_scale * F.linear(attended, out_weight, out_bias)
    cosine = torch.einsum("bd,bcd->bc", F.normalize(video, dim=-1), F.normalize(text, dim=-1))
    logits = logit_scale * cosine
    return logits if logit_bias is None else logits + logit_bias


# ---- the core op: cosines of a tile from the folded pieces ------------------------------

def _weights(q: Tensor, k: Tensor, scale: float, key_padding_mask: Tensor | None) -> Tensor:
    """Attention weights ``[B, C, H L]`` (index ``h L + l``); 0 for a video whose keys are all padded."""
    p = _probabilities(q, k, scale, key_padding_mask)  # [B, H, C, L]
    return p.transpose(1, 2).flatten(2)


def _norms(a: Tensor, q: Tensor, base_v: Tensor, v: Tensor, gram: Tensor, proj: Tensor, base_dot: Tensor,
           base_sq: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``<w, t'>``, ``|t'|^2`` and the pieces ``g``, ``M a`` they are made of."""
    batch, classes = a.shape[:2]
    g = torch.einsum("chd,blhd->bchl", base_v, v).reshape(batch, classes, -1)
    gram_a = torch.einsum("bjk,bck->bcj", 0.5 * (gram + gram.transpose(1, 2)), a)
    dot = base_dot + torch.einsum("bcj,bj->bc", a, proj.flatten(1))
    square = base_sq + (a * (2 * g + gram_a)).sum(-1)
    return dot, square, g, gram_a


def class_cosine_ref(q: Tensor, k: Tensor, base_v: Tensor, v: Tensor, gram: Tensor, proj: Tensor, base_dot: Tensor,
                     base_sq: Tensor, scale: float, key_padding_mask: Tensor | None = None) -> Tensor:
    """Reference of the core op (differentiable by autograd): ``[B, C]`` cosines ``<w, t'> / |t'|``.

    Args (``j = h L + l`` indexes the ``H L`` keys of all heads):
        q: ``[C, H, d]`` class queries. k: ``[B, L, H, d]`` keys.
        base_v: ``[C, H, d]`` ``r_c``, the residual base mapped into value space.
        v: ``[B, L, H, d]`` values.
        gram: ``[B, H L, H L]`` ``M_b`` (read as ``(M + M^T) / 2``: ``a^T M a`` is the same).
        proj: ``[B, H, L]`` ``y_b``. base_dot: ``[B, C]`` ``<w_b, e_c>``. base_sq: ``[C]`` ``|e_c|^2``.
    """
    a = _weights(q, k, scale, key_padding_mask)
    dot, square, _, _ = _norms(a, q, base_v, v, gram, proj, base_dot, base_sq)
    return dot / square.clamp_min(EPS * EPS).sqrt()


def class_cosine_backward_ref(grad: Tensor, q: Tensor, k: Tensor, base_v: Tensor, v: Tensor, gram: Tensor,
                              proj: Tensor, base_dot: Tensor, base_sq: Tensor, scale: float,
                              key_padding_mask: Tensor | None = None) -> tuple[Tensor, ...]:
    """Reference backward of the core op: the gradients of its eight tensor inputs, in order."""
    batch, keys, heads, head_dim = k.shape
    classes = q.shape[0]
    a = _weights(q, k, scale, key_padding_mask)
    dot, square, g, gram_a = _norms(a, q, base_v, v, gram, proj, base_dot, base_sq)
    inside = square > EPS * EPS
    norm = square.clamp_min(EPS * EPS).sqrt()
    grad_dot = grad / norm
    grad_square = torch.where(inside, -0.5 * grad * dot / (norm * norm * norm), 0.0)  # d/d|t'|^2
    grad_a = grad_dot[..., None] * proj.flatten(1)[:, None] + 2 * grad_square[..., None] * (g + gram_a)
    grad_g = (2 * grad_square[..., None] * a).view(batch, classes, heads, keys)
    grad_gram = torch.einsum("bc,bcj,bck->bjk", grad_square, a, a)
    grad_proj = torch.einsum("bc,bcj->bj", grad_dot, a).view(batch, heads, keys)
    # Softmax backward per head, then the scores' inputs.
    p = a.view(batch, classes, heads, keys)
    dp = grad_a.view(batch, classes, heads, keys)
    grad_s = p * (dp - (p * dp).sum(3, keepdim=True)) * scale
    grad_q = torch.einsum("bchl,blhd->chd", grad_s, k)
    grad_k = torch.einsum("bchl,chd->blhd", grad_s, q)
    grad_base_v = torch.einsum("bchl,blhd->chd", grad_g, v)
    grad_v = torch.einsum("bchl,chd->blhd", grad_g, base_v)
    return grad_q, grad_k, grad_base_v, grad_v, grad_gram, grad_proj, grad_dot, grad_square.sum(0)


def flops(q_shape: Sequence[int], k_shape: Sequence[int]) -> int:
    """True FLOPs of the core op's forward: per (video, class) pair, the scores and ``g``
    (``H L d`` multiply-adds each), the quadratic form (``(H L)^2``) and three ``H L`` dot
    products (``a . y``, ``a . g``, ``a . M a``); 2 per multiply-add."""
    batch, keys, heads, head_dim = k_shape
    pairs, lh = batch * q_shape[0], keys * heads
    return 2 * pairs * (2 * lh * head_dim + lh * lh + 3 * lh)


def backward_flops(q_shape: Sequence[int], k_shape: Sequence[int], *_) -> int:
    """The backward recomputes the forward, then per pair: the Gram gradient (``(H L)^2``),
    the four products of the softmax and ``g`` gradients (``H L d`` each) and ``6 H L`` more."""
    batch, keys, heads, head_dim = k_shape
    pairs, lh = batch * q_shape[0], keys * heads
    return flops(q_shape, k_shape) + 2 * pairs * (4 * lh * head_dim + lh * lh + 6 * lh)


def key_tile(keys: int, heads: int, head_dim: int) -> int:
    """Elements of one ``[heads, keys, head_dim]`` tile padded to powers of two (keys and
    ``head_dim`` to at least 16): what a tile-based backend holds of a video at once."""
    def pow2(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()

    return pow2(heads) * max(16, pow2(keys)) * max(16, pow2(head_dim))


SPEC = OpSpec(
    name="class_logits",
    schema="(Tensor q, Tensor k, Tensor base_v, Tensor v, Tensor gram, Tensor proj, Tensor base_dot, "
           "Tensor base_sq, float scale, Tensor? key_padding_mask=None) -> Tensor cosine",
    outputs=lambda q, k, *_: [((k.shape[0], q.shape[0]), q.dtype)],
    differentiable=("q", "k", "base_v", "v", "gram", "proj", "base_dot", "base_sq"),
    saved=("q", "k", "base_v", "v", "gram", "proj", "base_dot", "base_sq", "scale", "key_padding_mask"),
    reference=class_cosine_ref,
    reference_backward=class_cosine_backward_ref,
    flops=lambda q, k, *_: flops(q, k),
    backward_flops=backward_flops,
    sizes={"head_dim": lambda q, k, *_: k.shape[-1], "key_tile": lambda q, k, *_: key_tile(*k.shape[1:])},
)
_op = register(SPEC)


# ---- the fold: the small pieces the core op takes ---------------------------------------

class ClassFold(NamedTuple):
    """What the op needs of the classes: depends only on the class list and the weights.

    MotionCLIP caches it with the class embeddings at inference (:func:`fold_classes`).
    """

    q: Tensor  # [C, H, d] queries
    base: Tensor  # [C, D] e_c = base + out_scale * out_bias
    base_v: Tensor  # [C, H, d] r_c = W^T (out_scale * e_c)
    base_sq: Tensor  # [C] |e_c|^2


def fold_classes(q: Tensor, base: Tensor, out_weight: Tensor, out_bias: Tensor | None, out_scale: Tensor) -> ClassFold:
    """The class side of :func:`class_logits` (``C D H d`` multiply-adds), differentiable.

    Args: as :func:`class_logits`.
    """
    q, base, out_weight, out_bias, out_scale = _common.autocast_inputs(None, q, base, out_weight, out_bias, out_scale)
    _validate_classes(q, base, out_weight, out_bias, out_scale)
    e = base if out_bias is None else base + out_scale * out_bias
    base_v = (e * out_scale) @ out_weight
    return ClassFold(q, e, base_v.view(q.shape), (e * e).sum(-1))


def _heads_first(t: Tensor) -> Tensor:
    """``[B, L, H, n]`` as ``[H, B L, n]`` (a view: one matrix per head, rows ``(b, l)``)."""
    batch, keys, heads, width = t.shape
    return t.permute(2, 0, 1, 3).reshape(heads, batch * keys, width)


def _fold_values(v: Tensor, weight: Tensor) -> Tensor:
    """``z [B, H L, D]`` (head-major): the values ``[B, L, H, d]`` through the output
    projection ``weight [D, H, d]``, one ``[B L, d] x [d, D]`` product per head (then one
    copy to the videos-first layout; a broadcast ``matmul`` would copy the weight per video)."""
    batch, keys, heads, _ = v.shape
    z = torch.bmm(_heads_first(v), weight.permute(1, 2, 0))  # [H, B L, D]
    return z.view(heads, batch, keys, -1).transpose(0, 1).reshape(batch, heads * keys, -1)


def _fold_videos(v: Tensor, weight: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """The video side of the op: ``gram = z z^T [B, H L, H L]`` and ``proj = z w [B, H, L]``
    with ``z`` the folded values (:func:`_fold_values`) and ``w`` the unit video embeddings."""
    if torch.is_grad_enabled() and (v.requires_grad or weight.requires_grad or w.requires_grad):
        return _FoldVideos.apply(v, weight, w)
    return _gram_and_proj(_fold_values(v, weight), w, v.shape)


def _gram_and_proj(z: Tensor, w: Tensor, values_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    batch, keys, heads = values_shape[:3]
    return z @ z.transpose(1, 2), (z @ w[:, :, None]).view(batch, heads, keys)


class _FoldVideos(torch.autograd.Function):
    """:func:`_fold_videos` with gradients. Autograd would keep ``z`` (``[B, H L, D]``, as
    large as the rest of the head's activations together); this saves ``v``, ``weight`` and
    ``w`` and recomputes ``z`` in the backward (``B L H d D`` multiply-adds)."""

    @staticmethod
    def forward(v: Tensor, weight: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        return _gram_and_proj(_fold_values(v, weight), w, v.shape)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_gram: Tensor, grad_proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # In an order that keeps at most two [B, H L, D] tensors alive (they set the step's memory peak).
        v, weight, w = ctx.saved_tensors
        batch, keys, heads = v.shape[:3]
        z = _fold_values(v, weight)
        grad_proj = grad_proj.flatten(1)
        grad_w = (grad_proj[:, None, :] @ z)[:, 0]
        grad_z = torch.bmm(grad_gram + grad_gram.transpose(1, 2), z)
        del z
        grad_z.addcmul_(grad_proj[:, :, None], w[:, None, :])
        grad_z = grad_z.view(batch, heads, keys, -1).transpose(0, 1).reshape(heads, batch * keys, -1)  # [H, B L, D]
        grad_v = torch.bmm(grad_z, weight.transpose(0, 1)).view(heads, batch, keys, -1).permute(1, 2, 0, 3)
        grad_weight = torch.bmm(grad_z.transpose(1, 2), _heads_first(v)).transpose(0, 1)  # [D, H, d]
        return grad_v, grad_weight, grad_w


def class_logits_folded(
    classes: ClassFold, k: Tensor, v: Tensor, out_weight: Tensor, out_scale: Tensor, video: Tensor,
    scale: float | None = None, key_padding_mask: Tensor | None = None,
    logit_scale: Tensor | float = 1.0, logit_bias: Tensor | float | None = None,
) -> Tensor:
    """:func:`class_logits` with the class side already folded (:func:`fold_classes`)."""
    if not isinstance(classes, ClassFold):
        raise TypeError(f"classes must be a ClassFold (from fold_classes), got {type(classes).__name__}")
    q, base, base_v, base_sq, k, v, out_weight, out_scale, video = _common.autocast_inputs(
        None, *classes, k, v, out_weight, out_scale, video)
    _validate_videos(q, k, v, out_weight, out_scale, video, scale, key_padding_mask, base.shape[-1])
    _common.check_same("dtype", q=q, base=base, k=k, v=v, out_weight=out_weight, out_scale=out_scale, video=video)
    batch, keys, heads, head_dim = k.shape
    weight = (out_scale[:, None] * out_weight).view(-1, heads, head_dim)
    w = F.normalize(video, dim=-1)
    gram, proj = _fold_videos(v, weight, w)
    base_dot = w @ base.T
    scale = head_dim ** -0.5 if scale is None else float(scale)
    cosine = _op(q, k, base_v, v, gram, proj, base_dot, base_sq, scale, key_padding_mask)
    logits = logit_scale * cosine
    return logits if logit_bias is None else logits + logit_bias


def class_logits(
    q: Tensor, k: Tensor, v: Tensor, out_weight: Tensor, out_bias: Tensor | None, out_scale: Tensor,
    base: Tensor, video: Tensor, scale: float | None = None, key_padding_mask: Tensor | None = None,
    logit_scale: Tensor | float = 1.0, logit_bias: Tensor | float | None = None,
) -> Tensor:
    """Cosine logits of videos against classes after a text <- video attention (fused).

    ``logits[b,c] = logit_scale * <normalize(video[b]), normalize(t'[b,c])> + logit_bias``
    with ``t'[b,c] = base[c] + out_scale * (out_weight @ concat_h Attn(q[c,h], k[b,:,h], v[b,:,h]) + out_bias)``
    (the module docstring says how it is computed without ``[B, C, D]`` tensors).

    Args:
        q: ``[C, H, d]`` class queries (shared by the batch).
        k: ``[B, L, H, d]`` keys. v: ``[B, L, H, d]`` values.
        out_weight: ``[D, H d]`` output projection; out_bias: ``[D]`` or ``None``.
        out_scale: ``[D]`` per-channel scale of the attention branch (``alpha_t``).
        base: ``[C, D]`` residual base of the text side.
        video: ``[B, D]`` video embeddings (normalised here).
        scale: score scale; default ``1 / sqrt(d)``.
        key_padding_mask: optional bool ``[B, L]``; True marks a padded key.
        logit_scale, logit_bias: applied to the cosines (floats or tensors).

    Returns:
        ``[B, C]`` in the dtype of ``q`` (autocast's lower precision under autocast).
    """
    return class_logits_folded(fold_classes(q, base, out_weight, out_bias, out_scale), k, v, out_weight, out_scale,
                               video, scale, key_padding_mask, logit_scale, logit_bias)


# ---- argument checks --------------------------------------------------------------------

def _validate_classes(q, base, out_weight, out_bias, out_scale) -> None:
    _common.check_float_tensor("q", q, 3, "[C,H,d]")
    _common.check_float_tensor("base", base, 2, "[C,D]")
    _common.check_float_tensor("out_weight", out_weight, 2, "[D,H*d]")
    _common.check_float_tensor("out_scale", out_scale, 1, "[D]")
    tensors = {"q": q, "base": base, "out_weight": out_weight, "out_scale": out_scale}
    if out_bias is not None:
        _common.check_float_tensor("out_bias", out_bias, 1, "[D]")
        tensors["out_bias"] = out_bias
    _common.check_same("device", **tensors)
    _common.check_same("dtype", **tensors)
    classes, heads, head_dim = q.shape
    dim = out_weight.shape[0]
    if heads < 1 or head_dim < 1:
        raise ValueError(f"q must have H >= 1 heads of width d >= 1, got shape {tuple(q.shape)}")
    if out_weight.shape[1] != heads * head_dim:
        raise ValueError(f"out_weight must have shape [D,H*d] with H*d = {heads * head_dim} (from q), "
                         f"got {tuple(out_weight.shape)}")
    if tuple(base.shape) != (classes, dim):
        raise ValueError(f"base must have shape [C,D] = [{classes},{dim}] (C from q, D from out_weight), "
                         f"got {tuple(base.shape)}")
    for name, value in (("out_scale", out_scale), ("out_bias", out_bias)):
        if value is not None and tuple(value.shape) != (dim,):
            raise ValueError(f"{name} must have shape [D] = [{dim}], got {tuple(value.shape)}")


def _validate_videos(q, k, v, out_weight, out_scale, video, scale, key_padding_mask, dim: int) -> None:
    _common.check_float_tensor("k", k, 4, "[B,L,H,d]")
    _common.check_float_tensor("v", v, 4, "[B,L,H,d]")
    _common.check_float_tensor("video", video, 2, "[B,D]")
    _common.check_float_tensor("out_weight", out_weight, 2, "[D,H*d]")
    _common.check_float_tensor("out_scale", out_scale, 1, "[D]")
    tensors = {"q": q, "k": k, "v": v, "video": video, "out_weight": out_weight, "out_scale": out_scale}
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(key_padding_mask).__name__}")
        tensors["key_padding_mask"] = key_padding_mask
    _common.check_same("device", **tensors)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B,L,H,d], got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, keys, heads, head_dim = k.shape
    if tuple(q.shape[1:]) != (heads, head_dim):
        raise ValueError(f"q must have shape [C,H,d] with [H,d] = [{heads},{head_dim}] to match k, got {tuple(q.shape)}")
    if keys < 1:
        raise ValueError(f"k must have L >= 1 keys, got shape {tuple(k.shape)}")
    if tuple(out_weight.shape) != (dim, heads * head_dim) or tuple(out_scale.shape) != (dim,):
        raise ValueError(f"out_weight and out_scale must have shapes [D,H*d] = [{dim},{heads * head_dim}] and "
                         f"[D] = [{dim}] (D of the classes' fold), got {tuple(out_weight.shape)} and "
                         f"{tuple(out_scale.shape)}")
    if tuple(video.shape) != (batch, dim):
        raise ValueError(f"video must have shape [B,D] = [{batch},{dim}], got {tuple(video.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padded key), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, keys):
            raise ValueError(f"key_padding_mask must have shape [B,L] = [{batch},{keys}], "
                             f"got {tuple(key_padding_mask.shape)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite float or None, got {scale!r}")
