"""create_model_and_transforms: local checkpoints, offline tags, clear errors."""

import json
from pathlib import Path

import open_clip
import pytest
import torch

import mpfast
from mpfast.model import factory


def test_local_checkpoint(tmp_path, tiny_model_name):
    source = open_clip.create_model(tiny_model_name)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    model, train_tf, eval_tf, tokenizer = mpfast.create_model_and_transforms(tiny_model_name, pretrained=str(path),
                                                                             num_heads=4)
    loaded = model.clip.state_dict()
    for name, value in source.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
    assert tokenizer(["a video"]).shape == (1, 16)
    assert eval_tf.image_size == 32


def test_local_safetensors_checkpoint(tmp_path, tiny_model_name):
    from safetensors.torch import save_file

    source = open_clip.create_model(tiny_model_name)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model, *_ = mpfast.create_model_and_transforms(tiny_model_name, pretrained=path, num_heads=4)
    torch.testing.assert_close(model.clip.visual.conv1.weight, source.visual.conv1.weight, rtol=0, atol=0)


def test_offline_tag_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setattr(factory, "_hub_unreachable", lambda: "cannot resolve the hub (test)")
    with pytest.raises(RuntimeError, match=r"could not download .*'openai'.*pass its path: .*pretrained='/path/to/"):
        mpfast.create_model_and_transforms("ViT-B-32", pretrained="openai")


def test_download_failure_says_how_to_pass_a_file(monkeypatch):
    """A failure inside open_clip (offline cache miss, hub error) is re-raised with the same advice."""
    monkeypatch.setattr(factory, "_hub_unreachable", lambda: None)

    def fail(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(factory.open_clip, "create_model", fail)
    with pytest.raises(RuntimeError, match=r"OSError: Name or service not known.*pass its path"):
        mpfast.create_model_and_transforms("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"model_name": "ViT-Nope"}, ValueError, "unknown model_name 'ViT-Nope'"),
        ({"model_name": 3}, TypeError, "model_name must be an open_clip model name"),
        ({"model_name": "ViT-B-32", "pretrained": "not-a-tag"}, ValueError, "neither a file nor a tag of ViT-B-32"),
        ({"model_name": "ViT-B-32", "pretrained": "/no/such/file.pt"}, FileNotFoundError, "does not exist"),
        ({"model_name": "ViT-B-32", "pretrained": 5}, TypeError, "pretrained must be an open_clip tag or a checkpoint"),
        ({"model_name": "ViT-B-32", "num_frames": 0}, ValueError, "num_frames must be a positive int"),
        ({"model_name": "ViT-B-32", "bad_option": 1}, TypeError, "unknown head option"),
        ({"model_name": "mpfast-tiny", "precision": "fp8"}, ValueError, r"precision must be one of \('fp32', 'bf16'"),
        ({"model_name": "mpfast-tiny", "precision": "amp"}, ValueError, "precision must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mpfast.create_model_and_transforms(**kwargs)


@pytest.mark.slow
def test_vit_b16_smoke():
    """The real architecture (random weights): shapes, head size, zero-shot equivalence."""
    model, _, eval_tf, tokenizer = mpfast.create_model_and_transforms("ViT-B-16", num_frames=2)
    assert model.dim == 512
    head = sum(p.numel() for p in model.trainable_parameters())
    assert 1e6 < head < 3e6, head
    frames = eval_tf(torch.randint(0, 256, (2, 240, 320, 3), dtype=torch.uint8))
    x = frames[None]
    classes = ["archery", "bowling"]
    logits = model(x, classes)
    with torch.no_grad():
        image = model.clip.encode_image(x[0]).mean(0, keepdim=True)
        text = model.clip.encode_text(tokenizer([f"a video of a person {c}." for c in classes]))
    expected = model.clip.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ \
        torch.nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_clip_takes_float32_frames(tiny_model_name, precision, dtype):
    model, _, eval_tf, _ = mpfast.create_model_and_transforms(tiny_model_name, num_frames=2, precision=precision)
    assert model.clip.visual.conv1.weight.dtype == dtype and model.motion.gate.dtype == torch.float32
    video = eval_tf(torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8))[None]  # float32 frames
    with torch.no_grad():
        logits = model(video, ["a", "b"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    reference, *_ = mpfast.create_model_and_transforms(tiny_model_name, num_frames=2)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        expected = reference(video, ["a", "b"])
    torch.testing.assert_close(logits.softmax(-1), expected.softmax(-1), atol=0.02, rtol=0)


def test_add_model_config_from_a_file_or_a_dict(tmp_path):
    config = json.loads((factory.SHIPPED_CONFIGS / "mpfast-tiny.json").read_text())
    config["embed_dim"] = 16
    path = tmp_path / "tiny16.json"
    path.write_text(json.dumps(config))
    assert factory.add_model_config(path) == "tiny16" and open_clip.get_model_config("tiny16") == config
    config["embed_dim"] = 24
    assert factory.add_model_config(config, "tiny16") == "tiny16"  # a checkpoint's config replaces it
    assert mpfast.create_model_and_transforms("tiny16", num_frames=2, num_heads=4)[0].dim == 24
    with pytest.raises(FileNotFoundError, match="model config .*missing.json' does not exist"):
        factory.add_model_config(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"embed_dim": 8}')
    with pytest.raises(ValueError, match=r"broken.json' is not an open_clip model config: it needs the keys"):
        factory.add_model_config(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="needs a model name"):
        factory.add_model_config(config)


def test_shipped_configs_are_package_data():
    assert factory.shipped_model_names() == ["mpfast-tiny"]
    assert factory.SHIPPED_CONFIGS.parent == Path(mpfast.__file__).parent
    assert (Path(__file__).parent / "configs" / "mpfast-tiny.json").resolve() == (
        factory.SHIPPED_CONFIGS / "mpfast-tiny.json")
