import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfast.ops import default_strides, temporal_diff, temporal_diff_ref
from mpfast.ops.temporal_diff import temporal_diff_backward_ref

from .helpers import DTYPES, compare_with_reference

# (x shape, strides): B=1, T=1 and 2, strides >= T, odd feature sizes, patch-token and pixel layouts,
# features beyond one kernel block.
CASES = [
    ((2, 8, 16), (1, 4)),
    ((1, 1, 7), (1, 2)),
    ((3, 2, 5), (1, 3)),
    ((2, 5, 33), (1, 2, 4, 5, 9)),
    ((1, 6, 3, 5, 7), (2,)),
    ((2, 16, 1000), (1, 8)),
    ((1, 3, 2, 40, 60), (1, 2)),  # 4800 features: several feature blocks
]


def loops(x: np.ndarray, strides) -> np.ndarray:
    batch, frames = x.shape[:2]
    out = np.zeros((batch, len(strides)) + x.shape[1:])
    for b in range(batch):
        for s, k in enumerate(strides):
            for t in range(frames):
                if t + k < frames:
                    out[b, s, t] = x[b, t + k] - x[b, t]
    return out


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), frames=st.integers(1, 9), features=st.integers(1, 6),
       strides=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_reference_matches_loops(batch, frames, features, strides):
    x = torch.randn(batch, frames, features, dtype=torch.float64)
    np.testing.assert_array_equal(temporal_diff_ref(x, strides).numpy(), loops(x.numpy(), strides))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), frames=st.integers(1, 9), strides=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_reference_backward_matches_autograd(batch, frames, strides):
    x = torch.randn(batch, frames, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(batch, len(strides), frames, 3, dtype=torch.float64)
    (expected,) = torch.autograd.grad(temporal_diff_ref(x, strides), x, grad)
    torch.testing.assert_close(temporal_diff_backward_ref(grad, strides), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,strides", CASES, ids=str)
def test_matches_reference(backend, device, shape, strides, dtype):
    x = torch.randn(shape, dtype=torch.float64)
    compare_with_reference(temporal_diff, temporal_diff_ref, [x, strides], dtype, device)


@pytest.mark.parametrize("shape,strides", CASES[:4], ids=str)
def test_noncontiguous(backend, device, shape, strides):
    x = torch.randn(shape, dtype=torch.float64)
    compare_with_reference(temporal_diff, temporal_diff_ref, [x, strides], torch.float32, device, make_noncontiguous=True)


def test_transposed_input(backend, device):
    x = torch.randn(8, 3, 20, device=device).transpose(0, 1)  # [3, 8, 20], time stride 20, batch stride 160
    torch.testing.assert_close(temporal_diff(x, [1, 3]), temporal_diff_ref(x, [1, 3]))


def test_expanded_grad(backend, device):
    """``out.sum()`` sends back a stride-0 (expanded) gradient."""
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    (got,) = torch.autograd.grad(temporal_diff(x, [1, 4]).sum(), x)
    (want,) = torch.autograd.grad(temporal_diff_ref(x, [1, 4]).sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_default_strides():
    assert default_strides(8) == (1, 4)
    assert default_strides(16) == (1, 8)
    assert default_strides(1) == (1, 2)
    x = torch.randn(2, 8, 4)
    torch.testing.assert_close(temporal_diff(x), temporal_diff_ref(x, (1, 4)))


def test_static_video_has_no_motion(backend, device):
    x = torch.randn(2, 1, 6, device=device).expand(2, 7, 6)
    assert torch.count_nonzero(temporal_diff(x, [1, 3])) == 0


def test_strides_beyond_length_give_zeros(backend, device):
    x = torch.randn(2, 3, 4, device=device)
    out = temporal_diff(x, [3, 10])
    assert out.shape == (2, 2, 3, 4)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("strides", [[1, 2], [5]])
def test_opcheck(strides):
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mpfast.temporal_diff.default, (x, strides))


@pytest.mark.parametrize(
    "x,strides,error,match",
    [
        ([[1.0]], [1], TypeError, "x must be a torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.int64), [1], TypeError, "x must have a floating dtype"),
        (torch.ones(5), [1], ValueError, "x must have at least 2 dimensions"),
        (torch.ones(2, 3), [0], ValueError, "strides must be >= 1"),
        (torch.ones(2, 3), [-1, 2], ValueError, "strides must be >= 1"),
        (torch.ones(2, 3), [], TypeError, "strides must be a non-empty sequence"),
        (torch.ones(2, 3), 2, TypeError, "strides must be a non-empty sequence"),
        (torch.ones(2, 3), [1.5], TypeError, "strides must contain ints"),
        (torch.ones(2, 3), [True], TypeError, "strides must contain ints"),
    ],
)
def test_bad_input(x, strides, error, match):
    with pytest.raises(error, match=match):
        temporal_diff(x, strides)
