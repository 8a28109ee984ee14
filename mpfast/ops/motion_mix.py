"""``motion_mix``: gated two-stream sum, temporal mean, L2 normalisation, motion mean.

``u_t = h_t + sum_s tanh(gate_s) * m_{s,t}``, ``v = normalize(mean_t u_t)``,
``mu = mean_{s,t} m_{s,t}``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common
from ._spec import OpSpec, register

EPS = 1e-12  # as torch.nn.functional.normalize


def motion_mix_ref(h: Tensor, m: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reference (the specification), differentiable by autograd.

    Args:
        h: ``[B,T,D]`` spatial stream. m: ``[B,S,T,D]`` motion streams. gate: ``[S,D]``.

    Returns:
        ``u [B,T,D]``, ``v [B,D]`` (unit L2 norm, or 0 for a zero mean), ``mu [B,D]``.
    """
    u = h + (torch.tanh(gate)[None, :, None, :] * m).sum(1)
    v = F.normalize(u.mean(1), dim=-1, eps=EPS)
    mu = m.mean(dim=(1, 2))
    return u, v, mu


def motion_mix_backward_ref(
    grad_u: Tensor, grad_v: Tensor, grad_mu: Tensor, h: Tensor, m: Tensor, gate: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference backward: returns ``(grad_h, grad_m, grad_gate)``; ``grad_gate`` sums over the batch."""
    num_streams, num_frames = m.shape[1], m.shape[2]
    a = torch.tanh(gate)
    pooled = h.mean(1) + (a[None] * m.mean(2)).sum(1)
    norm = pooled.norm(dim=-1, keepdim=True)
    v = pooled / norm.clamp_min(EPS)
    grad_pooled = torch.where(
        norm > EPS, (grad_v - v * (v * grad_v).sum(-1, keepdim=True)) / norm.clamp_min(EPS), grad_v / EPS
    )
    grad_h = grad_u + grad_pooled[:, None, :] / num_frames
    grad_m = a[None, :, None, :] * grad_h[:, None] + grad_mu[:, None, None, :] / (num_streams * num_frames)
    grad_gate = (1 - a * a) * torch.einsum("btd,bstd->sd", grad_h, m)
    return grad_h, grad_m, grad_gate


def flops(h_shape: Sequence[int], m_shape: Sequence[int]) -> int:
    """Forward arithmetic: gated sum (2 per motion element), means, norm and scaling."""
    batch, streams, frames, dim = m_shape
    mix = 2 * streams * frames * batch * dim  # multiply by tanh(gate) and add
    means = batch * frames * dim + batch * streams * frames * dim
    normalize = 3 * batch * dim  # square, add, divide
    return mix + means + normalize + streams * dim  # tanh of the gates


SPEC = OpSpec(
    name="motion_mix",
    schema="(Tensor h, Tensor m, Tensor gate) -> (Tensor u, Tensor v, Tensor mu)",
    outputs=lambda h, m, gate: [(h.shape, h.dtype), ((h.shape[0], h.shape[2]), h.dtype),  # u [B,T,D], v [B,D]
                                ((h.shape[0], h.shape[2]), h.dtype)],  # mu [B,D]
    differentiable=("h", "m", "gate"),
    saved=("h", "m", "gate"),
    reference=motion_mix_ref,
    reference_backward=motion_mix_backward_ref,
    flops=lambda h, m, gate: flops(h, m),
    sizes={"streams": lambda h, m, gate: m.shape[1]},
)
_op = register(SPEC)


def _validate(h: Tensor, m: Tensor, gate: Tensor) -> None:
    _common.check_float_tensor("h", h, 3, "[B,T,D]")
    _common.check_float_tensor("m", m, 4, "[B,S,T,D]")
    _common.check_float_tensor("gate", gate, 2, "[S,D]")
    _common.check_same("device", h=h, m=m, gate=gate)
    _common.check_same("dtype", h=h, m=m)
    batch, frames, dim = h.shape
    if m.shape[0] != batch or m.shape[2] != frames or m.shape[3] != dim:
        raise ValueError(f"m must have shape [B,S,T,D] = [{batch},S,{frames},{dim}] to match h, got {tuple(m.shape)}")
    if tuple(gate.shape) != (m.shape[1], dim):
        raise ValueError(f"gate must have shape [S,D] = [{m.shape[1]},{dim}], got {tuple(gate.shape)}")
    if frames < 1 or m.shape[1] < 1:
        raise ValueError(f"motion_mix needs T >= 1 frames and S >= 1 streams, got T={frames}, S={m.shape[1]}")


def motion_mix(h: Tensor, m: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mixes the spatial and motion streams and pools them, in one pass.

    Args:
        h: ``[B, T, D]`` spatial stream (frame features plus position).
        m: ``[B, S, T, D]`` motion streams, one per stride; same dtype as ``h``.
        gate: ``[S, D]`` gate logits; cast to ``h``'s dtype if it differs.

    Returns:
        ``(u, v, mu)``: mixed frames ``u = h + sum_s tanh(gate_s) * m_s`` ``[B, T, D]``;
        video embedding ``v = normalize(mean_t u)`` ``[B, D]``; motion descriptor
        ``mu = mean_{s,t} m`` ``[B, D]``.

    Under autocast it runs in float32 (a mean and a normalisation, like autocast's
    ``layer_norm``), whatever dtypes the two streams arrive in.
    """
    h, m, gate = _common.autocast_inputs(torch.float32, h, m, gate)
    _validate(h, m, gate)
    if gate.dtype != h.dtype:
        gate = gate.to(h.dtype)
    return _op(h, m, gate)
