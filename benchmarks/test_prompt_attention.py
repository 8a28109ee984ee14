"""prompt_attention: every backend, eager and compiled reference, forward and forward+backward."""

import pytest
import torch
import torch.nn.functional as F

from mpfast.ops import prompt_attention, prompt_attention_ref
from mpfast.ops.prompt_attention import flops

from ._harness import (
    bench_device,
    call_for,
    forward_backward,
    impls,
    labels,
    nbytes,
    on_gpu,
    parametrize_cases,
    run,
    skip_unless_runnable,
)

# (B, C, L, H, d, shared): a tiny problem (the per-call overhead of the op path); shared
# queries [C,H,d] (text <- video, L = K + T keys) and one query per video over the C
# classes (video <- text, keys broadcast from [C,H,d]).
if on_gpu():
    CASES = [(1, 2, 2, 1, 8, True), (32, 400, 16, 8, 64, True), (32, 400, 72, 8, 64, True),
             (32, 1, 400, 8, 64, False)]
else:
    CASES = [(1, 2, 2, 1, 8, True), (4, 51, 16, 8, 64, True), (4, 1, 51, 8, 64, False)]


def _name(case):
    b, c, keys, h, d, shared = case
    return f"B{b}-C{c}-L{keys}-H{h}-d{d}-{'shared' if shared else 'perbatch'}"


def _labels(case, dtype, pass_):
    return labels("prompt_attention", _name(case), dtype, pass_)


def _inputs(case, dtype, grad: bool):
    device = bench_device()
    b, c, keys, h, d, shared = case
    q = torch.randn(*((c, h, d) if shared else (b, c, h, d)), device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, keys, h, d, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, keys, h, d, device=device, dtype=dtype, requires_grad=grad)
    return q, k, v


def _bench(benchmark, fn, case, dtype, pass_, impl):
    """Times ``fn(q, k, v)`` (and its backward for ``fwd+bwd``) with the bytes and FLOPs of the op."""
    device = bench_device()
    b, c, keys, h, d, shared = case
    grad = pass_ == "fwd+bwd"
    q, k, v = _inputs(case, dtype, grad)
    out_shape = (b, c, h, d)
    total_bytes = nbytes(q, k, v) + nbytes(out_shape, dtype=dtype)
    total_flops = flops(q.shape, k.shape)
    if grad:  # read grad_out, q, k, v; write their gradients; twice the forward's matmul FLOPs
        step = forward_backward(fn, [q, k, v], (q, k, v), [torch.randn(out_shape, device=device, dtype=dtype)])
        total_bytes += nbytes(out_shape, dtype=dtype) + 2 * nbytes(q, k, v)
        total_flops *= 3
    else:
        step = lambda: fn(q, k, v)  # noqa: E731
    run(benchmark, step, device, impl=impl, bytes=total_bytes, flops=total_flops, **_labels(case, dtype, pass_))


@pytest.mark.parametrize("impl", impls())
@parametrize_cases("case", CASES, _name)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_prompt_attention(benchmark, impl, case, dtype, pass_):
    skip_unless_runnable(impl, bench_device())
    _bench(benchmark, call_for(impl, prompt_attention, prompt_attention_ref), case, dtype, pass_, impl)


@parametrize_cases("case", CASES, _name)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_prompt_attention_sdpa(benchmark, case, dtype, pass_):
    """``F.scaled_dot_product_attention`` on the same problem, shared queries expanded over the batch."""
    b, c, keys, h, d, shared = case

    def sdpa(q, k, v):  # [B, H, rows, d] views of the [B, rows, H, d] layout
        q = q.expand(b, c, h, d) if shared else q
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    _bench(benchmark, sdpa, case, dtype, pass_, "sdpa")
