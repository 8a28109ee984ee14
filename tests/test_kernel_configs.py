"""Launch heuristics of the Triton kernels: their choices, the paths they take only at
large sizes (exercised here at small sizes by lowering the thresholds), and what the
kernels compile to for sm_90 with the specialisation a real launch gets (no GPU needed).

The op suites (``tests/test_<op>.py``) check every kernel against the reference at the
sizes users pass; at those sizes some tiling paths never run (a width wider than one
block, several key blocks in the attention backward). The compile check builds the
benchmark-size launches the way ``JITFunction.run`` would on an H100/H200 (16-byte aligned
pointers, sizes divisible by 16 marked so) and reads the vector width of the memory
accesses and the spills from the PTX and cubin: what decides the bandwidth of a
memory-bound kernel and what the interpreter cannot show.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpfast import ops
from mpfast.ops import _spec
from mpfast.ops import motion_mix_ref, prompt_attention_ref, temporal_diff_ref

from .helpers import DTYPES, compare_with_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def triton_kernels(device):
    """The Triton kernel modules, with the triton backend selected and outputs poisoned
    (skips where the backend cannot run)."""
    reason = ops.available_backends(device.type)["triton"]
    if reason is not None:
        pytest.skip(reason)
    from mpfast.kernels import motion_mix, prompt_attention, temporal_diff

    with ops.backend("triton"), _spec.poison_outputs():
        yield temporal_diff, motion_mix, prompt_attention


# ---- the heuristics' choices --------------------------------------------------------------

def test_temporal_diff_config_moves_sixteen_elements_per_thread():
    from mpfast.kernels.temporal_diff import ELEMENTS_PER_THREAD, MAX_BLOCK_F, _launch_config

    assert _launch_config(197 * 768) == (MAX_BLOCK_F, 8)  # patch tokens: 4096-wide blocks, 8 warps
    assert _launch_config(512) == (512, 1)
    assert _launch_config(1) == (1, 1)
    for features in (1, 7, 100, 512, 1000, 4096, 4097, 150528):
        block, warps = _launch_config(features)
        assert block == min(triton_next_pow2(features), MAX_BLOCK_F)
        assert block >= min(features, MAX_BLOCK_F)
        assert 1 <= warps <= 8 and warps * 32 * ELEMENTS_PER_THREAD <= max(block, 32 * ELEMENTS_PER_THREAD)


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def test_launchers_integer_helpers_match_tritons():
    """The launchers' plain-Python cdiv / next_power_of_2 (Triton's cost about 2 us a call from Python)."""
    triton = pytest.importorskip("triton")
    from mpfast.kernels._utils import cdiv, next_power_of_2

    for n in (*range(1, 300), 4095, 4096, 4097, 150528, 2**31 + 1):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 16, 64, 100):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("streams,dim", [(1, 512), (2, 512), (2, 768), (2, 1024), (2, 1280), (1, 64), (2, 33)])
def test_motion_mix_config_keeps_frames_and_streams_inside_a_thread(streams, dim, itemsize):
    """One or two streams: warps split only the width (each covers 32 threads x 16 bytes),
    so the sums over frames and streams need no shared memory; each loop step loads about
    ELEMENTS_PER_THREAD elements per thread (or one frame)."""
    from mpfast.kernels import motion_mix as mm

    block_t, block_s, block_d, warps = mm._launch_config(streams, dim, itemsize)
    vec = 16 // itemsize
    assert block_s == streams and block_d == min(triton_next_pow2(dim), mm.MAX_BLOCK_D)
    assert warps * 32 * vec <= max(block_d, 32 * vec), "warps would spread over frames or streams"
    assert block_t & (block_t - 1) == 0 and 1 <= block_t <= mm.MAX_BLOCK_T
    per_thread = block_t * -(-(block_s + 1) * block_d // (32 * warps))
    budget = mm.ELEMENTS_PER_THREAD * 4 // max(4, itemsize)
    assert per_thread <= budget or block_t == 1
    assert 2 * per_thread > budget or block_t == mm.MAX_BLOCK_T, "BLOCK_T could double within the budget"


def test_motion_mix_config_at_the_benchmark_and_model_sizes():
    from mpfast.kernels.motion_mix import _launch_config

    assert _launch_config(2, 768, 2) == (2, 2, 1024, 4)  # ViT-B/16 features, bfloat16: one block, 4 warps
    assert _launch_config(2, 512, 2) == (2, 2, 512, 2)  # ViT-B/32
    assert _launch_config(64, 768, 4) == (1, 64, 16, 4)  # many streams: narrow blocks, one frame a step


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 24, 64, 100, 128, 256])
@pytest.mark.parametrize("keys", [1, 16, 72, 128, 400])
def test_prompt_attention_configs_fit_shared_memory_and_tensor_cores(dtype, head_dim, keys):
    from mpfast.kernels import prompt_attention as pa

    if dtype == torch.float64 and head_dim > pa.MAX_HEAD_DIM_FLOAT64:
        return
    for kernel in ("fwd", "bwd_q", "bwd_kv"):
        config = pa._launch_config(400, keys, head_dim, dtype, kernel)
        block_c, block_l, block_d = config["BLOCK_C"], config["BLOCK_L"], config["BLOCK_D"]
        assert min(block_c, block_l, block_d) >= 16, config  # tl.dot's smallest tile
        assert block_d >= head_dim and max(block_c, block_l) * block_d * dtype.itemsize <= pa.MAX_TILE_BYTES
        assert config["num_warps"] in (4, 8) and config["num_stages"] in (1, 2)
    q_config = pa._launch_config(400, keys, head_dim, dtype, "bwd_q")
    if dtype.itemsize == 2 and head_dim <= 64 and keys <= pa.MAX_BLOCK_L:
        assert q_config["BLOCK_L"] >= keys, "the model's key counts should take one block (three dots a video)"
    assert q_config["BLOCK_C"] * q_config["BLOCK_L"] <= max(pa.SCORES_PER_TILE, 16 * q_config["BLOCK_L"])


def test_prompt_attention_config_at_the_benchmark_sizes():
    from mpfast.kernels.prompt_attention import _launch_config

    bf16 = torch.bfloat16
    assert _launch_config(400, 72, 64, bf16) == dict(BLOCK_C=64, BLOCK_L=64, BLOCK_D=64, num_warps=4, num_stages=2)
    assert _launch_config(400, 72, 64, bf16, "bwd_q") == dict(BLOCK_C=32, BLOCK_L=128, BLOCK_D=64, num_warps=8,
                                                             num_stages=1)
    assert _launch_config(400, 72, 64, bf16, "bwd_kv") == dict(BLOCK_C=64, BLOCK_L=16, BLOCK_D=64, num_warps=4,
                                                              num_stages=2)
    assert _launch_config(400, 16, 64, bf16, "bwd_q")["BLOCK_C"] == 64
    with pytest.raises(ValueError, match="kernel must be"):
        _launch_config(400, 16, 64, bf16, "bwd")


# ---- paths taken only at large sizes, at small sizes ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_motion_mix_several_width_blocks_and_frame_steps(triton_kernels, monkeypatch, device, dtype, streams):
    """Widths beyond one block (pooled sums through the workspace) and frame counts that
    are not a multiple of BLOCK_T, forward and backward."""
    _, mm, _ = triton_kernels
    monkeypatch.setattr(mm, "MAX_BLOCK_D", 16)
    monkeypatch.setattr(mm, "MAX_TILE_D_MANY_STREAMS", 32)
    monkeypatch.setattr(mm, "ELEMENTS_PER_THREAD", 12)
    block_t, _, block_d, _ = mm._launch_config(streams, 40, dtype.itemsize)
    assert block_d < 40 and (streams > 2 or 5 % block_t)
    args = [torch.randn(3, 5, 40, dtype=torch.float64), torch.randn(3, streams, 5, 40, dtype=torch.float64),
            torch.randn(streams, 40, dtype=torch.float64)]
    compare_with_reference(ops.motion_mix, motion_mix_ref, args, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_video"])
def test_prompt_attention_backward_over_several_key_blocks(triton_kernels, monkeypatch, device, dtype, shared):
    """Key counts beyond MAX_BLOCK_L: the grad_q kernel's two streaming passes, with padded
    leading keys, a fully padded video and query blocks past C."""
    _, _, pa = triton_kernels
    monkeypatch.setattr(pa, "MAX_BLOCK_L", 16)
    batch, classes, keys, heads, head_dim = 3, 20, 37, 2, 24
    assert pa._launch_config(classes, keys, head_dim, dtype, "bwd_q")["BLOCK_L"] < keys
    q = torch.randn(*((classes,) if shared else (batch, classes)), heads, head_dim, dtype=torch.float64)
    mask = torch.rand(batch, keys) < 0.4
    mask[0, :20] = True
    mask[1] = True
    args = [q, torch.randn(batch, keys, heads, head_dim, dtype=torch.float64),
            torch.randn(batch, keys, heads, head_dim, dtype=torch.float64), None, mask]
    compare_with_reference(ops.prompt_attention, prompt_attention_ref, args, dtype, device)


def test_temporal_diff_many_feature_blocks(triton_kernels, monkeypatch, device):
    td, _, _ = triton_kernels
    monkeypatch.setattr(td, "MAX_BLOCK_F", 16)
    args = [torch.randn(2, 6, 3, 37, dtype=torch.float64), [1, 4, 9]]
    compare_with_reference(ops.temporal_diff, temporal_diff_ref, args, torch.float64, device)


# ---- compiled for sm_90 as a real launch would be -------------------------------------------

def _benchmark_launches() -> list[tuple[str, object, tuple, dict]]:
    """The bfloat16 launches of benchmarks/ at their GPU sizes, recorded instead of run."""
    import importlib

    names = ("temporal_diff", "motion_mix", "prompt_attention")
    td, mm, pa = modules = [importlib.import_module(f"mpfast.kernels.{n}") for n in names]
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    originals = {(m, n): getattr(m, n) for m in modules for n in vars(m) if n.endswith("_kernel")}
    for (module, name), kernel in originals.items():
        setattr(module, name, Recorder(kernel))
    try:
        def t(*shape):
            return torch.empty(shape, dtype=torch.bfloat16)

        td.temporal_diff_fwd(t(32, 16, 197, 768), [1, 8], t(32, 2, 16, 197, 768))
        td.temporal_diff_bwd(t(32, 2, 16, 197, 768), [1, 8], t(32, 16, 197, 768))
        mm.motion_mix_fwd(t(1024, 16, 768), t(1024, 2, 16, 768), t(2, 768), t(1024, 16, 768), t(1024, 768),
                          t(1024, 768))
        mm.motion_mix_bwd(t(1024, 16, 768), t(1024, 768), t(1024, 768), t(1024, 16, 768), t(1024, 2, 16, 768),
                          t(2, 768), t(1024, 16, 768), t(1024, 2, 16, 768), t(2, 768))
        q, kv = t(400, 8, 64), t(32, 72, 8, 64)
        pa.prompt_attention_fwd(q, kv, kv, 0.125, None, t(32, 400, 8, 64))
        pa.prompt_attention_bwd(t(32, 400, 8, 64), q, kv, kv, 0.125, None, t(400, 8, 64), t(32, 72, 8, 64),
                                t(32, 72, 8, 64))
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
    return launches


def sm90_report() -> list[dict]:
    """Compiles every benchmark launch for sm_90 with the JIT's own argument
    specialisation; per kernel: warps, shared memory, registers, spill stack, vector widths.

    Must run without ``TRITON_INTERPRET`` (real ``JITFunction`` kernels).
    """
    import tempfile

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    report = []
    for kernel, grid, args, kwargs in _benchmark_launches():
        kwargs = dict(kwargs)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                                   capture_output=True, text=True, check=True).stdout
        registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
        ptx = compiled.asm["ptx"]
        report.append({
            "kernel": kernel.fn.__name__, "grid": list(grid), "warps": compiled.metadata.num_warps,
            "shared": compiled.metadata.shared, "registers": int(registers), "stack": int(stack),
            "loads": sorted(set(re.findall(r"ld\.global((?:\.v\d)?\.b\d+)", ptx))),
            "stores": sorted(set(re.findall(r"st\.global((?:\.v\d)?\.b\d+)", ptx))),
        })
    return report


@pytest.mark.slow  # half a minute with a cold Triton cache
def test_benchmark_launches_compile_to_wide_accesses_without_spills():
    """At the benchmark sizes (bfloat16) every kernel moves 16-byte vectors (``.v4.b32``)
    and spills nothing; the memory-bound kernels use no more than 128 registers a thread,
    so that at least four of their programs share an SM."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot compile for sm_90")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = "import json, tests.test_kernel_configs as t; print(json.dumps(t.sm90_report()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"compilation failed:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = {entry["kernel"] for entry in report}
    assert len(report) == 7 and len(kernels) == 7, kernels
    for entry in report:
        where = json.dumps(entry)
        assert entry["stack"] == 0, f"spills: {where}"
        assert ".v4.b32" in entry["loads"] and ".v4.b32" in entry["stores"], f"narrow accesses: {where}"
        if not entry["kernel"].startswith("_prompt_attention"):
            assert entry["registers"] <= 128, where
    grids = {entry["kernel"]: entry["grid"] for entry in report}
    assert grids["_temporal_diff_fwd_kernel"] == [32 * 2 * 16 * 37]  # one program per output tile
    assert grids["_motion_mix_fwd_kernel"] == [1024]

