"""Pieces shared by the Triton launchers: accumulator dtypes, feature views, the device guard."""

from __future__ import annotations

import functools
import math
from typing import Callable, TypeVar

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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for Python ints. ``triton.cdiv`` and ``triton.next_power_of_2`` are
    wrapped for use inside kernels and cost about 2 us a call from Python: launchers use these."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


def flatten_features(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``t`` as ``[*t.shape[:lead], F]``: a view when the trailing dimensions collapse
    (contiguous, or any uniformly strided or expanded layout), else a contiguous copy."""
    if t.dim() == lead + 1:  # one feature dimension already (the common [B, T, D]): nothing to view
        return t
    shape = (*t.shape[:lead], math.prod(t.shape[lead:]))
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


Launcher = TypeVar("Launcher", bound=Callable)


def on_tensor_device(launcher: Launcher) -> Launcher:
    """Runs ``launcher`` with the CUDA device of its first argument current.

    Triton launches on the current device (and its current stream), so without this a
    tensor on ``cuda:1`` would be handed to a kernel running on ``cuda:0``. The guard is
    entered only when the tensor's device is not already the current one (one device query
    per call on CUDA, nothing for CPU tensors in interpreter mode).
    """

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args):
        device = first.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launcher(first, *args)
        return launcher(first, *args)

    return launch  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def int_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int32 tensor of ``values`` on ``device``, made once per (values, device)."""
    return torch.tensor(values, dtype=torch.int32, device=device)
