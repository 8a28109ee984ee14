import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfast.ops import prompt_attention, prompt_attention_ref
from mpfast.ops.prompt_attention import prompt_attention_backward_ref

from .helpers import DTYPES, compare_with_reference

# (B, C, L, H, d, shared queries, mask): B=1, one key, odd C/L/d, d=128, masked rows, C and L beyond one block.
CASES = [
    (2, 5, 4, 2, 8, True, None),
    (1, 1, 1, 1, 3, False, None),
    (3, 7, 6, 2, 17, True, "some"),
    (2, 33, 9, 3, 32, False, "some"),
    (2, 4, 5, 1, 128, True, "all_first"),
    (2, 70, 40, 2, 64, True, "some"),
    (2, 20, 100, 2, 24, True, "some"),  # several key blocks; grad of shared queries sums over B
    (1, 9, 100, 1, 16, False, "leading"),  # the first key blocks fully padded, later ones not
]


def make_mask(kind, batch, keys):
    if kind is None:
        return None
    if kind == "leading":
        return torch.arange(keys).expand(batch, keys) < 64
    mask = torch.rand(batch, keys) < 0.4
    mask[:, 0] = False
    if kind == "all_first":
        mask[0] = True
    return mask


def inputs(batch, classes, keys, heads, head_dim, shared, mask_kind):
    q_shape = (classes, heads, head_dim) if shared else (batch, classes, heads, head_dim)
    return [torch.randn(q_shape, dtype=torch.float64), torch.randn(batch, keys, heads, head_dim, dtype=torch.float64),
            torch.randn(batch, keys, heads, head_dim, dtype=torch.float64), None, make_mask(mask_kind, batch, keys)]


def loops(q, k, v, scale, mask):
    batch, keys, heads, head_dim = k.shape
    if q.ndim == 3:
        q = np.broadcast_to(q, (batch,) + q.shape)
    out = np.zeros(q.shape)
    for b in range(batch):
        for c in range(q.shape[1]):
            for h in range(heads):
                valid = [j for j in range(keys) if mask is None or not mask[b, j]]
                if not valid:
                    continue
                scores = np.array([q[b, c, h] @ k[b, j, h] * scale for j in valid])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, c, h] = sum(w * v[b, j, h] for w, j in zip(weights, valid))
    return out


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), classes=st.integers(1, 4), keys=st.integers(1, 5), heads=st.integers(1, 2),
       head_dim=st.integers(1, 5), shared=st.booleans(), masked=st.booleans())
def test_reference_matches_loops(batch, classes, keys, heads, head_dim, shared, masked):
    q, k, v, _, _ = inputs(batch, classes, keys, heads, head_dim, shared, None)
    mask = torch.rand(batch, keys) < 0.5 if masked else None
    scale = 1 / math.sqrt(head_dim)
    got = prompt_attention_ref(q, k, v, None, mask).numpy()
    want = loops(q.numpy(), k.numpy(), v.numpy(), scale, None if mask is None else mask.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), classes=st.integers(1, 4), keys=st.integers(1, 5), shared=st.booleans(),
       masked=st.booleans())
def test_reference_backward_matches_autograd(batch, classes, keys, shared, masked):
    q, k, v, _, _ = inputs(batch, classes, keys, 2, 3, shared, None)
    mask = torch.rand(batch, keys) < 0.5 if masked else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = prompt_attention_ref(q, k, v, 0.7, mask)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad)
    for got, want in zip(prompt_attention_backward_ref(grad, q, k, v, 0.7, mask), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, device, case, dtype):
    compare_with_reference(prompt_attention, prompt_attention_ref, inputs(*case), dtype, device)


@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_noncontiguous(backend, device, case):
    compare_with_reference(prompt_attention, prompt_attention_ref, inputs(*case), torch.float32, device,
                           make_noncontiguous=True)


@pytest.mark.parametrize("shared", [True, False])
def test_head_major_layouts(backend, device, shared):
    """Queries, keys and values stored head-major (``[B,H,L,d]``) and viewed as ``[B,L,H,d]``."""
    q_store = (2, 21, 5) if shared else (3, 2, 21, 5)
    leaves = [torch.randn(q_store, dtype=torch.float64, device=device, requires_grad=True),
              torch.randn(3, 2, 7, 5, dtype=torch.float64, device=device, requires_grad=True),
              torch.randn(3, 2, 7, 5, dtype=torch.float64, device=device, requires_grad=True)]
    mask = (torch.rand(3, 7) < 0.4).to(device)
    grad = torch.randn(3, 21, 2, 5, dtype=torch.float64, device=device)
    results = []
    for fn in (prompt_attention, prompt_attention_ref):
        q, k, v = (t.transpose(-3, -2) for t in leaves)
        out = fn(q, k, v, 0.6, mask)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_broadcast_keys_and_custom_scale(backend, device):
    """Keys shared by the batch through a stride-0 expand, as the video <- text attention passes them."""
    q = torch.randn(3, 1, 2, 8, device=device)
    k, v = torch.randn(2, 5, 2, 8, device=device), torch.randn(2, 5, 2, 8, device=device)
    k, v = k[:1].expand(3, 5, 2, 8), v[:1].expand(3, 5, 2, 8)
    torch.testing.assert_close(prompt_attention(q, k, v, 0.3), prompt_attention_ref(q, k, v, 0.3))


