"""MotionCLIP on a tiny random open_clip model: the properties the design promises."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

import mpfast
from mpfast.model import HeadConfig, MotionCLIP

CLASSES = ["run", "jump", "wave a hand"]


@pytest.fixture
def tiny(tiny_model_name):
    model, train_tf, eval_tf, tokenizer = mpfast.create_model_and_transforms(tiny_model_name, num_frames=4, num_heads=4)
    return model, train_tf, eval_tf, tokenizer


def video(batch=2, frames=4, size=32):
    return torch.randn(batch, frames, 3, size, size)


def set_gates(model, value=0.5):
    """Wakes every zero-initialised part of the head up."""
    with torch.no_grad():
        model.motion.gate.fill_(value)
        model.communication.text_scale.fill_(value)
        model.communication.video_scale.fill_(value)
        model.communication.adapter_scale.fill_(value)
        model.motion.position.normal_()
        model.motion.content_scale.normal_(std=0.1)
        if model.prompts is not None:
            model.prompts.fc2.weight.normal_(std=0.1)


def clip_zero_shot(clip, tokenizer, videos, classes, template="a video of a person {}."):
    """CLIP zero-shot on mean-pooled frame embeddings, computed with open_clip directly."""
    batch, frames = videos.shape[:2]
    with torch.no_grad():
        image = clip.encode_image(videos.flatten(0, 1)).view(batch, frames, -1).mean(1)
        text = clip.encode_text(tokenizer([template.format(c) for c in classes]))
    return clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T


def test_untrained_model_is_clip_zero_shot(tiny):
    model, _, _, tokenizer = tiny
    x = video()
    logits = model(x, CLASSES)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, clip_zero_shot(model.clip, tokenizer, x, CLASSES), rtol=1e-5, atol=1e-5)


def test_static_video_has_zero_motion(tiny):
    model, *_ = tiny
    set_gates(model)
    frames = torch.randn(2, 1, model.dim).expand(2, 4, model.dim)
    u, v, mu = model.motion(frames)
    assert torch.count_nonzero(mu) == 0
    torch.testing.assert_close(u, frames * (1 + model.motion.content_scale) + model.motion.position, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["static", "zeros", "one_frame"])
def test_degenerate_videos_give_finite_gradients(tiny, kind):
    """A static video, all-zero frames and T = 1 have zero motion scales: the gradients reaching
    the frames (an unfrozen encoder) and the class embeddings (one class) must be finite, not NaN."""
    model, *_ = tiny
    set_gates(model)
    frames = {"static": torch.randn(2, 1, model.dim).expand(2, 4, model.dim).clone(),
              "zeros": torch.zeros(2, 4, model.dim), "one_frame": torch.randn(2, 1, model.dim)}[kind]
    frames.requires_grad_()
    u, v, mu = model.motion(frames)
    (u.square().sum() + v.sum() + mu.sum()).backward()
    assert torch.isfinite(frames.grad).all()
    text = torch.randn(1, model.dim, requires_grad=True)
    mpfast.model.communication.class_contrast(text).sum().backward()
    assert torch.isfinite(text.grad).all()


def test_reversing_time_changes_logits_only_with_gates(tiny):
    model, *_ = tiny
    x = video()
    reversed_x = x.flip(1)
    torch.testing.assert_close(model(x, CLASSES), model(reversed_x, CLASSES))
    with torch.no_grad():
        model.motion.gate.fill_(1.0)
        model.communication.text_scale.fill_(1.0)
    assert (model(x, CLASSES) - model(reversed_x, CLASSES)).abs().max() > 1e-4


@pytest.mark.parametrize("frames", [1, 2, 7])
def test_any_frame_count(tiny, frames):
    model, *_ = tiny
    set_gates(model)
    logits = model(video(frames=frames), CLASSES)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_single_image_matches_clip(tiny):
    model, _, _, tokenizer = tiny
    x = video(batch=1, frames=1)
    torch.testing.assert_close(model(x, CLASSES), clip_zero_shot(model.clip, tokenizer, x, CLASSES), rtol=1e-5, atol=1e-5)


def test_clip_frozen_and_only_head_trains(tiny):
    model, *_ = tiny
    model.train()
    assert not model.clip.training and model.motion.training
    trainable = model.trainable_parameters()
    clip_ids = {id(p) for p in model.clip.parameters()}
    assert trainable and not clip_ids & {id(p) for p in trainable}
    assert all(not p.requires_grad for p in model.clip.parameters())
    set_gates(model)
    model(video(), CLASSES).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in model.clip.parameters())
    missing = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"head parameters without gradient: {missing}"


def test_class_embeddings_are_cached(tiny, monkeypatch):
    model, *_ = tiny
    calls = []
    encode_text = model.clip.encode_text
    monkeypatch.setattr(model.clip, "encode_text", lambda tokens: calls.append(len(tokens)) or encode_text(tokens))
    first = model.encode_classes(CLASSES)
    model.train()
    second = model.encode_classes(CLASSES)
    assert first is second and calls == [3]
    model.encode_classes(CLASSES[:2])
    assert calls == [3, 2]


def test_trainable_text_side_is_recomputed_in_training(tiny):
    model, *_ = tiny
    model.clip.token_embedding.requires_grad_(True)
    model.train()
    first, second = model.encode_classes(CLASSES), model.encode_classes(CLASSES)
    assert first is not second and first.requires_grad
    model.eval()
    assert model.encode_classes(CLASSES) is model.encode_classes(CLASSES)


def test_template_ensemble(tiny_model_name):
    templates = ("a video of {}.", "someone doing {}.")
    model, _, _, tokenizer = mpfast.create_model_and_transforms(tiny_model_name, num_heads=4, templates=templates)
    with torch.no_grad():
        expected = sum(F.normalize(model.clip.encode_text(tokenizer([t.format(c) for c in CLASSES])), dim=-1)
                       for t in templates) / 2
    torch.testing.assert_close(model.encode_classes(CLASSES), expected)


def test_forward_features_matches_forward(tiny):
    model, *_ = tiny
    set_gates(model)
    x = video()
    logits = model.forward_features(model.encode_frames(x), model.encode_classes(CLASSES))
    torch.testing.assert_close(logits, model(x, CLASSES))


def test_encode_video_is_unit_norm(tiny):
    model, *_ = tiny
    set_gates(model)
    v = model.encode_video(video())
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: m(torch.randn(2, 4, 32, 32), CLASSES), ValueError, r"video must have shape \[B,T,3,H,W\]"),
        (lambda m: m(torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8), CLASSES), TypeError, "video must be a float"),
        (lambda m: m(video(), "run"), ValueError, "class_names must be a non-empty list"),
        (lambda m: m(video(), []), ValueError, "class_names must be a non-empty list"),
        (lambda m: m(video(), ["run", 3]), TypeError, "class_names must contain non-empty strings"),
        (lambda m: m.forward_features(torch.randn(2, 4, 7), torch.randn(3, 32)), ValueError, "frames must have shape"),
        (lambda m: m.forward_features(torch.randn(2, 4, 32), torch.randn(3)), ValueError, "class_features must have"),
    ],
)
def test_bad_input(tiny, call, error, match):
    model, *_ = tiny
    with pytest.raises(error, match=match):
        call(model)


def test_wraps_any_clip_model():
    clip = open_clip.create_model("mpfast-tiny")
    model = MotionCLIP(clip, HeadConfig(num_heads=2))
    assert model.dim == 32
    with pytest.raises(RuntimeError, match="needs a tokenizer"):
        model.encode_classes(CLASSES)
    with pytest.raises(TypeError, match="encode_image"):
        MotionCLIP(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_heads must divide"):
        MotionCLIP(clip, HeadConfig(num_heads=5))


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"num_frames": 0}, ValueError, "num_frames must be a positive int"),
        ({"strides": (1, 0)}, ValueError, "strides must be ints >= 1"),
        ({"strides": ()}, ValueError, "strides must be None or a non-empty"),
        ({"templates": ("no placeholder",)}, ValueError, "each template must be a string containing"),
        ({"num_promts": 4}, TypeError, r"unknown head option\(s\) \['num_promts'\]"),
    ],
)
def test_bad_head_options(options, error, match):
    with pytest.raises(error, match=match):
        HeadConfig.from_options(**options)


def test_custom_strides(tiny_model_name):
    model, *_ = mpfast.create_model_and_transforms(tiny_model_name, num_frames=6, num_heads=4, strides=(1, 2, 3))
    assert model.motion.gate.shape == (3, 32)
    set_gates(model)
    assert model(video(frames=6), CLASSES).shape == (2, 3)


def test_transforms(tiny):
    _, train_tf, eval_tf, _ = tiny
    clip_frames = torch.randint(0, 256, (1, 40, 56, 3), dtype=torch.uint8).expand(5, 40, 56, 3)
    for transform in (train_tf, eval_tf):
        out = transform(clip_frames)
        assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
        # One crop and one flip per video: identical frames stay identical.
        assert (out - out[:1]).abs().max() == 0
    channels_first = clip_frames.permute(0, 3, 1, 2)
    torch.testing.assert_close(eval_tf(channels_first), eval_tf(clip_frames))
    with pytest.raises(ValueError, match="video must be a tensor"):
        eval_tf(torch.zeros(40, 56, 3))
    with pytest.raises(ValueError, match="3 colour channels"):
        eval_tf(torch.zeros(5, 4, 40, 56))


def test_eval_transform_matches_open_clip_preprocess(tiny_model_name):
    """Same resize, crop and normalisation as open_clip's own eval preprocessing."""
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(tiny_model_name)
    _, _, eval_tf, _ = mpfast.create_model_and_transforms(tiny_model_name, num_heads=4)
    # A smooth picture: PIL and tensor bicubic resizing agree on it up to rounding.
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    frame = (torch.stack([x, y, (x + y) / 2], dim=-1) * 255).round().to(torch.uint8)
    expected = preprocess(Image.fromarray(frame.numpy()))
    torch.testing.assert_close(eval_tf(frame[None])[0], expected, atol=0.05, rtol=0)


