"""Shared pieces of the op modules' public functions: argument checks and autocast."""

from __future__ import annotations

from typing import Any

import torch

from ._registry import FLOAT_DTYPES

_FLOAT_DTYPES = frozenset(FLOAT_DTYPES)


def check_float_tensor(name: str, value: Any, ndim: int | tuple[int, ...] | None = None, shape: str = "") -> torch.Tensor:
    """Raises ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a float tensor of rank ``ndim``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions{' ' + shape if shape else ''}, got shape {tuple(value.shape)}")
    return value


def check_same(what: str, **tensors: torch.Tensor) -> None:
    """Raises ``ValueError`` unless all tensors share a device (``what="device"``) or dtype."""
    tensor_list = iter(tensors.values())
    first = getattr(next(tensor_list), what)
    if all(getattr(t, what) == first for t in tensor_list):
        return
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
    first = values[0] if isinstance(values[0], torch.Tensor) else next(
        (v for v in values if isinstance(v, torch.Tensor)), None)
    if first is None:
        return values
    device_type = first.device.type
    available = device_type in ("cuda", "cpu") or torch.amp.is_autocast_available(device_type)
    if not (available and torch.is_autocast_enabled(device_type)):
        return values
    dtype = dtype or torch.get_autocast_dtype(device_type)
    return tuple(
        v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64 else v
        for v in values
    )
