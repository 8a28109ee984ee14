"""Triton kernels of the mpfast ops, importable as ``mpfast.kernels``.

Each op has one file here (``temporal_diff.py``, ``motion_mix.py``,
``prompt_attention.py``) holding its forward and backward kernels and launchers.
:func:`load_ops` returns the launchers the ``triton`` backend registers. Importing
this package imports Triton but never touches the GPU.
"""

from __future__ import annotations


def load_ops() -> dict:
    """``{op_name: OpImpl}`` of the ops that have Triton kernels."""
    from mpfast.ops._registry import OpImpl

    from .motion_mix import motion_mix_bwd, motion_mix_fwd, motion_mix_supports
    from .prompt_attention import prompt_attention_bwd, prompt_attention_fwd, prompt_attention_supports
    from .temporal_diff import temporal_diff_bwd, temporal_diff_fwd, temporal_diff_supports

    return {
        "temporal_diff": OpImpl(temporal_diff_fwd, temporal_diff_bwd, temporal_diff_supports),
        "motion_mix": OpImpl(motion_mix_fwd, motion_mix_bwd, motion_mix_supports),
        "prompt_attention": OpImpl(prompt_attention_fwd, prompt_attention_bwd, prompt_attention_supports),
    }
