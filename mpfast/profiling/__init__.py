"""Parameters, FLOPs and speed of MotionCLIP: ``mpfast report`` and the budgets."""

from .counting import (
    FlopCount,
    HeadCost,
    ParameterCount,
    count_flops,
    count_parameters,
    frame_encoder_flops,
    head_cost,
    head_flops,
    text_encoder_flops_per_class,
)

__all__ = [
    "FlopCount",
    "HeadCost",
    "ParameterCount",
    "count_flops",
    "count_parameters",
    "frame_encoder_flops",
    "head_cost",
    "head_flops",
    "text_encoder_flops_per_class",
]
