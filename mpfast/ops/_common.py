"""Shared pieces of the op modules: input checks and backend dispatch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import _registry

_poison = False

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, value: Any, ndim: int | tuple[int, ...] | None = None, shape: str = "") -> torch.Tensor:
    """Raises ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a float tensor of rank ``ndim``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions{' ' + shape if shape else ''}, got shape {tuple(value.shape)}")
    return value


def check_same(what: str, **tensors: torch.Tensor) -> None:
    """Raises ``ValueError`` unless all tensors share a device (``what="device"``) or dtype."""
    values = {name: getattr(t, what) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        listing = ", ".join(f"{name} on {v}" if what == "device" else f"{name} is {v}" for name, v in values.items())
        raise ValueError(f"all inputs must have the same {what}: {listing}")


def autocast_inputs(dtype: torch.dtype | None, *values: Any) -> tuple:
    """Under autocast on the first tensor's device, the floating tensors among ``values`` cast.

    ``dtype`` is the dtype the op runs in under autocast (``None``: autocast's own
    lower-precision dtype). As autocast itself, float64 tensors are left alone; outside
    autocast, and for anything that is not a floating tensor, ``values`` come back
    unchanged (validation then rejects what is wrong).
    """
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if first is None:
        return values
    device_type = first.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return values
    dtype = dtype or torch.get_autocast_dtype(device_type)
    return tuple(
        v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64 else v
        for v in values
    )


def resolve(op: str, args: Sequence, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for these forward arguments now."""
    name, _ = _registry.resolve(op, _registry.requested_backend(), device.type, args)
    return name


def _contiguous(result):
    # Custom ops promise contiguous outputs (their fake implementations say so); a
    # backend that already returns contiguous tensors pays nothing here.
    if isinstance(result, torch.Tensor):
        return result.contiguous()
    return tuple(t.contiguous() for t in result)


def forward(op: str, args: Sequence, device: torch.device):
    """Runs the forward of ``op`` with the backend chosen for ``args``."""
    _, impl = _registry.resolve(op, _registry.requested_backend(), device.type, args)
    return _contiguous(impl.forward(*args))


def backward(op: str, backend_name: str, args: Sequence):
    """Runs the backward of ``op`` with the backend its forward resolved to."""
    return _contiguous(_registry.get_backend(backend_name).load()[op].backward(*args))


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Testing aid: inside the block, :func:`new_output` fills new outputs with NaN
    (``-1`` for integers), so an element a kernel fails to write shows up."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def new_output(shape: Sequence[int], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Allocates a kernel output (uninitialised, or poisoned under :func:`poison_outputs`).

    Every backend allocates its outputs here.
    """
    dtype = dtype or like.dtype
    if _poison:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=like.device)
    return torch.empty(tuple(shape), dtype=dtype, device=like.device)
