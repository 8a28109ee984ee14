"""End to end: MotionCLIP (frames -> logits with cached class features) against the bare CLIP frame encoder.

CPU: the tiny test model; GPU: ViT-B/16 at 224 px in bfloat16, B = 32, T = 8 and 16, C = 400.
``x eager`` in compare.py is not meaningful here; compare ``motionclip`` with ``clip_frames``
in the same group (same shape): their ratio is the head's overhead.
"""

import pytest
import torch

import mpfast
from mpfast.data import preprocess_config
from mpfast.profiling import counting

from ._harness import DTYPE_NAMES, bench_device, on_gpu, run

if on_gpu():
    MODEL, DTYPE, BATCH, FRAMES, CLASSES = "ViT-B-16", torch.bfloat16, 32, (8, 16), 400
else:
    MODEL, DTYPE, BATCH, FRAMES, CLASSES = "mpfast-tiny", torch.float32, 4, (8,), 51

_models: dict = {}


def model_for(frames: int):
    if frames not in _models:
        model, _, _, _ = mpfast.create_model_and_transforms(MODEL, num_frames=frames, device=bench_device())
        model = model.to(DTYPE).eval()
        video_flops = counting.frame_encoder_flops(model, frames)
        head = counting.head_flops(model, frames, CLASSES, BATCH)
        _models[frames] = (model, video_flops, head)
    return _models[frames]


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("impl", ["clip_frames", "motionclip"])
def test_model(benchmark, impl, frames):
    device = bench_device()
    model, video_flops, head = model_for(frames)
    size = preprocess_config(model.clip)[0]
    video = torch.randn(BATCH, frames, 3, size, size, device=device, dtype=DTYPE)
    classes = torch.nn.functional.normalize(torch.randn(CLASSES, model.dim, device=device), dim=-1).to(DTYPE)
    if impl == "clip_frames":
        step, flops = (lambda: model.encode_frames(video)), BATCH * video_flops.true
    else:
        step, flops = (
            (lambda: model.forward_features(model.encode_frames(video), classes)),
            BATCH * video_flops.true + head.true,
        )

    def timed():
        with torch.inference_mode():
            return step()

    run(
        benchmark,
        timed,
        device,
        impl=impl,
        op=f"model {MODEL}",
        shape=f"B{BATCH}-T{frames}-C{CLASSES}",
        dtype=DTYPE_NAMES[DTYPE],
        bytes=0,
        flops=int(flops),
        videos=BATCH,
        **{"pass": "fwd"},
    )
