"""Backend selection: names, environment variable, context manager, fallbacks, errors."""

import logging

import pytest
import torch

from mpfast import ops
from mpfast.ops import _registry
from mpfast.ops._registry import Backend, BackendUnavailableError, OpImpl
from mpfast.ops.temporal_diff import temporal_diff_backward_ref, temporal_diff_ref


def counting_backend(calls):
    def forward(x, strides):
        calls.append("forward")
        return temporal_diff_ref(x, strides)

    def backward(grad, strides):
        calls.append("backward")
        return temporal_diff_backward_ref(grad, strides)

    return Backend("cpp", ("cpu",), lambda: {"temporal_diff": OpImpl(forward, backward)})


def failing_backend(reason="no compiler (test)"):
    def loader():
        raise BackendUnavailableError(reason)

    return Backend("cpp", ("cpu",), loader)


def test_available_backends_lists_every_backend_with_reasons():
    table = ops.available_backends("cpu")
    assert set(table) == {"reference", "triton", "cpp", "cuda"}
    assert table["reference"] is None
    assert "does not run on cpu" in table["cuda"]


def test_without_a_gpu_cuda_tensors_are_unavailable_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loads = []
    for name in ("triton", "cuda"):
        monkeypatch.setitem(_registry._BACKENDS, name,
                            Backend(name, ("cuda",), lambda name=name: loads.append(name) or {}))
    table = ops.available_backends("cuda")
    assert table["triton"] == table["cuda"] == "no CUDA device here (torch.cuda.is_available() is False)"
    assert loads == []  # nothing compiled or imported to say so


def test_named_backend_that_cannot_run_raises():
    with ops.backend("cuda"), pytest.raises(BackendUnavailableError, match="'cuda' cannot run temporal_diff.*cpu"):
        ops.temporal_diff(torch.randn(2, 3, 4), [1])


def test_named_backend_reports_loader_error(monkeypatch):
    monkeypatch.setitem(_registry._BACKENDS, "cpp", failing_backend())
    with ops.backend("cpp"), pytest.raises(BackendUnavailableError, match="no compiler \\(test\\)"):
        ops.temporal_diff(torch.randn(2, 3, 4), [1])


def test_auto_falls_back_quietly_and_logs_once(monkeypatch, caplog):
    monkeypatch.setitem(_registry._BACKENDS, "cpp", failing_backend("why not (test)"))
    monkeypatch.setattr(_registry, "_logged", set())
    x = torch.randn(2, 3, 4)
    with caplog.at_level(logging.INFO, logger="mpfast.ops"):
        for _ in range(3):
            torch.testing.assert_close(ops.temporal_diff(x, [1]), temporal_diff_ref(x, [1]))
    messages = [r.getMessage() for r in caplog.records if "temporal_diff" in r.getMessage()]
    assert len(messages) == 1 and "uses reference" in messages[0] and "why not (test)" in messages[0]


def test_environment_variable(monkeypatch):
    calls = []
    monkeypatch.setitem(_registry._BACKENDS, "cpp", counting_backend(calls))
    monkeypatch.setenv("MPFAST_BACKEND", "reference")
    ops.temporal_diff(torch.randn(2, 3, 4), [1])
    assert calls == []
    monkeypatch.setenv("MPFAST_BACKEND", "cpp")
    ops.temporal_diff(torch.randn(2, 3, 4), [1])
    assert calls == ["forward"]
    monkeypatch.setenv("MPFAST_BACKEND", "fast-please")
    with pytest.raises(ValueError, match="MPFAST_BACKEND must be one of"):
        ops.temporal_diff(torch.randn(2, 3, 4), [1])


def test_context_manager_wins_over_environment_and_restores(monkeypatch):
    monkeypatch.setenv("MPFAST_BACKEND", "cuda")
    with ops.backend("reference"):
        assert ops.requested_backend() == "reference"
        with ops.backend("auto"):
            assert ops.requested_backend() == "auto"
        assert ops.requested_backend() == "reference"
    assert ops.requested_backend() == "cuda"
    with pytest.raises(ValueError, match="backend name must be one of"):
        with ops.backend("fast"):
            pass


def test_backward_uses_the_forward_backend_after_the_block(monkeypatch):
    calls = []
    monkeypatch.setitem(_registry._BACKENDS, "cpp", counting_backend(calls))
    x = torch.randn(2, 5, 3, requires_grad=True)
    with ops.backend("cpp"):
        y = ops.temporal_diff(x, [1, 2])
    y.sum().backward()
    assert calls == ["forward", "backward"]


def test_supports_reasons_are_reported(monkeypatch):
    def supports(x, strides):
        return ["float64 is not supported (test)"] if x.dtype == torch.float64 else []

    impl = OpImpl(temporal_diff_ref, temporal_diff_backward_ref, supports)
    monkeypatch.setitem(_registry._BACKENDS, "cpp", Backend("cpp", ("cpu",), lambda: {"temporal_diff": impl}))
    with ops.backend("cpp"):
        ops.temporal_diff(torch.randn(2, 3, 4), [1])
        with pytest.raises(BackendUnavailableError, match="float64 is not supported"):
            ops.temporal_diff(torch.randn(2, 3, 4, dtype=torch.float64), [1])


def test_ops_compile_without_graph_breaks():
    """The custom ops are opaque to torch.compile: one graph, forward and backward."""

    def head(x, h, gate, q, k, v):
        d = ops.temporal_diff(x, [1, 2])
        u, vid, mu = ops.motion_mix(h, d, gate)
        return ops.prompt_attention(q, k, v).sum() + u.sum() + vid.sum() + mu.sum()

    args = [torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(3, 2, 4),
            torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 4)]
    args = [a.requires_grad_() for a in args]
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    expected = head(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, args), torch.autograd.grad(expected, args)):
        torch.testing.assert_close(g, e)


def test_ops_under_autocast_take_mixed_dtypes():
    # Under autocast, linear layers hand the ops bfloat16 next to float32 tensors.
    h, m, gate = torch.randn(2, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = ops.motion_mix(h, m.bfloat16(), gate)
    for got, want in zip(outputs, ops.motion_mix(h, m.bfloat16().float(), gate)):
        assert got.dtype == torch.float32  # normalisation runs in float32, as autocast's layer_norm
        torch.testing.assert_close(got, want)
    q, k, v = torch.randn(5, 2, 4), torch.randn(2, 3, 2, 4).bfloat16(), torch.randn(2, 3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.prompt_attention(q, k, v)
    assert out.dtype == torch.bfloat16  # like scaled_dot_product_attention under autocast
    torch.testing.assert_close(out, ops.prompt_attention(q.bfloat16(), k, v.bfloat16()))
    with pytest.raises(ValueError, match="same dtype"):  # outside autocast mixed dtypes stay an error
        ops.prompt_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as autocast does
        out = ops.prompt_attention(q.double(), k.double(), v.double())
    assert out.dtype == torch.float64