def moving(frames=8, batch=2, dim=32, step=0.05, seed=0):
    """Frame embeddings that drift along one random direction per video (a 'motion')."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, dim, generator=generator)
    direction = torch.randn(batch, 1, dim, generator=generator)
    return base + step * torch.arange(frames).view(1, frames, 1) * direction


def test_default_strides_are_powers_of_two_below_the_frame_count():
    from mpfast.model.motion import motion_strides

    assert motion_strides(8) == (1, 2, 4)
    assert motion_strides(16) == (1, 2, 4, 8)
    assert motion_strides(5) == (1, 2, 4)
    assert motion_strides(2) == motion_strides(1) == (1,)
    model = MotionCLIP(open_clip.create_model("mpfast-tiny"), HeadConfig(num_frames=16, num_heads=4))
    assert model.motion.strides == (1, 2, 4, 8) and model.motion.gate.shape == (4, 32)


def test_motion_is_zero_where_a_stride_has_no_partner_frame(tiny):
    model, *_ = tiny
    set_gates(model)
    m = model.motion.motion(moving(frames=4))
    assert model.motion.strides == (1, 2)
    assert torch.count_nonzero(m[:, 0, 3]) == 0 and torch.count_nonzero(m[:, 1, 2:]) == 0
    assert m[:, 0, :3].abs().sum() > 0 and m[:, 1, :2].abs().sum() > 0


def test_motion_ignores_the_scale_of_the_embeddings(tiny):
    model, *_ = tiny
    frames = moving()
    torch.testing.assert_close(model.motion.motion(1000 * frames), model.motion.motion(frames), rtol=1e-4, atol=1e-5)


def test_noise_of_a_static_video_stays_small(tiny):
    # The per-video scale has a floor (1 % of the frames' RMS): codec noise of a static
    # video is not blown up to the size of real motion, as a per-vector norm would.
    model, *_ = tiny
    generator = torch.Generator().manual_seed(1)
    static = torch.randn(2, 1, model.dim, generator=generator).expand(2, 8, model.dim)
    noisy = static + 1e-5 * torch.randn(2, 8, model.dim, generator=generator)
    real = model.motion.motion(moving(dim=model.dim)).norm()
    assert model.motion.motion(noisy).norm() < 0.01 * real
    model.motion.floor = 0.0
    assert model.motion.motion(noisy).norm() > 0.1 * real


def test_prompts_do_not_train_the_motion_stream(tiny):
    model, *_ = tiny
    set_gates(model)
    mu = torch.randn(2, model.dim, requires_grad=True)
    prompts = model.prompts(mu)
    prompts.sum().backward()
    assert mu.grad is None and model.prompts.fc1.weight.grad is not None


def test_untrained_model_without_prompts_is_clip_zero_shot(tiny_model_name):
    model, _, _, tokenizer = mpfast.create_model_and_transforms(tiny_model_name, num_frames=4, num_heads=4, num_prompts=0)
    assert model.prompts is None
    x = video()
    torch.testing.assert_close(model(x, CLASSES), clip_zero_shot(model.clip, tokenizer, x, CLASSES), rtol=1e-5, atol=1e-5)
    set_gates(model)
    assert torch.isfinite(model(x, CLASSES)).all()


def test_class_contrast_adapter():
    from mpfast.model.communication import class_contrast

    text = torch.randn(5, 8)
    contrast = class_contrast(text)
    torch.testing.assert_close(contrast.mean(dim=0), torch.zeros(8), rtol=0, atol=1e-6)
    torch.testing.assert_close(contrast.pow(2).mean(), torch.tensor(1.0))
    torch.testing.assert_close(class_contrast(3 * text + 1), contrast)
    assert torch.count_nonzero(class_contrast(text[:1])) == 0  # one class: nothing to contrast


def test_one_class_with_every_part_awake(tiny):
    model, *_ = tiny
    set_gates(model)
    logits = model(video(), CLASSES[:1])
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"norm_eps": 1e-6}, r"head option\(s\) \['norm_eps'\] belong to an earlier design"),
        ({"motion_floor": -0.1}, "motion_floor must be a finite number >= 0"),
        ({"motion_floor": float("nan")}, "motion_floor must be a finite number >= 0"),
        ({"num_prompts": -1}, "num_prompts must be an int >= 0"),
    ],
)
def test_bad_motion_options(options, match):
    with pytest.raises(ValueError, match=match):
        HeadConfig.from_options(**options)


@pytest.fixture
def fused(tiny):
    """The tiny model on the fused path (its auto choice is the unfused one: H L >= D), heads' scales non-zero."""
    model, *_ = tiny
    set_gates(model)
    model.fused_logits = True
    return model


