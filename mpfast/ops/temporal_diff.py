"""``temporal_diff``: multi-stride frame differencing.

``out[b, s, t] = x[b, t + k_s] - x[b, t]`` where ``t + k_s < T``, else 0, for any trailing
feature shape (CLS embeddings ``[B,T,D]``, patch tokens ``[B,T,N,D]``, pixels
``[B,T,3,H,W]``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import _common
from ._spec import OpSpec, register


def default_strides(num_frames: int) -> tuple[int, int]:
    """Short- and long-term strides ``(1, max(2, T // 2))``."""
    return (1, max(2, num_frames // 2))


def temporal_diff_ref(x: Tensor, strides: Sequence[int]) -> Tensor:
    """Reference (the specification): ``[B,T,*F] -> [B,S,T,*F]``, differentiable by autograd."""
    num_frames = x.shape[1]
    outs = []
    for k in strides:
        valid = max(num_frames - k, 0)
        padding = x.new_zeros((x.shape[0], num_frames - valid, *x.shape[2:]))
        outs.append(torch.cat([x[:, k:] - x[:, :valid], padding], dim=1))
    return torch.stack(outs, dim=1)


def temporal_diff_backward_ref(grad: Tensor, strides: Sequence[int]) -> Tensor:
    """Reference backward: ``grad[B,S,T,*F] -> grad_x[B,T,*F]``."""
    num_frames = grad.shape[2]
    grad_x = torch.zeros_like(grad[:, 0])
    for s, k in enumerate(strides):
        if k < num_frames:
            g = grad[:, s, : num_frames - k]
            grad_x[:, k:] += g
            grad_x[:, : num_frames - k] -= g
    return grad_x


def _validate(x: Tensor, strides) -> list[int]:
    _common.check_float_tensor("x", x, shape="")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [B,T,*F], got shape {tuple(x.shape)}")
    is_sequence = type(strides) in (list, tuple) or (not isinstance(strides, int) and isinstance(strides, Sequence))
    if not is_sequence or len(strides) == 0:
        raise TypeError(f"strides must be a non-empty sequence of ints, got {strides!r}")
    for k in strides:
        if type(k) is not int and (isinstance(k, bool) or not isinstance(k, int)):
            raise TypeError(f"strides must contain ints, got {k!r} in {strides!r}")
        if k < 1:
            raise ValueError(f"strides must be >= 1, got {k} in {list(strides)}")
    return [int(k) for k in strides]


def flops(x_shape: Sequence[int], strides: Sequence[int]) -> int:
    """Subtractions done by the forward: one per valid output element."""
    batch, frames, features = x_shape[0], x_shape[1], math.prod(x_shape[2:])
    return sum(max(frames - k, 0) for k in strides) * batch * features


SPEC = OpSpec(
    name="temporal_diff",
    schema="(Tensor x, SymInt[] strides) -> Tensor out",
    outputs=lambda x, strides: [((x.shape[0], len(strides), *x.shape[1:]), x.dtype)],
    grads=lambda grad, strides: [((grad.shape[0], *grad.shape[2:]), grad.dtype)],
    differentiable=("x",),
    saved=("strides",),
    reference=temporal_diff_ref,
    reference_backward=temporal_diff_backward_ref,
    flops=flops,
)
_op = register(SPEC)


def temporal_diff(x: Tensor, strides: Sequence[int] | None = None) -> Tensor:
    """Multi-stride temporal differences of a frame sequence.

    Args:
        x: ``[B, T, *F]`` float tensor (any trailing feature shape, any strides).
        strides: frame offsets ``k_1..k_S``, each >= 1; a stride >= T gives zeros.
            Default ``(1, max(2, T // 2))``.

    Returns:
        ``[B, S, T, *F]`` with ``out[:, s, t] = x[:, t + k_s] - x[:, t]`` where
        ``t + k_s < T`` and 0 elsewhere.
    """
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and strides is None:
        strides = default_strides(x.shape[1])
    return _op(x, _validate(x, strides))
