"""FLOP and parameter counting: both counters against hand-derived formulas and each other."""

import json
import math

import pytest
import torch
from torch import nn

import mpfast
from mpfast.model import HeadConfig, MotionCLIP
from mpfast.model.motion import motion_hidden, motion_strides
from mpfast.ops.class_logits import flops as class_logits_flops
from mpfast.ops.motion_mix import flops as motion_mix_flops
from mpfast.ops.prompt_attention import flops as prompt_attention_flops
from mpfast.ops.temporal_diff import flops as temporal_diff_flops
from mpfast.profiling import budgets, count_flops, count_parameters, counting, frame_encoder_flops, head_cost

from .conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def tiny():
    open_clip_config = json.loads(TINY_CONFIG.read_text())
    model, _, _, _ = mpfast.create_model_and_transforms("mpfast-tiny", num_frames=8)
    return model.eval(), open_clip_config


def vit_macs_per_frame(vision: dict, embed_dim: int) -> int:
    """Multiply-adds of an open_clip ViT image tower on one frame, plus its LayerNorms at 5 per element."""
    width, layers, patch, size = vision["width"], vision["layers"], vision["patch_size"], vision["image_size"]
    patches = (size // patch) ** 2
    tokens = patches + 1
    conv = patches * 3 * patch * patch * width
    per_layer = (
        tokens * width * 3 * width
        + 2 * tokens * tokens * width
        + tokens * width * width
        + 2 * tokens * width * 4 * width
    )
    norms = 5 * tokens * width * (2 + 2 * layers)  # ln_pre, two per block, ln_post
    return conv + layers * per_layer + width * embed_dim + norms


def head_macs(dim: int, frames: int, classes: int, config: HeadConfig, fused: bool = False) -> tuple[int, int]:
    """(per video, per call) multiply-adds of the head, derived from the model's code by hand."""
    strides = config.strides or motion_strides(frames)
    streams, r, k, p = len(strides), motion_hidden(dim, config.motion_ratio), config.num_prompts, config.prompt_hidden
    keys, heads = k + frames, config.num_heads
    # down and up per stride, state and modulation per frame, the differences
    motion = 2 * streams * frames * dim * r + 2 * frames * dim * r + sum(max(frames - s, 0) for s in strides) * dim
    mix = 2 * streams * frames * dim + frames * dim + streams * frames * dim + 3 * dim
    prompts = dim * p + p * k * dim
    video_norms = 5 * keys * dim + 5 * dim
    video_side = 2 * keys * dim * dim + dim * dim + 2 * classes * dim + dim * dim  # keys/values, video <- text
    logits = classes * dim
    # text norm, adapter, projections, tanh(gates)
    per_call = 5 * classes * dim + 4 * classes * dim * dim + streams * dim
    if not fused:  # text_out on every (video, class) pair, the text <- video attention
        text_side = classes * dim * dim + 2 * classes * keys * dim
    else:  # the fold (z, its Gram matrix, z w) and the class_logits op; per call, base_v
        lh = keys * heads
        text_side = keys * dim * dim + lh * lh * dim + lh * dim + classes * (2 * keys * dim + lh * lh + 3 * lh)
        per_call += classes * dim * dim
    return motion + mix + prompts + video_norms + video_side + text_side + logits, per_call


def test_parameters_match_the_model(tiny):
    model, _ = tiny
    count = count_parameters(model, depth=2)
    assert count.total == sum(p.numel() for p in model.parameters())
    assert count.trainable == sum(p.numel() for p in model.trainable_parameters())
    assert count.by_module["clip"][1] == 0
    assert count.by_module["motion"] == (sum(p.numel() for p in model.motion.parameters()),) * 2
    assert "motion.down" in count.by_module and "clip.visual.transformer" not in count.by_module


def test_parameters_reject_bad_input():
    with pytest.raises(TypeError, match="model"):
        count_parameters("ViT-B-16")
    with pytest.raises(ValueError, match="depth"):
        count_parameters(nn.Linear(2, 2), depth=0)


def test_linear_layer_in_both_conventions():
    count = count_flops(nn.Linear(7, 5), (torch.randn(3, 7),))
    assert count.fvcore == 3 * 7 * 5
    assert count.true == 2 * 3 * 7 * 5
    assert count.fvcore_as_true == count.true and count.true_as_fvcore == count.fvcore


class _Ops(nn.Module):
    def forward(self, x, m, gate, q, k, gram, proj, base_dot, base_sq):
        d = mpfast.ops.temporal_diff(x, (1, 3))
        u, v, mu = mpfast.ops.motion_mix(x, m, gate)
        cosine = torch.ops.mpfast.class_logits(q, k, q, k, gram, proj, base_dot, base_sq, 0.5)
        return d, u, mpfast.ops.prompt_attention(q, k, k), cosine


def test_mpfast_ops_counted_by_both_counters_with_their_own_formulas():
    x, m, gate = torch.randn(2, 5, 6), torch.randn(2, 3, 5, 6), torch.randn(3, 6)
    q, k = torch.randn(7, 2, 3), torch.randn(2, 4, 2, 3)
    class_inputs = torch.randn(2, 8, 8), torch.randn(2, 2, 4), torch.randn(2, 7), torch.rand(7) + 9
    count = count_flops(_Ops(), (x, m, gate, q, k, *class_inputs))
    matrix_type = prompt_attention_flops(q.shape, k.shape) + class_logits_flops(q.shape, k.shape)
    expected_true = temporal_diff_flops(x.shape, (1, 3)) + motion_mix_flops(x.shape, m.shape) + matrix_type
    assert count.true == expected_true
    assert count.fvcore == expected_true - matrix_type // 2
    assert count.fvcore_by_op["prompt_attention"] == 2 * (
        2 * 2 * 7 * 4 * 3
    )  # q k^T and p v: 2 x B H C L d multiply-adds
    # scores and g (2 L H d), the quadratic form ((L H)^2) and three L H dot products per (video, class) pair
    assert count.fvcore_by_op["class_logits"] == 2 * 7 * (2 * 4 * 2 * 3 + 8 * 8 + 3 * 8)
    assert count.disagreement == 0
    for skipped in count.skipped.values():
        assert not {"temporal_diff", "motion_mix", "prompt_attention", "class_logits"} & set(skipped)


def test_frame_encoder_matches_the_vit_formula_in_every_attention_mode(tiny):
    model, config = tiny
    expected = 3 * vit_macs_per_frame(config["vision_cfg"], config["embed_dim"])
    fast = frame_encoder_flops(model, 3)  # eval + no_grad: nn.MultiheadAttention's fused fast path
    assert "_native_multi_head_attention" in fast.fvcore_by_op
    assert fast.fvcore == expected and fast.disagreement == 0
    model.clip.visual.train()
    try:
        slow = frame_encoder_flops(model, 3)  # scaled_dot_product_attention
    finally:
        model.clip.eval()
    assert "scaled_dot_product_attention" in slow.fvcore_by_op
    assert slow.fvcore == expected and slow.true == fast.true


def test_plain_fvcore_misses_the_fused_attention_that_we_count(tiny):
    from fvcore.nn import FlopCountAnalysis

    model, _ = tiny
    video = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        plain = FlopCountAnalysis(counting._FrameEncoder(model), (video,))
        plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        plain_total = plain.total()
        assert "aten::_native_multi_head_attention" in plain.unsupported_ops()
    assert plain_total < frame_encoder_flops(model, 2).fvcore


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("frames,classes,prompts", [(8, 51, 8), (1, 7, 3), (5, 13, 2)])
def test_head_matches_the_hand_derived_formula(tiny, frames, classes, prompts, fused):
    model, _ = tiny
    config = HeadConfig(num_frames=frames, num_prompts=prompts)
    head = MotionCLIP(model.clip, config, None)
    head.fused_logits = fused
    cost = head_cost(head, frames, classes)
    per_video, per_call = head_macs(model.dim, frames, classes, config, fused)
    assert (cost.per_video.fvcore, cost.per_call.fvcore) == (per_video, per_call)
    assert cost.at_batch_one.fvcore == per_video + per_call
    cost.per_video.check_agreement()
    cost.at_batch_one.check_agreement()
    assert {"motion", "prompts", "communication"} <= set(cost.per_video.fvcore_by_module)
    for count in (cost.per_video, cost.at_batch_one):
        assert count.fvcore_by_module[""] == count.fvcore and count.true_by_module[""] == count.true


def test_skipped_arithmetic_ops_are_listed():
    class Exp(nn.Module):
        def forward(self, x):
            return torch.cumsum(x.exp(), 0) @ x.T

    count = count_flops(Exp(), (torch.randn(4, 3),))
    assert count.fvcore == 4 * 3 * 4
    for counter in ("fvcore", "torch"):
        assert {"exp", "cumsum"} <= set(count.skipped[counter]), count.skipped


def test_disagreeing_counters_raise_with_both_numbers():
    count = counting.FlopCount(100.0, 250.0, {"linear": 100.0}, {"addmm": 250.0}, {}, {}, {"fvcore": {}, "torch": {}})
    assert count.disagreement == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match=r"disagree by 20\.00 %.*fvcore 100.*125"):
        count.check_agreement()