def _uncached(model, frames, classes):
    model.cache_class_side = False
    try:
        return model.forward_features(frames, classes)
    finally:
        model.cache_class_side = True


def test_class_side_is_cached_without_gradients(fused, monkeypatch):
    model = fused
    calls = []
    class_side = model.communication.class_side
    monkeypatch.setattr(model.communication, "class_side", lambda text: calls.append(1) or class_side(text))
    frames, classes = torch.randn(2, 4, model.dim), torch.randn(5, model.dim)
    with torch.no_grad():
        first = model.forward_features(frames, classes)
        second = model.forward_features(frames[:1], classes)
    with torch.inference_mode():
        third = model.forward_features(frames, classes)
    assert len(calls) == 1
    torch.testing.assert_close(second, first[:1])
    torch.testing.assert_close(third, first)
    model.forward_features(frames, classes)  # gradients recorded: computed afresh
    with torch.no_grad():
        model.forward_features(frames, classes.clone())  # other class embeddings
    assert len(calls) == 3


def test_class_side_cache_follows_weights_features_and_conversions(fused):
    model = fused
    frames, classes = torch.randn(2, 4, model.dim), torch.randn(5, model.dim)
    with torch.no_grad():
        before = model.forward_features(frames, classes)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.communication.text_scale.add_(0.3)  # an optimizer step: in place
        stepped = model.forward_features(frames, classes)
        torch.testing.assert_close(stepped, _uncached(model, frames, classes))
        assert not torch.allclose(stepped, before)
        model.load_state_dict(state)
        torch.testing.assert_close(model.forward_features(frames, classes), before)
        classes.mul_(-1)  # the class embeddings changed in place
        torch.testing.assert_close(model.forward_features(frames, classes), _uncached(model, frames, classes))
    model.double()
    assert not model._class_side_cache
    with torch.no_grad():
        logits = model.forward_features(frames.double(), classes.double())
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, _uncached(model, frames.double(), classes.double()))