def test_broadcast_keys_gradients(backend, device):
    """The video <- text pattern: one query per video over class keys expanded (stride 0)
    over the batch, with gradients flowing back to the shared keys and values."""
    q = torch.randn(3, 1, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(7, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.randn(7, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    grad = torch.randn(3, 1, 2, 8, dtype=torch.float64, device=device)
    results = []
    for fn in (prompt_attention, prompt_attention_ref):
        out = fn(q, k.expand(3, 7, 2, 8), v.expand(3, 7, 2, 8), 0.4)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_expanded_grad_out(backend, device):
    """``out.sum()`` sends back a stride-0 (expanded) gradient."""
    q, k, v, _, mask = inputs(2, 5, 4, 2, 8, True, "some")
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    mask = mask.to(device)
    got = torch.autograd.grad(prompt_attention(q, k, v, None, mask).sum(), (q, k, v))
    want = torch.autograd.grad(prompt_attention_ref(q, k, v, None, mask).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_fully_padded_rows_are_zero_with_finite_grads(backend, device):
    q = torch.randn(4, 2, 8, device=device, requires_grad=True)
    k = torch.randn(2, 3, 2, 8, device=device, requires_grad=True)
    v = torch.randn(2, 3, 2, 8, device=device, requires_grad=True)
    mask = torch.tensor([[True, True, True], [False, True, False]], device=device)
    out = prompt_attention(q, k, v, key_padding_mask=mask)
    assert torch.count_nonzero(out[0]) == 0
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.count_nonzero(k.grad[0]) == 0 and torch.count_nonzero(v.grad[0]) == 0


def test_default_scale():
    q, k, v = torch.randn(3, 2, 16), torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16)
    torch.testing.assert_close(prompt_attention(q, k, v), prompt_attention_ref(q, k, v, 0.25))


def test_matches_sdpa():
    q, k, v = torch.randn(2, 6, 3, 8), torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    mask = torch.tensor([[False, False, True, False, True], [False] * 5])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=~mask[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(prompt_attention(q, k, v, key_padding_mask=mask), expected)


@pytest.mark.parametrize("shared", [True, False])
def test_opcheck(shared):
    q, k, v, _, _ = inputs(2, 3, 4, 2, 5, shared, None)
    mask = torch.tensor([[False, True, False, False], [True] * 4])
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.5)
    torch.library.opcheck(torch.ops.mpfast.prompt_attention.default, args + (mask,))
    torch.library.opcheck(torch.ops.mpfast.prompt_attention.default, args + (None,))


def _good():
    return torch.randn(5, 2, 4), torch.randn(3, 6, 2, 4), torch.randn(3, 6, 2, 4)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v: (q[0], k, v, None, None), ValueError, r"q must have 3 or 4 dimensions"),
        (lambda q, k, v: (q, k[0], v, None, None), ValueError, r"k must have 4 dimensions \[B,L,H,d\]"),
        (lambda q, k, v: (q, k, v[..., :3], None, None), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q[:, :1], k, v, None, None), ValueError, r"q must end in \[H,d\] = \[2,4\]"),
        (lambda q, k, v: (q.expand(2, 5, 2, 4), k, v, None, None), ValueError, "must have B = 3"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0], None, None), ValueError, "L >= 1"),
        (lambda q, k, v: (q.int(), k, v, None, None), TypeError, "q must have a floating dtype"),
        (lambda q, k, v: (q, k.half(), v, None, None), ValueError, "same dtype"),
        (lambda q, k, v: (q, k, v, None, torch.zeros(3, 6)), TypeError, "key_padding_mask must be a bool tensor"),
        (lambda q, k, v: (q, k, v, None, torch.zeros(3, 5, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \[B,L\] = \[3,6\]"),
        (lambda q, k, v: (q, k, v, None, [[False] * 6] * 3), TypeError, "key_padding_mask must be a bool torch.Tensor"),
        (lambda q, k, v: (q, k, v, "big", None), TypeError, "scale must be a finite float"),
        (lambda q, k, v: (q, k, v, float("nan"), None), TypeError, "scale must be a finite float"),
        (lambda q, k, v: (q, k.to("meta"), v, None, None), ValueError, "same device"),
    ],
)
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        prompt_attention(*change(*_good()))
