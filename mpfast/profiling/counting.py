"""Parameters and FLOPs of a MotionCLIP, counted twice by independent counters.

Two counters trace the same call:

* fvcore's ``FlopCountAnalysis`` (TorchScript trace). Its convention is the one papers
  print: **one multiply-add is one FLOP** ("fvcore-style", also called MACs).
* PyTorch's ``torch.utils.flop_counter.FlopCounterMode`` (dispatcher level). Its
  convention is **true FLOPs**: a multiply-add is two.

Both are told about every op that does the bulk of the arithmetic: fvcore gets handles
for ``scaled_dot_product_attention``, the fused ``_native_multi_head_attention`` (the
fast path ``nn.MultiheadAttention`` takes in eval mode under ``no_grad``) and the
mpfast ops (whose ``flops(...)`` functions are reused); FlopCounterMode gets
formulas for the CPU attention kernel, the fused attention and ``layer_norm`` (the mpfast
ops register theirs with ``register_flop_formula``). Without these, plain fvcore reports
135 instead of 141 GFLOPs for ViT-B/16 at 8 frames (it skips attention), and about 90
in eval mode under ``no_grad`` (whole attention blocks hidden in the fused op).

Convention for what is counted: matrix products, convolutions, attention, LayerNorm
(5 per element, fvcore's estimate) and the mpfast ops. Other element-wise work
(``add``, ``gelu``, ``softmax`` outside attention, RMSNorm, which reaches the
dispatcher as ``pow``/``mean``/``rsqrt``/``mul``...) is not counted by either counter;
every such op is listed by name in ``FlopCount.skipped`` so nothing disappears silently.

Matrix-type ops convert between the conventions by a factor 2; element-wise ops
(norms, ``temporal_diff``, ``motion_mix``) count one FLOP per arithmetic operation
in both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..data.transforms import preprocess_config
from ..ops import default_strides
from ..ops.class_logits import flops as class_logits_flops
from ..ops.motion_mix import flops as motion_mix_flops
from ..ops.prompt_attention import flops as prompt_attention_flops
from ..ops.temporal_diff import flops as temporal_diff_flops

logger = logging.getLogger("mpfast.profiling")

AGREEMENT_TOLERANCE = 0.01  # the two counters must agree within 1 %

# Ops that count one FLOP per arithmetic operation in both conventions (no multiply-add
# pairs to halve). Names as each counter reports them; everything else counts
# multiply-adds and converts by a factor 2.
_ELEMENTWISE_FVCORE = {
    "layer_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "upsample_nearest2d",
    "upsample_bilinear2d",
    "adaptive_avg_pool2d",
    "grid_sampler",
    "temporal_diff",
    "motion_mix",
}
_ELEMENTWISE_TORCH = {
    "native_layer_norm",
    "temporal_diff",
    "motion_mix",
    "temporal_diff_backward",
    "motion_mix_backward",
}

# Ops that move or view data and do no arithmetic: not reported as skipped.
_NO_ARITHMETIC = {
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "expand",
    "expand_as",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "cat",
    "stack",
    "unbind",
    "split",
    "split_with_sizes",
    "chunk",
    "clone",
    "copy_",
    "detach",
    "alias",
    "empty",
    "empty_like",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "new_empty",
    "new_zeros",
    "new_ones",
    "full",
    "full_like",
    "fill_",
    "zero_",
    "_to_copy",
    "to",
    "contiguous",
    "as_strided",
    "unflatten",
    "flatten",
    "lift_fresh",
    "index",
    "index_select",
    "gather",
    "masked_fill",
    "masked_fill_",
    "eq",
    "ne",
    "gt",
    "ge",
    "lt",
    "le",
    "logical_not",
    "bitwise_not",
    "all",
    "any",
    "arange",
    "_local_scalar_dense",
    "item",
    "size",
    "Int",
    "ScalarImplicit",
    "constant_pad_nd",
    "narrow",
    "repeat",
    "tile",
    "flip",
    "roll",
    "where",
}


def _short(name: str) -> str:
    """``aten::linear`` / ``aten.addmm.default`` / ``mpfast::prompt_attention`` -> bare op name."""
    name = name.replace("::", ".")
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] in ("default", "Tensor", "Scalar", "int", "dim", "Tensor_Scalar", "self"):
        parts = parts[:-1]
    return parts[-1] if len(parts) > 1 else parts[0]


def _convert(counts: Mapping[str, int], elementwise: set[str], factor: float) -> float:
    return sum(v if _short(op) in elementwise else v * factor for op, v in counts.items())


@dataclasses.dataclass
class FlopCount:
    """FLOPs of one call, from both counters.

    Attributes:
        fvcore: fvcore's total, fvcore-style (one multiply-add = one FLOP).
        true: FlopCounterMode's total, true FLOPs (a multiply-add = two).
        fvcore_by_op / true_by_op: per op, each in its counter's own convention.
        fvcore_by_module / true_by_module: per module (dotted name relative to the
            counted module; ``""`` is the whole call), each in its own convention.
        skipped: per counter (``"fvcore"``, ``"torch"``), ops that ran but that the
            counter did not count, with their number of calls.
    """

    fvcore: float
    true: float
    fvcore_by_op: dict[str, float]
    true_by_op: dict[str, float]
    fvcore_by_module: dict[str, float]
    true_by_module: dict[str, float]
    skipped: dict[str, dict[str, int]]

    @property
    def fvcore_as_true(self) -> float:
        """fvcore's count converted to true FLOPs."""
        return _convert(self.fvcore_by_op, _ELEMENTWISE_FVCORE, 2.0)

    @property
    def true_as_fvcore(self) -> float:
        """FlopCounterMode's count converted to the fvcore convention."""
        return _convert(self.true_by_op, _ELEMENTWISE_TORCH, 0.5)

    @property
    def disagreement(self) -> float:
        """Relative difference of the two counters, in the fvcore convention (0 when both are 0)."""
        a, b = self.fvcore, self.true_as_fvcore
        return abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) > 0 else 0.0

    def scaled(self, factor: float) -> "FlopCount":
        """Every count multiplied by ``factor`` (for costs exactly linear in a size)."""

        def scale(d):
            return {k: v * factor for k, v in d.items()}

        return FlopCount(
            self.fvcore * factor,
            self.true * factor,
            scale(self.fvcore_by_op),
            scale(self.true_by_op),
            scale(self.fvcore_by_module),
            scale(self.true_by_module),
            self.skipped,
        )

    def minus(self, other: "FlopCount") -> "FlopCount":
        """Difference of two counts of the same call at different sizes."""

        def sub(a, b):
            return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in set(a) | set(b)}

        return FlopCount(
            self.fvcore - other.fvcore,
            self.true - other.true,
            sub(self.fvcore_by_op, other.fvcore_by_op),
            sub(self.true_by_op, other.true_by_op),
            sub(self.fvcore_by_module, other.fvcore_by_module),
            sub(self.true_by_module, other.true_by_module),
            self.skipped,
        )

    def check_agreement(self, tolerance: float = AGREEMENT_TOLERANCE) -> None:
        """Raises ``RuntimeError`` with both numbers when the counters differ by more than ``tolerance``."""
        if self.disagreement > tolerance:
            raise RuntimeError(
                f"FLOP counters disagree by {100 * self.disagreement:.2f} % (> {100 * tolerance:.1f} %): "
                f"fvcore {self.fvcore:.6g}, FlopCounterMode {self.true:.6g} true = {self.true_as_fvcore:.6g} "
                f"fvcore-style; fvcore by op {self.fvcore_by_op}, torch by op {self.true_by_op}"
            )

    def to_dict(self, module_depth: int | None = None) -> dict:
        def depth_ok(name: str) -> bool:
            return module_depth is None or name.count(".") < module_depth or name == ""

        return {
            "fvcore_style": {"fvcore": self.fvcore, "flop_counter_mode": self.true_as_fvcore},
            "true_flops": {"fvcore": self.fvcore_as_true, "flop_counter_mode": self.true},
            "disagreement": self.disagreement,
            "fvcore_by_op": dict(sorted(self.fvcore_by_op.items())),
            "flop_counter_mode_by_op": dict(sorted(self.true_by_op.items())),
            "fvcore_by_module": {k: v for k, v in sorted(self.fvcore_by_module.items()) if v and depth_ok(k)},
            "flop_counter_mode_by_module": {k: v for k, v in sorted(self.true_by_module.items()) if v and depth_ok(k)},
            "skipped_ops": self.skipped,
        }


