"""Backend selection (names, environment variable, context manager, fallbacks, errors, limits)
and the contract the registration keeps for every backend."""

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpfast import ops
from mpfast.ops import _registry, _spec
from mpfast.ops._registry import Backend, BackendUnavailableError, Limits, OpImpl
from mpfast.ops.temporal_diff import temporal_diff_backward_ref, temporal_diff_ref

ROOT = Path(__file__).resolve().parents[1]


def use_backend(monkeypatch, backend: Backend) -> None:
    """Puts ``backend`` in the registry for one test (and forgets the plans made without it)."""
    monkeypatch.setitem(_registry._BACKENDS, backend.name, backend)
    monkeypatch.setattr(_registry, "_plans", {})


def counting_backend(calls, limits=_registry.NO_LIMITS):
    """A ``cpp`` backend running the reference of temporal_diff, recording its calls."""

    def forward(x, strides, out):
        calls.append("forward")
        out.copy_(temporal_diff_ref(x, strides))

    def backward(grad, strides, grad_x):
        calls.append("backward")
        grad_x.copy_(temporal_diff_backward_ref(grad, strides))

    return Backend("cpp", ("cpu",), lambda: {"temporal_diff": OpImpl(forward, backward, limits)})


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
        use_backend(monkeypatch, Backend(name, ("cuda",), lambda name=name: loads.append(name) or {}))
    table = ops.available_backends("cuda")
    assert table["triton"] == table["cuda"] == "no CUDA device here (torch.cuda.is_available() is False)"
    assert loads == []  # nothing compiled or imported to say so


def test_named_backend_that_cannot_run_raises():
    with ops.backend("cuda"), pytest.raises(BackendUnavailableError, match="'cuda' cannot run temporal_diff.*cpu"):
        ops.temporal_diff(torch.randn(2, 3, 4), [1])


def test_named_backend_reports_loader_error(monkeypatch):
    use_backend(monkeypatch, failing_backend())
    with ops.backend("cpp"), pytest.raises(BackendUnavailableError, match="no compiler \\(test\\)"):
        ops.temporal_diff(torch.randn(2, 3, 4), [1])


def test_auto_falls_back_quietly_and_logs_once(monkeypatch, caplog):
    use_backend(monkeypatch, failing_backend("why not (test)"))
    monkeypatch.setattr(_registry, "_logged", set())
    x = torch.randn(2, 3, 4)
    with caplog.at_level(logging.INFO, logger="mpfast.ops"):
        for _ in range(3):
            torch.testing.assert_close(ops.temporal_diff(x, [1]), temporal_diff_ref(x, [1]))
    messages = [r.getMessage() for r in caplog.records if "temporal_diff" in r.getMessage()]
    assert len(messages) == 1 and "uses reference" in messages[0] and "why not (test)" in messages[0]


def test_environment_variable(monkeypatch):
    calls = []
    use_backend(monkeypatch, counting_backend(calls))
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
    use_backend(monkeypatch, counting_backend(calls))
    x = torch.randn(2, 5, 3, requires_grad=True)
    with ops.backend("cpp"):
        y = ops.temporal_diff(x, [1, 2])
    y.sum().backward()
    assert calls == ["forward", "backward"]


def test_limits_refuse_with_the_inputs_they_saw(monkeypatch):
    calls = []
    use_backend(monkeypatch, counting_backend(calls, Limits(dtypes=(torch.float32,))))
    with ops.backend("cpp"):
        ops.temporal_diff(torch.randn(2, 3, 4), [1])
        with pytest.raises(BackendUnavailableError, match=r"takes float32, not float64 \(inputs: x \[2, 3, 4\] "
                                                           r"float64 on cpu, strides=\[1\]\)"):
            ops.temporal_diff(torch.randn(2, 3, 4, dtype=torch.float64), [1])
    assert calls == ["forward"]


def test_size_limits_by_dtype_and_auto_falls_back(monkeypatch, caplog):
    from mpfast.ops.prompt_attention import SPEC

    limits = Limits(max_sizes={"head_dim": 8}, max_sizes_by_dtype={torch.float64: {"head_dim": 4}})
    impl = dataclasses.replace(_spec.reference_impl(SPEC), limits=limits)
    use_backend(monkeypatch, Backend("cpp", ("cpu",), lambda: {"prompt_attention": impl}))
    q, kv = torch.randn(3, 2, 6), torch.randn(1, 4, 2, 6)
    with ops.backend("cpp"):
        ops.prompt_attention(q, kv, kv)  # d=6 <= 8 in float32
        with pytest.raises(BackendUnavailableError, match="takes head_dim up to 4 for float64, got head_dim=6"):
            ops.prompt_attention(q.double(), kv.double(), kv.double())
    with ops.backend("cpp"), pytest.raises(BackendUnavailableError, match="takes head_dim up to 8, got head_dim=9"):
        ops.prompt_attention(torch.randn(3, 2, 9), torch.randn(1, 4, 2, 9), torch.randn(1, 4, 2, 9))
    with caplog.at_level(logging.INFO, logger="mpfast.ops"):  # auto: the reference runs instead
        out = ops.prompt_attention(q.double(), kv.double(), kv.double())
    torch.testing.assert_close(out, ops.prompt_attention_ref(q.double(), kv.double(), kv.double()))
    assert any("uses reference" in r.getMessage() and "head_dim=6" in r.getMessage() for r in caplog.records)


