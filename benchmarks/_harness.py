"""Shared pieces of the benchmark suites: device, implementations, timing, derived rates.

Every benchmark records in ``extra_info``: op, shape, dtype, impl (a registry backend,
``eager`` = the reference function called directly, ``compile`` = ``torch.compile`` of the
reference, ``copy`` = a plain copy of the same bytes), pass (``fwd`` or ``fwd+bwd``),
device, and the bytes and FLOPs one call moves and does, so ``compare.py`` derives GB/s
and TFLOP/s and ratios to ``eager`` and ``compile`` within the same run.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor

import mpfast

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
TARGET_SECONDS = 0.25  # time spent timing one benchmark (after warm-up)


def bench_device() -> torch.device:
    """``MPFAST_BENCH_DEVICE``, else ``MPFAST_TEST_DEVICE``, else CUDA when available."""
    name = os.environ.get("MPFAST_BENCH_DEVICE") or os.environ.get("MPFAST_TEST_DEVICE")
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def on_gpu() -> bool:
    return bench_device().type == "cuda"


def bench_dtypes() -> list[torch.dtype]:
    """``MPFAST_BENCH_DTYPES`` (comma-separated names), else bfloat16 on GPU and float32 on CPU."""
    names = os.environ.get("MPFAST_BENCH_DTYPES") or ("bfloat16" if on_gpu() else "float32")
    by_name = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    unknown = [n for n in names.split(",") if n.strip() not in by_name]
    if unknown:
        raise ValueError(f"MPFAST_BENCH_DTYPES: unknown dtype(s) {unknown}; expected some of {sorted(by_name)}")
    return [by_name[n.strip()] for n in names.split(",")]


def shape_name(shape: Sequence[int]) -> str:
    """``(32, 16, 512)`` -> ``"32x16x512"``: the shape label of a benchmark."""
    return "x".join(map(str, shape))


def parametrize_cases(argname: str, shapes: Sequence, name: Callable[[object], str] = shape_name):
    """``pytest.mark.parametrize("<argname>,dtype", ...)`` over every shape and benchmarked dtype,
    with ids ``<name(shape)>-<dtype>``."""
    cases = [(shape, dtype) for shape in shapes for dtype in bench_dtypes()]
    return pytest.mark.parametrize(f"{argname},dtype", cases, ids=[f"{name(s)}-{DTYPE_NAMES[d]}" for s, d in cases])


def labels(op: str, shape: str, dtype: torch.dtype, pass_: str) -> dict:
    """The ``extra_info`` labels that ``compare.py`` groups by."""
    return {"op": op, "shape": shape, "dtype": DTYPE_NAMES[dtype], "pass": pass_}


def impls() -> list[str]:
    """Implementations to benchmark: every registry backend plus ``eager`` and ``compile``.

    Backends that cannot run here are still listed (their benchmarks skip with the
    reason); Triton's CPU interpreter is skipped too: it checks kernels, it is not fast.
    """
    return ["eager", "compile", *mpfast.ops._registry.BACKEND_NAMES]


def skip_unless_runnable(impl: str, device: torch.device) -> None:
    if impl in ("eager", "compile", "copy"):
        return
    # As a real call would: a compiled backend not built yet is built now (available_backends() only asks).
    reason = mpfast.ops._registry.get_backend(impl).unavailable_reason(device.type)
    if reason is not None:
        pytest.skip(reason)
    if impl == "triton" and (device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip(
            "triton in interpreter mode (TRITON_INTERPRET=1 or CPU tensors) checks kernels; it is not a benchmark"
        )


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``: one graph per shape, dtype and grad mode, as a specialised kernel.

    The recompile limit is raised so that every benchmarked case really runs compiled
    (past the limit dynamo would quietly fall back to eager).
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    return torch.compile(fn, dynamic=False)


def call_for(impl: str, public: Callable, reference: Callable) -> Callable:
    """The callable that runs ``impl``: the public op under a backend, or the reference."""
    if impl == "eager":
        return reference
    if impl == "compile":
        return compiled(reference)

    def run(*args, **kwargs):
        with mpfast.ops.backend(impl):
            return public(*args, **kwargs)

    return run


def forward_backward(
    fn: Callable, inputs: Sequence[Tensor], args: Sequence, grads: Sequence[Tensor]
) -> Callable[[], object]:
    """A callable that runs ``fn(*args)`` and the gradients of ``inputs`` for ``grads``."""

    def step():
        outputs = fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.autograd.grad(outputs, list(inputs), list(grads))

    return step


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of one call of ``fn`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocations and frees that
    ``torch.profiler`` records (``profile_memory=True``), summed in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return int(peak)


def run(benchmark, fn: Callable[[], object], device: torch.device, memory: bool = False, **info) -> None:
    """Times ``fn`` and records ``info`` and derived rates.

    ``info`` must hold ``bytes`` and ``flops`` (per call) besides the labels. On CUDA one
    round queues ``calls_per_round`` calls and synchronises once, so that a round lasts
    about a millisecond and the launch-and-synchronise latency of a single call does not
    swamp microsecond kernels; ``compare.py`` divides by ``calls_per_round``. With
    ``memory``, ``peak_memory_bytes`` is one call's peak (:func:`peak_memory`), measured
    after the timing; else, on CUDA, the peak of the whole benchmark.
    """
    cuda = device.type == "cuda"
    calls = 1

    def call():
        for _ in range(calls):
            out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return out

    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        call()
    begin = time.perf_counter()
    call()
    once = max(time.perf_counter() - begin, 1e-7)
    if cuda:
        calls = int(min(max(1e-3 / once, 1), 200))
        once *= calls
    rounds = int(min(max(TARGET_SECONDS / once, 5), 100))
    benchmark.extra_info.update(info, device=str(device), calls_per_round=calls)
    benchmark.group = f"{info['op']} {info['shape']} {info['dtype']} {info['pass']}"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
    if memory:
        benchmark.extra_info["peak_memory_bytes"] = peak_memory(fn, device)
    elif cuda:
        benchmark.extra_info["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))


def nbytes(*tensors: Tensor | Sequence[int], dtype: torch.dtype | None = None) -> int:
    """Bytes of tensors (or of shapes in ``dtype``)."""
    total = 0
    for t in tensors:
        if isinstance(t, Tensor):
            total += t.numel() * t.element_size()
        else:
            total += int(torch.Size(t).numel()) * torch.tensor([], dtype=dtype).element_size()
    return total


def copy_baseline(benchmark, device: torch.device, torch_dtype: torch.dtype, total_bytes: int, **labels) -> None:
    """Benchmarks a plain copy that reads and writes ``total_bytes`` in all (the bandwidth ceiling)."""
    element = torch.tensor([], dtype=torch_dtype).element_size()
    numel = max(total_bytes // (2 * element), 1)
    src = torch.randn(numel, device=device).to(torch_dtype)
    dst = torch.empty_like(src)
    run(benchmark, lambda: dst.copy_(src), device, impl="copy", bytes=2 * numel * element, flops=0, **labels)