# ---------------------------------------------------------------- fvcore handles


def _jit_shape(value) -> list[int] | None:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _jit_constant(value) -> Any:
    """Value of a constant graph input (a list built from constants included)."""
    constant = value.toIValue()
    if constant is None and value.node().kind() == "prim::ListConstruct":
        return [_jit_constant(item) for item in value.node().inputs()]
    return constant


def _fvcore_sdpa(inputs, outputs) -> int:
    """``scaled_dot_product_attention(q[...,L,E], k[...,S,E], v[...,S,Ev])``: L*S*(E+Ev) multiply-adds per batch."""
    q, k, v = (_jit_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _mha_macs(query: Sequence[int], key: Sequence[int], embed_dim: int) -> int:
    # Fast path of nn.MultiheadAttention (batch first): in-projections, attention, out-projection.
    batch, queries, keys = query[0], query[-2], key[-2]
    projections = batch * (2 * queries + 2 * keys) * embed_dim * embed_dim
    attention = 2 * batch * queries * keys * embed_dim
    return projections + attention


def _fvcore_mha(inputs, outputs) -> int:
    query, key = _jit_shape(inputs[0]), _jit_shape(inputs[1])
    return _mha_macs(query, key, int(_jit_constant(inputs[3])))


def _fvcore_temporal_diff(inputs, outputs) -> int:
    return temporal_diff_flops(_jit_shape(inputs[0]), list(_jit_constant(inputs[1])))


def _fvcore_motion_mix(inputs, outputs) -> int:
    return motion_mix_flops(_jit_shape(inputs[0]), _jit_shape(inputs[1]))


def _fvcore_prompt_attention(inputs, outputs) -> int:
    # prompt_attention.flops counts true FLOPs of two matrix products: halve for multiply-adds.
    return prompt_attention_flops(_jit_shape(inputs[0]), _jit_shape(inputs[1])) // 2


def _fvcore_class_logits(inputs, outputs) -> int:
    # class_logits.flops counts true FLOPs (matrix-type work): halve for multiply-adds.
    return class_logits_flops(_jit_shape(inputs[0]), _jit_shape(inputs[1])) // 2


def _fvcore_handles() -> dict[str, Callable]:
    return {
        "mpfast::class_logits": _fvcore_class_logits,
        "aten::scaled_dot_product_attention": _fvcore_sdpa,
        "aten::_native_multi_head_attention": _fvcore_mha,
        "mpfast::temporal_diff": _fvcore_temporal_diff,
        "mpfast::motion_mix": _fvcore_motion_mix,
        "mpfast::prompt_attention": _fvcore_prompt_attention,
    }


# ------------------------------------------------------- FlopCounterMode formulas


def _torch_sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _torch_sdpa_cpu_backward(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _torch_mha(query_shape, key_shape, value_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:
    return 2 * _mha_macs(query_shape, key_shape, embed_dim)


def _torch_layer_norm(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    # Same estimate as fvcore's norm handle: 5 operations per element with an affine weight, else 4.
    return math.prod(input_shape) * (5 if weight_shape is not None else 4)


def _torch_formulas() -> dict:
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _torch_sdpa_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _torch_sdpa_cpu_backward,
        aten._native_multi_head_attention: _torch_mha,
        aten.native_layer_norm: _torch_layer_norm,
    }


class _OpRecorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher (name -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.packets: dict[str, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.calls[name] += 1
        self.packets[name] = func.overloadpacket
        return func(*args, **(kwargs or {}))


def _strip_root(name: str, root: str) -> str:
    if name == root:
        return ""
    return name[len(root) + 1 :] if name.startswith(root + ".") else name


@contextlib.contextmanager
def traceable_strides(module: nn.Module, num_frames: int) -> Iterator[None]:
    """Fixes MotionModelingBlocks' default strides to Python ints while tracing.

    Under ``torch.jit.trace`` a tensor's size is a tensor, so ``default_strides(T)``
    would pass tensors to ``temporal_diff``; the strides are the same numbers.
    """
    from ..model import MotionModelingBlock

    changed = []
    for sub in module.modules():
        if isinstance(sub, MotionModelingBlock) and sub.strides is None:
            sub.strides = default_strides(num_frames)
            changed.append(sub)
    try:
        yield
    finally:
        for sub in changed:
            sub.strides = None


def count_flops(module: nn.Module, inputs: tuple, num_frames: int | None = None) -> FlopCount:
    """Counts the FLOPs of ``module(*inputs)`` with fvcore and with FlopCounterMode.

    Args:
        module: the module to call (in its current train/eval mode; under ``no_grad``).
        inputs: positional tensor arguments.
        num_frames: frames per video, when ``module`` contains a MotionModelingBlock
            with default strides.

    Returns:
        Both counts, per op and per module, and the ops each counter skipped.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's imports use deprecated torch.jit APIs
        from fvcore.nn import FlopCountAnalysis

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(inputs, tuple):
        raise TypeError(f"inputs must be a tuple of tensors, got {type(inputs).__name__}")
    from ..ops import backend

    strides = traceable_strides(module, num_frames) if num_frames is not None else contextlib.nullcontext()
    # FLOPs depend on shapes only: the reference ops count the same and load no extension.
    with torch.no_grad(), backend("reference"), strides, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(module, inputs).set_op_handle(**_fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        fvcore_by_op = {_short(k): float(v) for k, v in analysis.by_operator().items() if v}
        fvcore_by_module = {k: float(v) for k, v in analysis.by_module().items() if v}
        fvcore_total = float(analysis.total())
        fvcore_skipped = {_short(k): int(v) for k, v in analysis.unsupported_ops().items()}

    counter = FlopCounterMode(depth=1000, display=False, custom_mapping=_torch_formulas())
    recorder = _OpRecorder()
    with torch.no_grad(), backend("reference"), counter, recorder:
        module(*inputs)
    counts = counter.get_flop_counts()
    root = type(module).__name__
    true_by_op: dict[str, float] = {}
    for op, flops in counts.get("Global", {}).items():
        if flops:
            true_by_op[_short(str(op))] = true_by_op.get(_short(str(op)), 0.0) + float(flops)
    true_by_module = {}
    for name, per_op in counts.items():
        if name != "Global":
            true_by_module[_strip_root(name, root)] = float(sum(per_op.values()))
    true_by_module.setdefault("", float(counter.get_total_flops()))
    registry = counter.flop_registry
    torch_skipped = {}
    for name, calls in sorted(recorder.calls.items()):
        packet = recorder.packets[name]
        if packet in registry or _short(name) in _NO_ARITHMETIC:
            continue
        if any(getattr(getattr(packet, o), "is_view", False) for o in packet.overloads()):
            continue
        torch_skipped[_short(name)] = calls
    fvcore_skipped = {k: v for k, v in sorted(fvcore_skipped.items()) if k not in _NO_ARITHMETIC}
    result = FlopCount(
        fvcore_total,
        float(counter.get_total_flops()),
        fvcore_by_op,
        true_by_op,
        fvcore_by_module,
        true_by_module,
        {"fvcore": fvcore_skipped, "torch": torch_skipped},
    )
    logger.info("counted %s: fvcore %.4g, FlopCounterMode %.4g true FLOPs", root, result.fvcore, result.true)
    return result


# ------------------------------------------------------------------ parameters


@dataclasses.dataclass
class ParameterCount:
    """Parameters of a model.

    Attributes:
        total: every parameter.
        trainable: parameters with ``requires_grad``.
        by_module: ``{name: (total, trainable)}`` for each module down to the depth asked.
    """

    total: int
    trainable: int
    by_module: dict[str, tuple[int, int]]

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "by_module": {k: {"total": t, "trainable": tr} for k, (t, tr) in self.by_module.items()},
        }


def count_parameters(model: nn.Module, depth: int = 2) -> ParameterCount:
    """Total, trainable and per-module parameter counts (shared parameters counted once).

    Args:
        model: any module.
        depth: modules named with up to ``depth`` dotted parts are listed (``"clip.visual"`` is 2).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    by_module: dict[str, tuple[int, int]] = {}
    for name, sub in model.named_modules():
        if not name or name.count(".") >= depth:
            continue
        params = list({id(p): p for p in sub.parameters()}.values())
        by_module[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParameterCount(total, trainable, by_module)


# ------------------------------------------------------- the parts of a MotionCLIP


class _FrameEncoder(nn.Module):
    """``video [B,T,3,H,W] -> [B,T,D]``: the frozen CLIP image tower alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, video: Tensor) -> Tensor:
        return self.model.encode_frames(video)


class _Head(nn.Module):
    """``frames [B,T,D], classes [C,D] -> logits [B,C]``: the trainable head alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, frames: Tensor, class_features: Tensor) -> Tensor:
        return self.model.forward_features(frames, class_features)


class _TextEncoder(nn.Module):
    """``tokens [C,N] -> [C,D]``: the frozen CLIP text tower alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model.clip.encode_text(tokens)


def _strip_model_prefix(count: FlopCount) -> FlopCount:
    # The wrapper calls a method of ``model`` (not its forward), so the root ("") holds
    # everything and "model" may miss what runs in that method itself: drop "model".
    def strip(d):
        return {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in d.items() if k != "model"}

    return dataclasses.replace(
        count,
        fvcore_by_module=strip(count.fvcore_by_module),
        true_by_module=strip(count.true_by_module),
    )


def _param(model: nn.Module) -> Tensor:
    return next(model.parameters())


def frame_encoder_flops(model: nn.Module, num_frames: int, batch: int = 1) -> FlopCount:
    """FLOPs of the frozen frame encoder on ``batch`` videos of ``num_frames`` frames."""
    p = _param(model)
    size = preprocess_config(model.clip)[0]
    video = torch.randn(batch, num_frames, 3, size, size, device=p.device, dtype=p.dtype)
    return _strip_model_prefix(count_flops(_FrameEncoder(model), (video,)))


def head_flops(model: nn.Module, num_frames: int, num_classes: int, batch: int = 1) -> FlopCount:
    """FLOPs of the head on random frame features ``[B,T,D]`` and class features ``[C,D]``."""
    for name, value in (("num_frames", num_frames), ("num_classes", num_classes), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    p = model.motion.gate
    frames = torch.randn(batch, num_frames, model.dim, device=p.device, dtype=p.dtype)
    classes = torch.randn(num_classes, model.dim, device=p.device, dtype=p.dtype)
    # Both counters see the class side (it is counted as per call; at inference MotionCLIP
    # caches it per class list).
    cache, model.cache_class_side = model.cache_class_side, False
    try:
        return _strip_model_prefix(count_flops(_Head(model), (frames, classes), num_frames=num_frames))
    finally:
        model.cache_class_side = cache


@dataclasses.dataclass
class HeadCost:
    """What the head costs, split by what it scales with.

    Attributes:
        per_video: added by each video of a batch (grows with C, T and L = K + T).
        per_call: paid once per forward call whatever the batch size (class-side
            projections of the class features, which depend only on the class list and
            the weights: at inference MotionCLIP caches them per class list, so a call
            with a cached list pays ``per_video`` alone).
        at_batch_one: the whole head at batch 1 with a new class list (``per_video + per_call``).
    """

    per_video: FlopCount
    per_call: FlopCount
    at_batch_one: FlopCount


def head_cost(model: nn.Module, num_frames: int, num_classes: int) -> HeadCost:
    """Counts the head at batch 1 and 2; the difference is the per-video cost."""
    one = head_flops(model, num_frames, num_classes, 1)
    two = head_flops(model, num_frames, num_classes, 2)
    per_video = two.minus(one)
    return HeadCost(per_video, one.minus(per_video), one)


def text_encoder_flops_per_class(model: nn.Module) -> FlopCount:
    """FLOPs of encoding one class prompt with the frozen text tower (one template).

    The text encoder runs once per class list and template (cached by
    ``MotionCLIP.encode_classes``); its cost is ``C x templates x`` this.
    """
    clip = model.clip
    context = int(getattr(clip, "context_length", 77))
    vocab = int(getattr(clip, "vocab_size", 49408))
    tokens = torch.randint(1, vocab, (1, context), device=_param(model).device)
    return _strip_model_prefix(count_flops(_TextEncoder(model), (tokens,)))
