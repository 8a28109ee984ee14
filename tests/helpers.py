"""Comparing an op (any backend) with its float64 reference, forward and backward."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

# Absolute floors added to the error bound, per dtype. For float64 the bound is
# atol + rtol * max|ref|; for lower precisions it is 2 x what PyTorch's own reference
# loses at that precision (measured in the same test) plus the floor (a test may count other
# PyTorch formulations of the result and rounding steps of its largest value: lowp_refs, ulps).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
RTOL64 = 1e-8
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def noncontiguous(t: Tensor) -> Tensor:
    """Same values, last dimension with stride 2 (and so not contiguous)."""
    big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    view = big[..., ::2]
    view.copy_(t)
    return view


def _prepare(arg, dtype: torch.dtype, device: torch.device, make_noncontiguous: bool):
    if not isinstance(arg, Tensor):
        return arg
    if not arg.is_floating_point():
        return arg.to(device)
    t = arg.detach().to(device=device, dtype=dtype)
    if make_noncontiguous:
        t = noncontiguous(t)
    return t.requires_grad_()


def _outputs_and_grads(fn: Callable, args: Sequence, grad_outputs: Sequence[Tensor]):
    outputs = fn(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    leaves = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    grads = torch.autograd.grad(outputs, leaves, [g.to(outputs[0].dtype) for g in grad_outputs])
    return [o.detach() for o in outputs], [g.detach() for g in grads]


def _max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def compare_with_reference(op: Callable, ref: Callable, args: Sequence, dtype: torch.dtype, device: torch.device,
                           make_noncontiguous: bool = False, lowp_refs: Sequence[Callable] = (),
                           ulps: float = 0.0) -> None:
    """Asserts that ``op`` matches ``ref`` (computed in float64) in values and gradients.

    Args:
        op: the public op under the backend being tested.
        ref: the reference implementation (plain PyTorch, autograd for gradients).
        args: arguments; float tensors (float64, CPU) are cast to ``dtype`` and become
            differentiable, other values pass through.
        make_noncontiguous: feed ``op`` non-contiguous copies of the float tensors.
        lowp_refs: more PyTorch computations of the same result (another formulation of
            it) whose error at ``dtype`` also counts as "what PyTorch gets" in the bound
            below float64 (the largest error of ``ref`` and these is taken).
        ulps: below float64, rounding steps of ``dtype`` at the largest reference value
            added to the bound (``ulps * eps * max|ref|``): a tensor of a few elements can
            see PyTorch's own error fall well below one rounding step by luck.
    """
    args64 = [_prepare(a, torch.float64, device, False) for a in args]
    outs64 = ref(*args64)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    grad_outputs = [torch.randn_like(o) for o in outs64]
    ref_out, ref_grads = _outputs_and_grads(ref, args64, grad_outputs)

    lowp_args = [_prepare(a, dtype, device, make_noncontiguous) for a in args]
    out, grads = _outputs_and_grads(op, lowp_args, grad_outputs)
    if dtype != torch.float64:
        lowp = [sum(_outputs_and_grads(fn, [_prepare(a, dtype, device, False) for a in args], grad_outputs), [])
                for fn in (ref, *lowp_refs)]
    names = [f"output {i}" for i in range(len(out))] + [f"grad {i}" for i in range(len(grads))]
    for i, (name, got, want) in enumerate(zip(names, out + grads, ref_out + ref_grads)):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        err = _max_err(got, want)
        largest = want.abs().max().item() if want.numel() else 0.0
        if dtype == torch.float64:
            bound = ATOL[dtype] + RTOL64 * largest
        else:
            torch_err = max(_max_err(results[i], want) for results in lowp)
            bound = 2 * torch_err + ATOL[dtype] + ulps * torch.finfo(dtype).eps * largest
        assert err <= bound, f"{name} ({dtype}): max error {err:.3g} > bound {bound:.3g}"
