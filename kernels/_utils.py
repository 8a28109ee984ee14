"""Pieces shared by the Triton launchers: accumulator dtypes, feature views, support checks."""

from __future__ import annotations

import functools
import math

import torch
import triton.language as tl

# float64 inputs accumulate in float64 (the test suite checks every backend in float64);
# float16, bfloat16 and float32 accumulate in float32.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Triton accumulator dtype for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """Torch dtype of fp32/fp64 workspaces for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flatten_features(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``t`` as ``[*t.shape[:lead], F]``: a view when the trailing dimensions collapse
    (contiguous, or any uniformly strided or expanded layout), else a contiguous copy."""
    shape = (*t.shape[:lead], math.prod(t.shape[lead:]))
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def device_reasons(**tensors: torch.Tensor | None) -> list[str]:
    """Reasons the Triton kernels cannot take these tensors (empty list: they can)."""
    present = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    reasons = []
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        reasons.append(f"triton needs every tensor on one device: {listing}")
    for name, t in present.items():
        if t.device.type not in ("cuda", "cpu"):
            reasons.append(f"triton cannot read {name} on {t.device}")
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"triton kernels take float16, bfloat16, float32 or float64; {name} is {t.dtype}")
    return reasons


@functools.lru_cache(maxsize=64)
def int_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int32 tensor of ``values`` on ``device``, made once per (values, device)."""
    return torch.tensor(values, dtype=torch.int32, device=device)
