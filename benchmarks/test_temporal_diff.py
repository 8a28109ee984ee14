"""temporal_diff: every backend, eager and compiled reference, a plain copy of the same bytes."""

import pytest
import torch

from mpfast.ops import default_strides, temporal_diff, temporal_diff_ref
from mpfast.ops.temporal_diff import flops

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

# [B, T, *F]: a tiny input (the per-call overhead of the op path), CLS embeddings (the head),
# patch tokens, raw pixels.
if on_gpu():
    SHAPES = [(1, 2, 8), (32, 16, 512), (32, 16, 197, 768), (8, 16, 3, 224, 224)]
else:
    SHAPES = [(1, 2, 8), (32, 16, 512), (2, 8, 50, 256), (4, 16, 3, 224, 224)]


def _labels(shape, dtype, pass_):
    return labels("temporal_diff", shape_name(shape), dtype, pass_)


def _costs(shape, dtype, strides, backward: bool):
    out_shape = (shape[0], len(strides), *shape[1:])
    read_write = nbytes(shape, out_shape, dtype=dtype)  # read x, write out
    if backward:  # read grad [B,S,T,*F], write grad_x
        read_write += nbytes(out_shape, shape, dtype=dtype)
    return read_write, flops(shape, strides) * (3 if backward else 1)


@pytest.mark.parametrize("impl", impls())
@parametrize_cases("shape", SHAPES)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_temporal_diff(benchmark, impl, shape, dtype, pass_):
    device = bench_device()
    skip_unless_runnable(impl, device)
    strides = list(default_strides(shape[1]))
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=pass_ == "fwd+bwd")
    fn = call_for(impl, temporal_diff, temporal_diff_ref)
    if pass_ == "fwd":
        step = lambda: fn(x, strides)  # noqa: E731
    else:
        grad = torch.randn(shape[0], len(strides), *shape[1:], device=device, dtype=dtype)
        step = forward_backward(fn, [x], (x, strides), [grad])
    total_bytes, total_flops = _costs(shape, dtype, strides, pass_ == "fwd+bwd")
    run(benchmark, step, device, impl=impl, bytes=total_bytes, flops=total_flops, **_labels(shape, dtype, pass_))


@parametrize_cases("shape", SHAPES)
def test_temporal_diff_copy_baseline(benchmark, shape, dtype):
    strides = default_strides(shape[1])
    total_bytes, _ = _costs(shape, dtype, strides, False)
    copy_baseline(benchmark, bench_device(), dtype, total_bytes, **_labels(shape, dtype, "fwd"))
