import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfast.ops import motion_mix, motion_mix_ref
from mpfast.ops.motion_mix import motion_mix_backward_ref

from .helpers import DTYPES, compare_with_reference

# (B, S, T, D): B=1, T=1 and 2, one stream, five streams, odd widths, widths beyond one block.
CASES = [(2, 2, 8, 16), (1, 2, 1, 7), (3, 1, 2, 5), (2, 3, 5, 33), (1, 2, 16, 1000), (3, 5, 3, 77)]


def inputs(batch, streams, frames, dim):
    return [torch.randn(batch, frames, dim, dtype=torch.float64), torch.randn(batch, streams, frames, dim, dtype=torch.float64),
            torch.randn(streams, dim, dtype=torch.float64)]


def loops(h, m, gate):
    batch, streams, frames, dim = m.shape
    u = h.copy()
    for s in range(streams):
        u += np.tanh(gate[s]) * m[:, s]
    pooled = u.sum(1) / frames
    v = pooled / np.maximum(np.sqrt((pooled**2).sum(-1, keepdims=True)), 1e-12)
    mu = m.sum((1, 2)) / (streams * frames)
    return u, v, mu


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), streams=st.integers(1, 3), frames=st.integers(1, 6), dim=st.integers(1, 9))
def test_reference_matches_loops(batch, streams, frames, dim):
    args = inputs(batch, streams, frames, dim)
    for got, want in zip(motion_mix_ref(*args), loops(*(a.numpy() for a in args))):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), streams=st.integers(1, 3), frames=st.integers(1, 6), dim=st.integers(1, 9))
def test_reference_backward_matches_autograd(batch, streams, frames, dim):
    args = [a.requires_grad_() for a in inputs(batch, streams, frames, dim)]
    outs = motion_mix_ref(*args)
    grads = [torch.randn_like(o) for o in outs]
    expected = torch.autograd.grad(outs, args, grads)
    for got, want in zip(motion_mix_backward_ref(*grads, *args), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, device, case, dtype):
    compare_with_reference(motion_mix, motion_mix_ref, inputs(*case), dtype, device)


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_noncontiguous(backend, device, case):
    compare_with_reference(motion_mix, motion_mix_ref, inputs(*case), torch.float32, device, make_noncontiguous=True)


def test_zero_mean_gives_zero_embedding(backend, device):
    h = torch.zeros(2, 4, 8, device=device, requires_grad=True)
    m = torch.zeros(2, 2, 4, 8, device=device, requires_grad=True)
    gate = torch.zeros(2, 8, device=device, requires_grad=True)
    u, v, mu = motion_mix(h, m, gate)
    assert torch.count_nonzero(v) == 0 and torch.count_nonzero(mu) == 0
    (u.sum() + v.sum() + mu.sum()).backward()
    for t in (h, m, gate):
        assert torch.isfinite(t.grad).all()


def test_permuted_layouts(backend, device):
    """Time-major ``h``, stride-major ``m`` and a transposed gate, viewed in the op's layout."""
    leaves = [torch.randn(4, 3, 19, dtype=torch.float64, device=device, requires_grad=True),
              torch.randn(3, 4, 2, 19, dtype=torch.float64, device=device, requires_grad=True),
              torch.randn(19, 2, dtype=torch.float64, device=device, requires_grad=True)]
    grads = [torch.randn(3, 4, 19, dtype=torch.float64, device=device), torch.randn(3, 19, dtype=torch.float64,
             device=device), torch.randn(3, 19, dtype=torch.float64, device=device)]
    results = []
    for fn in (motion_mix, motion_mix_ref):
        h, m, gate = leaves[0].transpose(0, 1), leaves[1].transpose(1, 2), leaves[2].t()
        outs = fn(h, m, gate)
        results.append((*outs, *torch.autograd.grad(outs, leaves, grads)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_expanded_grads(backend, device):
    """``.sum()`` of each output sends back stride-0 (expanded) gradients."""
    args = [a.to(device).requires_grad_() for a in inputs(3, 2, 4, 9)]
    got = torch.autograd.grad(sum(o.sum() for o in motion_mix(*args)), args)
    want = torch.autograd.grad(sum(o.sum() for o in motion_mix_ref(*args)), args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_gate_cast_to_input_dtype():
    h, m = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 2, 3, 4, dtype=torch.float64)
    gate = torch.randn(2, 4, dtype=torch.float32)
    u, _, _ = motion_mix(h, m, gate)
    assert u.dtype == torch.float64
    torch.testing.assert_close(u, motion_mix_ref(h, m, gate.double())[0])


def test_opcheck():
    args = [a.requires_grad_() for a in inputs(2, 2, 3, 5)]
    torch.library.opcheck(torch.ops.mpfast.motion_mix.default, tuple(args))


def _good():
    return torch.randn(2, 3, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 4)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda h, m, g: (h[0], m, g), ValueError, r"h must have 3 dimensions \[B,T,D\]"),
        (lambda h, m, g: (h, m[0], g), ValueError, r"m must have 4 dimensions \[B,S,T,D\]"),
        (lambda h, m, g: (h, m, g[0]), ValueError, r"gate must have 2 dimensions \[S,D\]"),
        (lambda h, m, g: (h.long(), m, g), TypeError, "h must have a floating dtype"),
        (lambda h, m, g: (h, m, g.bool()), TypeError, "gate must have a floating dtype"),
        (lambda h, m, g: (h, m.double(), g), ValueError, "same dtype: h is torch.float32, m is torch.float64"),
        (lambda h, m, g: (h, m[:, :, :2], g), ValueError, "m must have shape"),
        (lambda h, m, g: (h, m[:1], g), ValueError, "m must have shape"),
        (lambda h, m, g: (h, m, g[:1]), ValueError, r"gate must have shape \[S,D\] = \[2,4\]"),
        (lambda h, m, g: (h[:, :0], m[:, :, :0], g), ValueError, "T >= 1"),
        (lambda h, m, g: (h, m, g.to("meta")), ValueError, "same device"),
        (lambda h, m, g: (h.numpy(), m, g), TypeError, "h must be a torch.Tensor"),
    ],
)
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        motion_mix(*change(*_good()))
