"""The compiled backends (csrc/): argument checks in C++, build metadata, ``mpfast build``, CUDA compile.

Values and gradients of the ``cpp`` backend are tested by the op suites
(tests/test_<op>.py run every backend); here the raw operators are called directly, and
inputs whose feature strides differ from each other are checked against the reference.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpfast
from mpfast import cli
from mpfast.ops import (
    BackendUnavailableError,
    _backends,
    _spec,
    extension,
    motion_mix,
    motion_mix_ref,
    prompt_attention,
    prompt_attention_ref,
    temporal_diff_ref,
)
from mpfast.ops._registry import Backend
from mpfast.ops.extension import library as extension_library

from .conftest import runnable


@pytest.fixture(scope="module")
def ops():
    """``torch.ops.mpfast_cpp`` (compiled on first use)."""
    runnable("cpp", torch.device("cpu"))
    return torch.ops.mpfast_cpp


def _td(x=None, strides=(1, 2), out=None):
    x = torch.randn(2, 4, 3) if x is None else x
    out = torch.empty(x.shape[0], len(strides), *x.shape[1:], dtype=x.dtype) if out is None else out
    return x, list(strides), out


def _mm(h=None, m=None, gate=None):
    h = torch.randn(2, 3, 4) if h is None else h
    m = torch.randn(2, 2, 3, 4) if m is None else m
    gate = torch.randn(2, 4) if gate is None else gate
    return h, m, gate


def _mm_out(h, m, gate):
    return torch.empty(h.shape), torch.empty(h.shape[0], h.shape[2]), torch.empty(h.shape[0], h.shape[2])


def _pa(q=None, k=None, v=None, scale=0.5, mask=None, out=None):
    q = torch.randn(5, 2, 4) if q is None else q
    k = torch.randn(3, 6, 2, 4) if k is None else k
    v = torch.randn(3, 6, 2, 4) if v is None else v
    out = torch.empty(k.shape[0], *q.shape[-3:]) if out is None else out
    return q, k, v, scale, mask, out


def _pa_bwd(grad_out=None, grads=None, **kwargs):
    q, k, v, scale, mask, _ = _pa(**kwargs)
    grad_out = torch.randn(k.shape[0], *q.shape[-3:]) if grad_out is None else grad_out
    grads = [torch.empty(t.shape) for t in (q, k, v)] if grads is None else grads
    return grad_out, q, k, v, scale, mask, *grads


def _cl(out=None, mask=None, scale=0.5, **changed):
    """class_logits_fwd arguments: B=3, C=5, L=6, H=2, d=4 (``changed`` replaces inputs by name)."""
    inputs = dict(q=torch.randn(5, 2, 4), k=torch.randn(3, 6, 2, 4), base_v=torch.randn(5, 2, 4),
                  v=torch.randn(3, 6, 2, 4), gram=torch.randn(3, 12, 12), proj=torch.randn(3, 2, 6),
                  base_dot=torch.randn(3, 5), base_sq=torch.rand(5) + 1)
    inputs.update(changed)
    return (*inputs.values(), scale, mask, torch.empty(3, 5) if out is None else out)


def _cl_bwd(grad=None, grads=None, **changed):
    *inputs, scale, mask, _ = _cl(**changed)
    grads = [torch.empty(t.shape) for t in inputs] if grads is None else grads
    return (torch.randn(3, 5) if grad is None else grad), *inputs, scale, mask, *grads


meta = torch.device("meta")

# (operator, arguments, exception, message fragment)
BAD_INPUTS = [
    ("temporal_diff_fwd", lambda: _td(x=torch.ones(2, 4, 3, dtype=torch.int64),
                                      out=torch.empty(2, 2, 4, 3)), TypeError, "x must have dtype float16"),
    ("temporal_diff_fwd", lambda: _td(x=torch.ones(5), out=torch.empty(5)), ValueError, "x must have at least 2"),
    ("temporal_diff_fwd", lambda: _td(strides=()), ValueError, "strides must be a non-empty"),
    ("temporal_diff_fwd", lambda: _td(strides=(1, 0)), ValueError, "strides must be >= 1, got 0 at position 1"),
    ("temporal_diff_fwd", lambda: _td(out=torch.empty(2, 3, 4, 3)), ValueError, r"out must have shape \[2, 2, 4, 3\]"),
    ("temporal_diff_fwd", lambda: _td(out=torch.empty(2, 2, 4, 3, dtype=torch.float64)), TypeError,
     "out must have the dtype of the inputs"),
    ("temporal_diff_fwd", lambda: _td(out=torch.empty(2, 2, 3, 4).transpose(2, 3)), ValueError,
     "out must be contiguous"),
    ("temporal_diff_fwd", lambda: _td(x=torch.ones(2, 4, 3, device=meta), out=torch.empty(2, 2, 4, 3, device=meta)),
     ValueError, "x must be a CPU tensor, got a tensor on meta"),
    ("temporal_diff_fwd", lambda: _td(out=torch.empty(2, 2, 4, 3, device=meta)), ValueError,
     "out must be on the device of the inputs"),
    ("temporal_diff_bwd", lambda: (torch.randn(2, 3, 4, 5), [1, 2], torch.empty(2, 4, 5)), ValueError,
     "grad must have S = 2"),
    ("temporal_diff_bwd", lambda: (torch.randn(2, 2, 4, 5), [1, 2], torch.empty(2, 4, 6)), ValueError,
     r"grad_x must have shape \[2, 4, 5\]"),
    ("temporal_diff_bwd", lambda: (torch.randn(2, 2), [1, 2], torch.empty(2)), ValueError,
     "grad must have at least 3 dimensions"),
    ("motion_mix_fwd", lambda: (*_mm(h=torch.randn(3, 4)), *_mm_out(*_mm())), ValueError,
     r"h must have 3 dimensions \[B,T,D\]"),
    ("motion_mix_fwd", lambda: (*_mm(m=torch.randn(2, 2, 5, 4)), *_mm_out(*_mm())), ValueError, "m must have shape"),
    ("motion_mix_fwd", lambda: (*_mm(gate=torch.randn(3, 4)), *_mm_out(*_mm())), ValueError,
     r"gate must have shape \[S,D\] = \[2, 4\]"),
    ("motion_mix_fwd", lambda: (*_mm(m=torch.randn(2, 2, 3, 4, dtype=torch.float64)), *_mm_out(*_mm())), TypeError,
     "m must have the dtype of h"),
    ("motion_mix_fwd", lambda: (*_mm(h=torch.randn(2, 0, 4), m=torch.randn(2, 2, 0, 4)), torch.empty(2, 0, 4),
                                torch.empty(2, 4), torch.empty(2, 4)), ValueError, "T >= 1"),
    ("motion_mix_fwd", lambda: (*_mm(), torch.empty(2, 3, 4), torch.empty(2, 5), torch.empty(2, 4)), ValueError,
     r"v must have shape \[2, 4\]"),
    ("motion_mix_fwd", lambda: (*_mm(gate=torch.randn(2, 4, device=meta)), *_mm_out(*_mm())), ValueError,
     "gate must be a CPU tensor"),
    ("motion_mix_bwd", lambda: (torch.randn(2, 3, 5), torch.randn(2, 4), torch.randn(2, 4), *_mm(),
                                torch.empty(2, 3, 4), torch.empty(2, 2, 3, 4), torch.empty(2, 4)), ValueError,
     "grad_u must have the shape of h"),
    ("motion_mix_bwd", lambda: (torch.randn(2, 3, 4), torch.randn(4), torch.randn(2, 4), *_mm(),
                                torch.empty(2, 3, 4), torch.empty(2, 2, 3, 4), torch.empty(2, 4)), ValueError,
     r"grad_v must have shape \[B,D\]"),
    ("motion_mix_bwd", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4), *_mm(),
                                torch.empty(2, 3, 4), torch.empty(2, 2, 3, 4).half(), torch.empty(2, 4)), TypeError,
     "grad_m must have the dtype"),
    ("motion_mix_bwd", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4).bool(), *_mm(),
                                torch.empty(2, 3, 4), torch.empty(2, 2, 3, 4), torch.empty(2, 4)), TypeError,
     "grad_mu must have dtype float16"),
    ("prompt_attention_fwd", lambda: _pa(q=torch.randn(2, 4)), ValueError, "q must have 3 or 4 dimensions"),
    ("prompt_attention_fwd", lambda: _pa(v=torch.randn(3, 5, 2, 4)), ValueError, "k and v must have the same shape"),
    ("prompt_attention_fwd", lambda: _pa(q=torch.randn(5, 2, 3)), ValueError, r"q must end in \[H,d\] = \[2, 4\]"),
    ("prompt_attention_fwd", lambda: _pa(q=torch.randn(2, 5, 2, 4)), ValueError, "must have B = 3"),
    ("prompt_attention_fwd", lambda: _pa(k=torch.randn(3, 0, 2, 4), v=torch.randn(3, 0, 2, 4)), ValueError, "L >= 1"),
    ("prompt_attention_fwd", lambda: _pa(mask=torch.zeros(3, 6)), TypeError, "key_padding_mask must be a bool"),
    ("prompt_attention_fwd", lambda: _pa(mask=torch.zeros(3, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[B,L\] = \[3, 6\]"),
    ("prompt_attention_fwd", lambda: _pa(scale=float("nan")), ValueError, "scale must be finite"),
    ("prompt_attention_fwd", lambda: _pa(out=torch.empty(3, 5, 2, 5)), ValueError, r"out must have shape \[3, 5, 2, 4\]"),
    ("prompt_attention_fwd", lambda: _pa(k=torch.randn(3, 6, 2, 4).half()), TypeError, "k must have the dtype of q"),
    ("prompt_attention_fwd", lambda: _pa(mask=torch.zeros(3, 6, dtype=torch.bool, device=meta)), ValueError,
     "key_padding_mask must be on the device of q"),
    ("prompt_attention_bwd", lambda: _pa_bwd(grad_out=torch.randn(3, 5, 2, 3)), ValueError,
     r"grad_out must have shape \[B,C,H,d\] = \[3, 5, 2, 4\]"),
    ("prompt_attention_bwd", lambda: _pa_bwd(grads=[torch.empty(3, 5, 2, 4), torch.empty(3, 6, 2, 4),
                                                     torch.empty(3, 6, 2, 4)]), ValueError,
     r"grad_q must have shape \[5, 2, 4\]"),
    ("temporal_diff_fwd", lambda: _td(x=torch.randn(2, 4, 3).to_sparse()), TypeError,
     "x must be a strided \\(dense\\) tensor, got layout Sparse"),
    ("motion_mix_fwd", lambda: (*_mm(m=torch.randn(2, 0, 3, 4), gate=torch.randn(0, 4)), *_mm_out(*_mm())), ValueError,
     "S >= 1 streams, got T=3, S=0"),
    ("prompt_attention_fwd", lambda: _pa(mask=torch.zeros(3, 6, dtype=torch.bool).to_sparse()), TypeError,
     "key_padding_mask must be a strided"),
    ("temporal_diff_fwd", lambda: (lambda out: _td(x=out[:, 0], out=out))(torch.empty(2, 2, 4, 3)), ValueError,
     "output out must not share memory with input x"),
    ("temporal_diff_bwd", lambda: (lambda g: (g, [1, 2], g.view(-1)[:40].view(2, 4, 5)))(torch.randn(2, 2, 4, 5)),
     ValueError,
     "output grad_x must not share memory with input grad"),
    ("motion_mix_fwd", lambda: (lambda h, m, gate: (h, m, gate, h, *_mm_out(h, m, gate)[1:]))(*_mm()), ValueError,
     "output u must not share memory with input h"),
    ("motion_mix_fwd", lambda: (lambda v: (*_mm(), torch.empty(2, 3, 4), v, v))(torch.empty(2, 4)), ValueError,
     "output mu must not share memory with output v"),
    ("motion_mix_bwd", lambda: (lambda gu: (gu, torch.randn(2, 4), torch.randn(2, 4), *_mm(), gu, torch.empty(2, 2, 3, 4),
                                            torch.empty(2, 4)))(torch.randn(2, 3, 4)), ValueError,
     "output grad_h must not share memory with input grad_u"),
    ("prompt_attention_fwd", lambda: (lambda out: _pa(q=out[1], out=out))(torch.randn(3, 5, 2, 4)), ValueError,
     "output out must not share memory with input q"),
    ("prompt_attention_bwd", lambda: (lambda args: (*args[:8], args[3]))(_pa_bwd()), ValueError,
     "output grad_v must not share memory with input v"),
    ("class_logits_fwd", lambda: _cl(q=torch.randn(5, 8)), ValueError, r"q must have 3 dimensions \[C,H,d\]"),
    ("class_logits_fwd", lambda: _cl(q=torch.randn(5, 2, 3)), ValueError, r"q must have shape \[C,H,d\] = \[5, 2, 4\]"),
    ("class_logits_fwd", lambda: _cl(k=torch.randn(3, 0, 2, 4), v=torch.randn(3, 0, 2, 4)), ValueError, "L >= 1"),
    ("class_logits_fwd", lambda: _cl(gram=torch.randn(3, 12, 11)), ValueError,
     r"gram must have shape \[B,H\*L,H\*L\] = \[3, 12, 12\]"),
    ("class_logits_fwd", lambda: _cl(proj=torch.randn(3, 6, 2)), ValueError, r"proj must have shape \[B,H,L\]"),
    ("class_logits_fwd", lambda: _cl(base_sq=torch.rand(5).double()), TypeError, "base_sq must have the dtype of q"),
    ("class_logits_fwd", lambda: _cl(base_dot=torch.randn(3, 5, device=meta)), ValueError,
     "base_dot must be a CPU tensor"),
    ("class_logits_fwd", lambda: _cl(mask=torch.zeros(3, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[B,L\] = \[3, 6\]"),
    ("class_logits_fwd", lambda: _cl(scale=float("inf")), ValueError, "scale must be finite"),
    ("class_logits_fwd", lambda: _cl(out=torch.empty(5, 3)), ValueError, r"output cosine must have shape \[3, 5\]"),
    ("class_logits_fwd", lambda: (lambda out: _cl(out=out, base_dot=out))(torch.empty(3, 5)), ValueError,
     "output cosine must not share memory with input base_dot"),
    ("class_logits_bwd", lambda: _cl_bwd(grad=torch.randn(5, 3)), ValueError,
     r"grad_cosine must have shape \[B,C\] = \[3, 5\]"),
    ("class_logits_bwd", lambda: _cl_bwd(grads=[torch.empty(s) for s in ((5, 2, 4), (3, 6, 2, 4), (5, 2, 4), (3, 6, 2, 4),
                                                                          (3, 12, 12), (3, 6, 2), (3, 5), (5,))]),
     ValueError, r"output grad_proj must have shape \[3, 2, 6\]"),
    ("class_logits_bwd", lambda: (lambda args: (*args[:11], args[1], *args[12:]))(_cl_bwd()), ValueError,
     "output grad_q must not share memory with input q"),
]


@pytest.mark.parametrize("name,make_args,error,match", BAD_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input_raises(ops, name, make_args, error, match):
    with pytest.raises(error, match=match):
        getattr(ops, name)(*make_args())


def test_disjoint_parts_of_one_buffer_are_accepted(ops):
    """Inputs and outputs may live in one storage when their memory does not overlap."""
    buf = torch.randn(2 * 4 * 3 + 2 * 2 * 4 * 3)
    x, out = buf[:24].view(2, 4, 3), buf[24:].view(2, 2, 4, 3)
    ops.temporal_diff_fwd(x, [1, 2], out)
    torch.testing.assert_close(out, temporal_diff_ref(x, [1, 2]), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["temporal_diff_fwd", "motion_mix_fwd", "prompt_attention_fwd", "class_logits_fwd"])
def test_wrong_argument_types_raise(ops, name):
    with pytest.raises((TypeError, RuntimeError)):
        getattr(ops, name)(None, [1], None)


def test_outputs_written_in_place_through_registry(ops):
    """The cpp backend fills the outputs the registration allocates: poisoned outputs come back fully written."""
    x = torch.randn(2, 5, 3, 4).permute(0, 1, 3, 2)  # features not mergeable: strided rows
    with mpfast.ops.backend("cpp"), _spec.poison_outputs():
        out = mpfast.ops.temporal_diff(x, [1, 3])
    torch.testing.assert_close(out, temporal_diff_ref(x, [1, 3]), rtol=0, atol=0)


def test_expanded_gradient(ops):
    """Gradients that autograd expands with stride 0 (from a sum) are read in place."""
    x = torch.randn(3, 6, 7, requires_grad=True)
    with mpfast.ops.backend("cpp"):
        (grad,) = torch.autograd.grad(mpfast.ops.temporal_diff(x, [1, 2]).sum(), x)
    (want,) = torch.autograd.grad(temporal_diff_ref(x, [1, 2]).sum(), x)
    torch.testing.assert_close(grad, want)


def _strided(shape, step, requires_grad=True):
    """A float64 tensor of ``shape`` whose last dimension has stride ``step``."""
    t = torch.randn(*shape[:-1], shape[-1] * step, dtype=torch.float64)[..., ::step]
    return t.requires_grad_(requires_grad)


def _check_against_reference(op, ref, args, grads):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for fn, backend in ((op, "cpp"), (ref, None)):
        with mpfast.ops.backend(backend or "reference"):
            outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        results.append([o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grads)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_temporal_diff_strides_near_int64_max(ops):
    """A stride past the last frame gives zeros, however large (t + k must not overflow)."""
    x = _strided((2, 5, 3), 2)
    grads = [torch.randn(2, 3, 5, 3, dtype=torch.float64)]
    _check_against_reference(mpfast.ops.temporal_diff, temporal_diff_ref, (x, [2, 2**63 - 1, 2**40]), grads)


@pytest.mark.parametrize("steps", [(1, 2, 3, 2), (3, 1, 2, 1), (2, 3, 1, 3)], ids=str)
def test_motion_mix_inputs_with_different_feature_strides(ops, steps):
    """h, m, gate and grad_u each with its own element stride (unit and non-unit mixed)."""
    b, s, t, d = 3, 2, 5, 70
    h, m, gate = _strided((b, t, d), steps[0]), _strided((b, s, t, d), steps[1]), _strided((s, d), steps[2])
    grads = [_strided((b, t, d), steps[3], False), _strided((b, d), 2, False), torch.randn(b, d, dtype=torch.float64)]
    _check_against_reference(motion_mix, motion_mix_ref, (h, m, gate), grads)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-q", "per-video-q"])
@pytest.mark.parametrize("steps", [(1, 2, 3, 1), (2, 1, 1, 3)], ids=str)
def test_prompt_attention_inputs_with_different_feature_strides(ops, shared, steps):
    """q, k, v and grad_out each with its own element stride, over the dot-product and matmul paths."""
    b, l, h, d = 2, 7, 2, 20
    for c in (3, 40):
        q = _strided(((c,) if shared else (b, c)) + (h, d), steps[0])
        k, v = _strided((b, l, h, d), steps[1]), _strided((b, l, h, d), steps[2])
        mask = torch.zeros(l, b, dtype=torch.bool).t()
        mask[0, 2] = mask[1, 0] = True
        grads = [_strided((b, c, h, d), steps[3], False)]
        _check_against_reference(prompt_attention, prompt_attention_ref, (q, k, v, 0.3, mask), grads)


def test_metadata_beside_library(ops):
    library = extension.load("cpp")
    meta = json.loads(extension.metadata_path(library).read_text())
    assert meta["torch"] == torch.__version__
    assert meta["kind"] == "cpp" and meta["flags"]["cxx"] == extension.build_flags("cpp")["cxx"]


def _copy_library(tmp_path: Path, edit) -> Path:
    library = extension.load("cpp")
    folder = tmp_path / "_ext"
    folder.mkdir()
    copy = folder / library.name
    shutil.copy(library, copy)
    meta = json.loads(extension.metadata_path(library).read_text())
    edit(meta)
    if meta:
        extension.metadata_path(copy).write_text(json.dumps(meta))
    return copy


def test_library_for_another_torch_is_refused(ops, tmp_path, monkeypatch):
    copy = _copy_library(tmp_path, lambda meta: meta.update(torch="2.0.0"))
    expected = re.escape(f"was built for torch 2.0.0 but this is torch {torch.__version__}; rebuild it")
    with pytest.raises(BackendUnavailableError, match=expected):
        extension.check_metadata(copy, "cpp")
    # A prebuilt library (mpfast/_ext) is checked before it is loaded.
    monkeypatch.setattr(extension_library, "prebuilt_dir", lambda: copy.parent)
    monkeypatch.setattr(extension_library, "_loaded", {})
    with pytest.raises(BackendUnavailableError, match="built for torch 2.0.0.*pip install --no-build-isolation"):
        extension.load("cpp")


def test_library_without_metadata_is_refused(ops, tmp_path):
    copy = _copy_library(tmp_path, lambda meta: meta.clear())
    with pytest.raises(BackendUnavailableError, match="has no build metadata"):
        extension.check_metadata(copy, "cpp")


def test_missing_compiler_makes_backend_unavailable(tmp_path, monkeypatch):
    """No cached build and no compiler: the reason reaches the registry (and mpfast.info); auto falls back."""
    monkeypatch.setenv("MPFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "mpfast-no-such-compiler")
    monkeypatch.setattr(extension_library, "_loaded", {})
    monkeypatch.setattr(extension_library, "prebuilt_dir", lambda: tmp_path / "none")
    backend = Backend("cpp", ("cpu",), lambda: _backends._load_extension("cpp"))
    reason = backend.unavailable_reason("cpu")
    assert reason is not None and "no C++ compiler found" in reason and "mpfast-no-such-compiler" in reason
    assert not any(tmp_path.iterdir()), "nothing is built without a compiler"


def test_build_command_prints_where(ops, capsys):
    assert "mpfast.ops.extension" in cli.COMMAND_MODULES
    assert cli.main(["build", "--kind", "cpp"]) == 0
    printed = capsys.readouterr().out
    library = extension.load("cpp")
    assert f"cpp: {library}" in printed and str(extension.metadata_path(library)) in printed


def test_setup_build_needs_only_torch():
    """MPFAST_BUILD_EXT=1: setup.py lists the extension without importing mpfast (whose open_clip may be
    missing), and leaves no stand-in mpfast modules behind."""
    script = (
        "import runpy, sys, setuptools\n"
        "sys.modules['open_clip'] = None\n"
        "setuptools.setup = lambda **kw: print([e.name for e in kw['ext_modules']], sorted(kw['cmdclass']))\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
        "print(sorted(name for name in sys.modules if name.startswith('mpfast')))\n"
    )
    env = {**os.environ, "MPFAST_BUILD_EXT": "1", "MPFAST_BUILD_CUDA": "0"}
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-2:] == ["['mpfast._ext.mpfast_cpp'] ['build_ext']", "[]"]


def test_cuda_arch_flags(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert extension.cuda_arch_flags() == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0+PTX")
    assert extension.cuda_arch_flags() == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90,code=sm_90",
                                           "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm90")
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        extension.cuda_arch_flags()


@pytest.mark.slow
def test_cuda_sources_compile(tmp_path, monkeypatch):
    """Compiles every CUDA-build translation unit to an object file (no GPU needed; CI has nvcc)."""
    if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").is_file():
        monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    if extension.cuda_home() is None:
        pytest.skip("nvcc not found: set CUDA_HOME to a CUDA toolkit to compile the CUDA sources")
    commands = extension.cuda_object_commands(tmp_path)
    assert len(commands) == len(extension.sources("cuda"))
    jobs = max(1, min(len(commands), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), commands))
    failures = [f"{cmd[-3]}:\n{res.stderr[-4000:]}" for cmd, res in zip(commands, results) if res.returncode != 0]
    assert not failures, "CUDA compile errors:\n" + "\n".join(failures)
    assert all((tmp_path / (src.name + ".o")).stat().st_size > 0 for src in extension.sources("cuda"))