def test_backend_resolved_once_per_call(monkeypatch):
    """The forward chooses the backend; setup_context and the backward reuse its choice."""
    asked = []
    requested = _registry.requested_backend
    monkeypatch.setattr(_registry, "requested_backend", lambda: asked.append(1) or requested())
    for op, args in ((ops.temporal_diff, (torch.randn(2, 4, 3, requires_grad=True), [1, 2])),
                     (ops.motion_mix, (torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 2, 3, 4),
                                       torch.randn(2, 4))),
                     (ops.prompt_attention, (torch.randn(3, 2, 4, requires_grad=True), torch.randn(2, 5, 2, 4),
                                             torch.randn(2, 5, 2, 4)))):
        asked.clear()
        outputs = op(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        sum(o.sum() for o in outputs).backward()
        assert len(asked) == 1, op.__name__


def test_empty_problems_never_reach_a_backend(monkeypatch):
    """Every output empty: no backend call. Every incoming gradient empty: zero input gradients."""
    calls = []
    use_backend(monkeypatch, counting_backend(calls))
    x = torch.randn(0, 4, 3, requires_grad=True)
    with ops.backend("cpp"), _spec.poison_outputs():
        out = ops.temporal_diff(x, [1, 2])
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert out.shape == (0, 2, 4, 3) and grad.shape == x.shape and calls == []
    # motion_mix with no videos: the gate still gets a (zero) gradient [S, D]; the same
    # for the shared queries of prompt_attention.
    gate = torch.randn(2, 5, requires_grad=True)
    q = torch.randn(3, 2, 4, requires_grad=True)
    with _spec.poison_outputs():
        u, v, mu = ops.motion_mix(torch.randn(0, 3, 5), torch.randn(0, 2, 3, 5), gate)
        (grad_gate,) = torch.autograd.grad(u.sum() + v.sum() + mu.sum(), gate)
        no_videos = torch.randn(0, 5, 2, 4)
        (grad_q,) = torch.autograd.grad(ops.prompt_attention(q, no_videos, no_videos).sum(), q)
    assert torch.equal(grad_gate, torch.zeros(2, 5)) and torch.equal(grad_q, torch.zeros(3, 2, 4))


def _fresh_process(code: str, tmp_path, **env) -> str:
    env = {**os.environ, "MPFAST_CACHE_DIR": str(tmp_path / "cache"), "CUDA_HOME": "/usr/local/cuda", **env}
    env.pop("TORCH_EXTENSIONS_DIR", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_asking_never_builds(tmp_path):
    """A fresh process with nothing built: available_backends() and mpfast.info report
    "not built" and compile nothing (the cache stays empty, cpp_extension is never imported)."""
    code = (
        "import sys, mpfast, mpfast.info\n"
        "print(mpfast.ops.available_backends('cpu'))\n"
        "mpfast.info.main()\n"
        "print('cpp_extension imported:', 'torch.utils.cpp_extension' in sys.modules)\n"
    )
    out = _fresh_process(code, tmp_path)
    assert "'cpp': 'not built - run `mpfast build`" in out
    assert "cpp        not built - run `mpfast build`" in out
    assert "cpp_extension imported: False" in out
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_asking_says_when_a_backend_cannot_be_built(tmp_path):
    out = _fresh_process("import mpfast; print(mpfast.ops.available_backends('cpu')['cpp'])", tmp_path,
                         CXX="mpfast-no-such-compiler")
    assert "not built, and cannot be built here: no C++ compiler found" in out


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


# ---- a new op from a spec alone (what the fourth op will do) -----------------------

def _unit_rows_ref(x):
    """``x [N,D] -> (x / |x| per row, |x| [N])``: the norm is a result the backward reuses."""
    norm = x.norm(dim=-1)
    return x / norm[:, None], norm


def _unit_rows_backward_ref(grad_y, grad_norm, y, norm):
    return (grad_y - y * (grad_y * y).sum(-1, keepdim=True)) / norm[:, None] + grad_norm[:, None] * y


UNIT_ROWS = _spec.OpSpec(
    name="test_unit_rows",
    schema="(Tensor x) -> (Tensor y, Tensor norm)",
    outputs=lambda x: [(x.shape, x.dtype), (x.shape[:1], x.dtype)],
    grads=lambda grad_y, grad_norm, y, norm: [(y.shape, y.dtype)],
    differentiable=("x",),
    saved=("y", "norm"),
    reference=_unit_rows_ref,
    reference_backward=_unit_rows_backward_ref,
    flops=lambda x: 3 * x[0] * x[1],
)
unit_rows = _spec.register(UNIT_ROWS)


def test_an_op_from_a_spec_alone(monkeypatch):
    """Schema, fake, autograd with saved results, FLOPs and a filling backend, all from the spec."""
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(unit_rows, (x,))
    torch.autograd.gradcheck(lambda t: unit_rows(t), (x,))
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter:
        y, norm = unit_rows(x)
        (y.sum() + norm.sum()).backward()
    assert counter.get_total_flops() == 3 * 20 + 2 * 3 * 20

    seen = []

    def forward(x, y, norm):  # a fast backend: fills the outputs it is given
        seen.append(("forward", torch.isnan(y).all().item()))
        y_ref, norm_ref = _unit_rows_ref(x)
        y.copy_(y_ref)
        norm.copy_(norm_ref)

    def backward(grad_y, grad_norm, y, norm, grad_x):
        seen.append(("backward", torch.isnan(grad_x).all().item()))
        grad_x.copy_(_unit_rows_backward_ref(grad_y, grad_norm, y, norm))

    use_backend(monkeypatch, Backend("cpp", ("cpu",), lambda: {"test_unit_rows": OpImpl(forward, backward)}))
    with ops.backend("cpp"), _spec.poison_outputs():
        y, norm = unit_rows(x)
        (grad,) = torch.autograd.grad(y.sum() + norm.sum(), x)
    (want,) = torch.autograd.grad(sum(t.sum() for t in _unit_rows_ref(x)), x)
    torch.testing.assert_close(grad, want)
    assert seen == [("forward", True), ("backward", True)]  # outputs arrived poisoned, once each
