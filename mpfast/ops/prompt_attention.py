"""``prompt_attention``: cross-attention of many queries over few keys.

Queries ``q`` (``[C,H,d]`` shared by the batch, or ``[B,C,H,d]``) attend over keys and
values ``[B,L,H,d]``; ``key_padding_mask[B,L]`` True marks a padded key (as in
``nn.MultiheadAttention``); a query whose keys are all padded gets zeros.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import _common
from ._spec import OpSpec, register


def _probabilities(q: Tensor, k: Tensor, scale: float, key_padding_mask: Tensor | None) -> Tensor:
    """Attention weights ``[B,H,C,L]``; rows with every key padded are all zero."""
    equation = "chd,blhd->bhcl" if q.dim() == 3 else "bchd,blhd->bhcl"
    scores = torch.einsum(equation, q, k) * scale
    if key_padding_mask is None:
        return torch.softmax(scores, dim=-1)
    padded = key_padding_mask[:, None, None, :]
    all_padded = key_padding_mask.all(dim=-1)[:, None, None, None]
    # Fully padded rows get finite scores so that neither p nor its gradient is NaN.
    scores = scores.masked_fill(padded, float("-inf")).masked_fill(all_padded, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(padded, 0.0)


def prompt_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Reference (the specification), differentiable by autograd. Returns ``[B,C,H,d]``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    p = _probabilities(q, k, scale, key_padding_mask)
    return torch.einsum("bhcl,blhd->bchd", p, v)


def prompt_attention_backward_ref(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, key_padding_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference backward: ``(grad_q, grad_k, grad_v)``; ``grad_q`` has ``q``'s shape (summed over B when shared)."""
    p = _probabilities(q, k, scale, key_padding_mask)
    grad_v = torch.einsum("bhcl,bchd->blhd", p, grad_out)
    grad_p = torch.einsum("bchd,blhd->bhcl", grad_out, v)
    grad_s = p * (grad_p - (p * grad_p).sum(-1, keepdim=True)) * scale
    grad_q = torch.einsum("bhcl,blhd->" + ("chd" if q.dim() == 3 else "bchd"), grad_s, k)
    grad_k = torch.einsum(("chd" if q.dim() == 3 else "bchd") + ",bhcl->blhd", q, grad_s)
    return grad_q, grad_k, grad_v


def flops(q_shape: Sequence[int], k_shape: Sequence[int]) -> int:
    """Matmul FLOPs of the forward (``q k^T`` and ``p v``), 2 per multiply-add."""
    batch, keys, heads, head_dim = k_shape
    return 4 * batch * heads * q_shape[-3] * keys * head_dim


SPEC = OpSpec(
    name="prompt_attention",
    schema="(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_padding_mask=None) -> Tensor out",
    outputs=lambda q, k, *_: [((k.shape[0], *q.shape[-3:]), q.dtype)],
    differentiable=("q", "k", "v"),
    saved=("q", "k", "v", "scale", "key_padding_mask"),
    reference=prompt_attention_ref,
    reference_backward=prompt_attention_backward_ref,
    flops=lambda q, k, *_: flops(q, k),  # the backward: twice (grad_v, grad_p, grad_q, grad_k; recompute not counted)
    sizes={"head_dim": lambda q, k, *_: k.shape[-1]},
)
_op = register(SPEC)


def _validate(q: Tensor, k: Tensor, v: Tensor, scale, key_padding_mask) -> None:
    _common.check_float_tensor("q", q, (3, 4), "[C,H,d] or [B,C,H,d]")
    _common.check_float_tensor("k", k, 4, "[B,L,H,d]")
    _common.check_float_tensor("v", v, 4, "[B,L,H,d]")
    tensors = {"q": q, "k": k, "v": v}
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(key_padding_mask).__name__}")
        tensors["key_padding_mask"] = key_padding_mask
    _common.check_same("device", **tensors)
    _common.check_same("dtype", q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B,L,H,d], got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, keys, heads, head_dim = k.shape
    if q.shape[-2:] != (heads, head_dim):
        raise ValueError(f"q must end in [H,d] = [{heads},{head_dim}] to match k, got shape {tuple(q.shape)}")
    if q.dim() == 4 and q.shape[0] != batch:
        raise ValueError(f"q of shape [B,C,H,d] must have B = {batch} as k, got {q.shape[0]}")
    if keys < 1 or head_dim < 1:
        raise ValueError(f"k must have L >= 1 keys and d >= 1, got shape {tuple(k.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padded key), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, keys):
            raise ValueError(f"key_padding_mask must have shape [B,L] = [{batch},{keys}], got {tuple(key_padding_mask.shape)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite float or None, got {scale!r}")


def prompt_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Multi-head cross-attention of many queries over few keys (projections outside).

    Args:
        q: ``[C, H, d]`` queries shared by every video (read without copying), or
            ``[B, C, H, d]``.
        k: ``[B, L, H, d]`` keys. v: ``[B, L, H, d]`` values; same dtype as ``q``.
        scale: score scale; default ``1 / sqrt(d)``.
        key_padding_mask: optional bool ``[B, L]``; True marks a padded key.

    Returns:
        ``[B, C, H, d]``; a query whose keys are all padded gets zeros.

    Under autocast, ``q``, ``k`` and ``v`` are cast to autocast's lower-precision dtype
    (as ``scaled_dot_product_attention`` is); accumulation stays in float32.
    """
    q, k, v = _common.autocast_inputs(None, q, k, v)
    _validate(q, k, v, scale, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _op(q, k, v, scale, key_padding_mask)