@pytest.mark.parametrize("model_name,published", [("ViT-B-32", 35.0), ("ViT-B-16", 141.0)])
def test_backbone_matches_published_figures_and_the_budgets_file(model_name, published):
    # Published: CLIP ViT-B/32 about 4.4 and ViT-B/16 about 17.6 GFLOPs per 224 px frame
    # (fvcore convention, attention included), x 8 frames. Counting is exactly linear in
    # frames, so one frame is counted and scaled.
    model, _, _, _ = mpfast.create_model_and_transforms(model_name)
    one_frame = frame_encoder_flops(model.eval(), 1)
    one_frame.check_agreement()
    assert not {"_native_multi_head_attention", "scaled_dot_product_attention"} & set(one_frame.skipped["fvcore"])
    eight = 8 * one_frame.fvcore / 1e9
    assert math.isclose(eight, published, rel_tol=0.01), f"{model_name}: {eight:.2f} GFLOPs, published {published}"
    recorded = budgets.load()["backbones"][model_name]
    for frames in (8, 16):
        stored = recorded[f"T{frames}"]["gflops_fvcore_style"]
        assert math.isclose(frames * one_frame.fvcore / 1e9, stored, rel_tol=1e-3), (
            f"{model_name} T={frames}: counted {frames * one_frame.fvcore / 1e9:.3f}, budgets.json says {stored}"
        )
