"""Per-call CPU cost of the Triton path, measured without a GPU: every kernel launch is a no-op.

``python -m benchmarks.launch_overhead`` runs the Triton backend on CPU tensors (interpreter
mode, so that the backend takes them) with each ``kernel[grid](...)`` of ``kernels/`` replaced
by a recorder that does nothing, and times per op and pass, at the tiny sizes of
``benchmarks/`` (where the head is bound by per-call overhead on a GPU):

* ``op``: the public function under ``backend("triton")``: argument checks, ``torch.library``
  dispatch, backend choice, output allocation and the launcher, up to the JIT launch;
* ``launcher``: the launcher alone (``<op>_fwd`` / ``<op>_bwd`` of ``kernels/<op>.py`` on
  preallocated outputs);
* ``cpp``: the public function under ``backend("cpp")``, the compiled C++ op through the same
  custom-op path (it computes, at these sizes almost nothing).

Medians of ``--repeats`` runs of ``--calls`` calls, in microseconds per call, with the spread
(min-max of the runs). Not included, because it needs a GPU: Triton's own launch (binding the
arguments to the compiled kernel and the driver call, about 20-40 us per launch in Triton 3.6).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import time
from typing import Callable, Iterator

import torch

import mpfast  # mpfast.kernels (the @triton.jit kernels) is imported later: main() can still pick the interpreter
from mpfast import ops

KERNEL_MODULES = ("temporal_diff", "motion_mix", "prompt_attention", "class_logits")


class _NoLaunch:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return _no_launch


def _no_launch(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def no_launches() -> Iterator[None]:
    """Every ``*_kernel`` of ``mpfast.kernels`` replaced by :class:`_NoLaunch` inside the block."""
    modules = [importlib.import_module(f"mpfast.kernels.{name}") for name in KERNEL_MODULES]
    originals = {(m, n): getattr(m, n) for m in modules for n in vars(m) if n.endswith("_kernel")}
    for module, name in originals:
        setattr(module, name, _NoLaunch())
    try:
        yield
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)


def _cases() -> dict[str, tuple[Callable, list, Callable, list]]:
    """Per op: the public call, its tensor inputs, the launcher call and its arguments with outputs (tiny sizes)."""
    from mpfast.kernels import class_logits as cl
    from mpfast.kernels import motion_mix as mm
    from mpfast.kernels import prompt_attention as pa
    from mpfast.kernels import temporal_diff as td
    from mpfast.ops.class_logits import _op as class_logits_op

    def t(*shape):
        return torch.randn(shape, requires_grad=True)

    x = t(1, 2, 8)
    h, m, gate = t(1, 2, 8), t(1, 2, 2, 8), t(2, 8)
    q, k, v = t(2, 1, 8), t(1, 2, 1, 8), t(1, 2, 1, 8)
    lh = 2
    core = [t(2, 1, 8), t(1, 2, 1, 8), t(2, 1, 8), t(1, 2, 1, 8), t(1, lh, lh), t(1, 1, 2), t(1, 2), t(2)]
    e = torch.empty
    return {
        "temporal_diff": (lambda: ops.temporal_diff(x, [1, 2]), [x],
                          lambda: td.temporal_diff_fwd(x.detach(), [1, 2], e(1, 2, 2, 8))),
        "motion_mix": (lambda: ops.motion_mix(h, m, gate), [h, m, gate],
                       lambda: mm.motion_mix_fwd(h.detach(), m.detach(), gate.detach(), e(1, 2, 8), e(1, 8), e(1, 8))),
        "prompt_attention": (lambda: ops.prompt_attention(q, k, v), [q, k, v],
                             lambda: pa.prompt_attention_fwd(q.detach(), k.detach(), v.detach(), 0.35, None,
                                                             e(1, 2, 1, 8))),
        "class_logits (core op)": (lambda: class_logits_op(*core, 0.35, None), core,
                                   lambda: cl.class_logits_fwd(*(a.detach() for a in core), 0.35, None, e(1, 2))),
    }


def _time(fn: Callable[[], object], calls: int, repeats: int) -> tuple[float, float, float]:
    """Median, min and max over ``repeats`` runs of microseconds per call."""
    for _ in range(max(10, calls // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs), min(runs), max(runs)


def measure(calls: int = 2000, repeats: int = 7) -> list[dict]:
    """One row per (op, pass, what): microseconds per call (median, min, max)."""
    rows = []
    with no_launches():
        for name, (public, inputs, launcher, ) in _cases().items():
            def forward(public=public):
                with torch.no_grad():
                    public()

            def forward_backward(public=public, inputs=inputs):
                out = public()
                out = out if isinstance(out, tuple) else (out,)
                torch.autograd.grad(out, inputs, [torch.ones_like(o) for o in out], allow_unused=True)

            for what, backend in (("op", "triton"), ("cpp", "cpp")):
                with ops.backend(backend):
                    for pass_, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                        rows.append(dict(op=name, what=what, pass_=pass_, us=_time(fn, calls, repeats)))
            rows.append(dict(op=name, what="launcher", pass_="fwd", us=_time(launcher, calls, repeats)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed run (default 2000)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs, median reported (default 7)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the backend takes CPU tensors
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"mpfast {mpfast.__version__}, torch {torch.__version__}, CPU tensors, Triton launches recorded as no-ops")
    print("| op | pass | what | us/call (median) | min-max |")
    print("| --- | --- | --- | ---: | ---: |")
    for row in measure(args.calls, args.repeats):
        median, low, high = row["us"]
        print(f"| {row['op']} | {row['pass_']} | {row['what']} | {median:.1f} | {low:.1f}-{high:.1f} |")


if __name__ == "__main__":
    main()
