"""Triton kernels of the mpfast ops, importable as ``mpfast.kernels``.

Each op has one file here (``temporal_diff.py``, ``motion_mix.py``,
``prompt_attention.py``) holding its forward and backward kernels and launchers.
:func:`load_ops` returns the launchers the ``triton`` backend registers.
"""

from __future__ import annotations


def load_ops() -> dict:
    """``{op_name: OpImpl}`` of the ops that have Triton kernels."""
    return {}
