"""motion_mix: every backend, eager and compiled reference, a plain copy of the same bytes."""

import pytest
import torch

from mpfast.ops import motion_mix, motion_mix_ref
from mpfast.ops.motion_mix import flops

from ._harness import (
    bench_device,
    call_for,
    copy_baseline,
    forward_backward,
    impls,
    labels,
    nbytes,
    on_gpu,
    parametrize_cases,
    run,
    shape_name,
    skip_unless_runnable,
)

# (B, S, T, D): a tiny input (the per-call overhead of the op path), the head's sizes and a
# large batch of wide features.
if on_gpu():
    SHAPES = [(1, 2, 2, 8), (32, 2, 8, 512), (32, 2, 16, 512), (1024, 2, 16, 768)]
else:
    SHAPES = [(1, 2, 2, 8), (32, 2, 16, 512), (64, 2, 16, 256)]


def _labels(shape, dtype, pass_):
    return labels("motion_mix", shape_name(shape), dtype, pass_)


def _costs(shape, dtype, backward: bool):
    b, s, t, d = shape
    h, m, gate, vec = (b, t, d), (b, s, t, d), (s, d), (b, d)
    total = nbytes(h, m, gate, h, vec, vec, dtype=dtype)  # read h, m, gate; write u, v, mu
    if backward:  # read grad_u, grad_v, grad_mu, h, m, gate; write grad_h, grad_m, grad_gate
        total += nbytes(h, vec, vec, h, m, gate, h, m, gate, dtype=dtype)
    return total, flops(h, m) * (3 if backward else 1)


@pytest.mark.parametrize("impl", impls())
@parametrize_cases("shape", SHAPES)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_motion_mix(benchmark, impl, shape, dtype, pass_):
    device = bench_device()
    skip_unless_runnable(impl, device)
    b, s, t, d = shape
    grad = pass_ == "fwd+bwd"
    h = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=grad)
    m = torch.randn(b, s, t, d, device=device, dtype=dtype, requires_grad=grad)
    gate = torch.randn(s, d, device=device, dtype=dtype, requires_grad=grad)
    fn = call_for(impl, motion_mix, motion_mix_ref)
    if grad:
        grads = [
            torch.randn(b, t, d, device=device, dtype=dtype),
            torch.randn(b, d, device=device, dtype=dtype),
            torch.randn(b, d, device=device, dtype=dtype),
        ]
        step = forward_backward(fn, [h, m, gate], (h, m, gate), grads)
    else:
        step = lambda: fn(h, m, gate)  # noqa: E731
    total_bytes, total_flops = _costs(shape, dtype, grad)
    run(benchmark, step, device, impl=impl, bytes=total_bytes, flops=total_flops, **_labels(shape, dtype, pass_))


@parametrize_cases("shape", SHAPES)
def test_motion_mix_copy_baseline(benchmark, shape, dtype):
    total_bytes, _ = _costs(shape, dtype, False)
    copy_baseline(benchmark, bench_device(), dtype, total_bytes, **_labels(shape, dtype, "fwd"))
