"""Triton kernels of the mpfast ops, importable as ``mpfast.kernels``.

Each op has one file here (``temporal_diff.py``, ``motion_mix.py``,
``prompt_attention.py``, ``class_logits.py``) holding its forward and backward kernels and launchers
``<op>_fwd(*args, *outputs)`` and ``<op>_bwd(*grads, *saved, *grad_inputs)``, which fill
the outputs they are given (the contract of :class:`mpfast.ops._registry.OpImpl`), and
``LIMITS`` when the kernels take less than every float dtype and size.
:func:`load_ops` finds them by name. Importing this package imports Triton but never
touches the GPU.
"""

from __future__ import annotations

import importlib
from typing import Iterable


def load_ops(op_names: Iterable[str]) -> dict:
    """``{op_name: OpImpl}`` of the ops among ``op_names`` that have Triton kernels here."""
    from mpfast.ops._registry import NO_LIMITS, OpImpl

    impls = {}
    for name in op_names:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        impls[name] = OpImpl(getattr(module, f"{name}_fwd"), getattr(module, f"{name}_bwd"),
                             getattr(module, "LIMITS", NO_LIMITS))
    return impls
