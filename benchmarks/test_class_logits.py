"""class_logits at the head level: MotionCLIP's head from cached features, fused against unfused.

The head of ViT-B/16 (D = 512, T = 8 frames, K = 8 prompts, H = 8 heads) on random
``[B, T, D]`` frame features and ``[C, D]`` class embeddings, two passes:

* ``fwd``: inference (eval mode, ``torch.inference_mode``), frames -> logits. The fused
  path reuses its cached class side (the class list does not change between calls);
  the unfused path has no such cache (that is today's model).
* ``step``: a training step: forward, cross-entropy, backward, ``AdamW`` step (the fused
  implementation where torch has one).

Implementations: ``eager`` = the unfused model (``MultimodalCommunicationBlock.forward``,
``fused_logits = False``), ``compile`` = ``torch.compile`` of it, and each registry
backend = the fused model (``fused_logits = True``) with that backend for every op.
``peak MiB`` (compare.py) is one call's peak above what was allocated before it;
``flops`` are the true FLOPs of that path (FlopCounterMode), so TFLOP/s compares work
done, not work avoided.

Sizes: on GPU (bfloat16) B in {1, 32, 256} x C in {51, 400, 700}, ``torch.compile`` at
B = 32, C = 400 only (each compiled shape and pass costs seconds), the ``reference``
backend not timed (a specification, not a speed path); on CPU (float32) B in {1, 32} at
C = 400. ``MPFAST_BENCH_HEAD_SIZES="32x400,1x400"`` overrides the sizes (and compiles at each).
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import mpfast
from mpfast.model import add_model_config

from ._harness import DTYPE_NAMES, bench_device, compiled, on_gpu, run, skip_unless_runnable

FRAMES, DIM = 8, 512
MODEL_NAME = "mpfast-head-512"  # the tiny test CLIP with ViT-B/16's embedding width: the head is the same
if on_gpu():
    DTYPE, SIZES, COMPILE_SIZES = torch.bfloat16, [(b, c) for b in (1, 32, 256) for c in (51, 400, 700)], {(32, 400)}
    IMPLS = ["eager", "compile", "triton", "cuda"]
else:
    DTYPE, SIZES, COMPILE_SIZES = torch.float32, [(1, 400), (32, 400)], {(1, 400), (32, 400)}
    IMPLS = ["eager", "compile", "reference", "cpp"]
if os.environ.get("MPFAST_BENCH_HEAD_SIZES"):
    SIZES = [tuple(int(n) for n in size.split("x")) for size in os.environ["MPFAST_BENCH_HEAD_SIZES"].split(",")]
    COMPILE_SIZES = set(SIZES)


@functools.lru_cache(maxsize=None)
def _model():
    config = json.loads((mpfast.model.factory.SHIPPED_CONFIGS / "mpfast-tiny.json").read_text())
    add_model_config({**config, "embed_dim": DIM}, name=MODEL_NAME)
    model, *_ = mpfast.create_model_and_transforms(MODEL_NAME, num_frames=FRAMES, device=bench_device())
    with torch.no_grad():  # a trained head: no zero residual scale or gate
        for p in model.trainable_parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model.to(DTYPE)


def _forward(model, frames, classes):
    return model.forward_features(frames, classes)


def _path(impl: str) -> tuple[bool, str]:
    """Whether ``impl`` runs the fused head, and the backend its ops run with."""
    return (False, "auto") if impl in ("eager", "compile") else (True, impl)


def _flops(step, backend_name: str) -> int:
    """True FLOPs of one uncompiled call of ``step`` (matrix products and the mpfast ops)."""
    counter = FlopCounterMode(display=False)
    with counter, mpfast.ops.backend(backend_name):
        step()
    return int(counter.get_total_flops())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B{s[0]}-C{s[1]}")
@pytest.mark.parametrize("pass_", ["fwd", "step"])
def test_class_logits_head(benchmark, impl, size, pass_):
    device = bench_device()
    skip_unless_runnable(impl, device)
    batch, num_classes = size
    if impl == "compile" and size not in COMPILE_SIZES:
        pytest.skip(f"torch.compile is benchmarked at {sorted(COMPILE_SIZES)} only (each shape compiles anew)")
    model = _model()
    fused, backend_name = _path(impl)
    frames = torch.randn(batch, FRAMES, DIM, device=device, dtype=DTYPE)
    classes = F.normalize(torch.randn(num_classes, DIM, device=device), dim=-1).to(DTYPE)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    params = model.trainable_parameters()
    try:
        optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    except (RuntimeError, ValueError):  # no fused AdamW for this device or dtype in this torch
        optimizer = torch.optim.AdamW(params, lr=1e-6)

    def make_step(forward):
        def step():
            if pass_ == "fwd":
                with torch.inference_mode():
                    return forward(model, frames, classes)
            loss = F.cross_entropy(forward(model, frames, classes).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def timed():
            with mpfast.ops.backend(backend_name):
                return step()

        return timed

    model.fused_logits = fused
    model.train(pass_ == "step")
    try:
        flops = _flops(make_step(_forward), backend_name)
        timed = make_step(compiled(_forward) if impl == "compile" else _forward)
        run(benchmark, timed, device, memory=True, impl=impl, op="class_logits head", shape=f"B{batch}-C{num_classes}",
            dtype=DTYPE_NAMES[DTYPE], bytes=0, flops=flops, videos=batch, **{"pass": pass_})
    finally:
        model.fused_logits = None
        model.train()
