"""Feature cache: same features as encoding on the fly, reuse, and invalidation."""

import dataclasses
import json
import logging
import os

import pytest
import torch

pytest.importorskip("decord")
pytest.importorskip("av")

from mpfast import create_model_and_transforms
from mpfast.data import ClipTransform, SamplingConfig, VideoDataset, read_list
from mpfast.data.synthetic import make_synthetic_dataset
from mpfast.engine import FeatureCache, FeatureDataset, TrainConfig, Trainer, build_cache, evaluate
from mpfast.engine.cache import collate_features


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = make_synthetic_dataset(root, train_per_class=2, test_per_class=1, size=32, num_frames=12)
    (root / "broken.mp4").write_bytes(b"not a video")
    with open(paths["train"], "a") as handle:
        handle.write("broken.mp4 0\n")
    return paths


@pytest.fixture
def model(tiny_model_name):
    torch.manual_seed(0)
    return create_model_and_transforms(tiny_model_name, None, num_frames=4)[0]


def _dataset(paths, num_frames=4, crops=1, clips=2, mode="segment"):
    return VideoDataset(read_list(paths["train"]), paths["root"], SamplingConfig(num_frames, mode, 2),
                        ClipTransform(32, crops=crops), num_clips=clips)


def _count_encodes(model, monkeypatch):
    calls = []
    original = model.encode_frames

    def counting(video):
        calls.append(video.shape[0])
        return original(video)

    monkeypatch.setattr(model, "encode_frames", counting)
    return calls


def test_cache_holds_the_encoded_views_and_skips_broken_videos(data, model, tmp_path, tiny_model_name):
    dataset = _dataset(data)
    cache = build_cache(model, dataset, tmp_path, tiny_model_name, batch_size=3)
    count = len(dataset)
    assert cache.meta["count"] == count and list(cache.failed) == [count - 1]
    assert cache.features.shape == (count - 1, 2, 4, model.dim)
    assert cache.indices.tolist() == list(range(count - 1))
    for index in (0, 5):
        item = dataset[index]
        expected = model.encode_frames(item["video"])
        torch.testing.assert_close(cache.features[index], expected)
        assert cache.labels[index] == item["label"]
    train = FeatureDataset(cache, train=True, seed=1)
    batch = collate_features([train[0], train[1]])
    assert batch["features"].shape == (2, 1, 4, model.dim)
    assert any(torch.equal(train[0]["features"][0], cache.features[0, v]) for v in range(2))


def test_cache_is_reused_without_decoding(data, model, tmp_path, tiny_model_name, monkeypatch):
    first = build_cache(model, _dataset(data), tmp_path, tiny_model_name)
    calls = _count_encodes(model, monkeypatch)
    again = build_cache(model, _dataset(data), tmp_path, tiny_model_name)
    assert calls == [] and again.folder == first.folder
    torch.testing.assert_close(again.features, first.features)


def test_interrupted_cache_is_rebuilt(data, model, tmp_path, tiny_model_name):
    first = build_cache(model, _dataset(data), tmp_path, tiny_model_name)
    os.remove(os.path.join(first.folder, "meta.json"))
    with pytest.raises(FileNotFoundError, match="not a complete feature cache"):
        FeatureCache(first.folder)
    rebuilt = build_cache(model, _dataset(data), tmp_path, tiny_model_name)
    torch.testing.assert_close(rebuilt.features, first.features)


@pytest.mark.parametrize("change", ["frames", "sampling", "transform", "weights", "video_file"])
def test_any_input_change_gives_a_new_cache(data, model, tmp_path, tiny_model_name, change, monkeypatch):
    dataset = _dataset(data)
    old = build_cache(model, dataset, tmp_path, tiny_model_name)
    if change == "frames":
        dataset = _dataset(data, num_frames=6)
    elif change == "sampling":
        dataset = _dataset(data, mode="dense")
    elif change == "transform":  # only the transform: the clip count is part of the sampling
        dataset = _dataset(data, crops=3)
    elif change == "weights":
        with torch.no_grad():
            next(model.clip.visual.parameters()).add_(0.5)
    else:
        path = dataset.path(0)
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    calls = _count_encodes(model, monkeypatch)
    new = build_cache(model, dataset, tmp_path, tiny_model_name)
    assert new.folder != old.folder and calls
    with open(os.path.join(old.folder, "meta.json")) as handle:
        old_inputs = json.load(handle)["inputs"]
    assert old_inputs != new.meta["inputs"]
    if change in ("weights",):
        assert not torch.allclose(new.features, old.features)


def test_cache_rejects_training_datasets(data, model, tmp_path, tiny_model_name):
    dataset = _dataset(data)
    train = dataclasses.replace(dataset.transform, train=True, crops=1)
    with pytest.raises(ValueError, match="evaluation-mode"):
        build_cache(model, VideoDataset(dataset.entries, dataset.root, dataset.sampling, train), tmp_path, tiny_model_name)


def test_videos_left_out_of_a_reused_cache_are_counted(data, model, tmp_path, tiny_model_name, caplog):
    build_cache(model, _dataset(data), tmp_path, tiny_model_name)
    cache = build_cache(model, _dataset(data), tmp_path, tiny_model_name)  # reused: nothing decoded
    broken = cache.meta["count"] - 1
    classes = ["moving left", "moving right", "moving up", "moving down"]
    caplog.clear()  # the build's own warning
    with caplog.at_level(logging.WARNING, logger="mpfast.data"):
        metrics, _, _ = evaluate(model, FeatureDataset(cache), classes)
        trainer = Trainer(model, classes, FeatureDataset(cache, train=True),
                          TrainConfig(epochs=1, batch_size=4, progress=False))
    assert metrics["skipped"] == 1 and metrics["count"] == broken
    assert list(trainer.broken.failed) == [broken]
    assert caplog.text.count("skipping video") == 2 and "broken.mp4" in caplog.text and "1 video(s) skipped" in caplog.text
    subset = FeatureDataset(cache, positions=[0, broken, 3])
    assert len(subset) == 2 and list(subset.failed) == [broken] and [subset[i]["index"] for i in range(2)] == [0, 3]
    assert FeatureDataset(cache, positions=[1, 2]).failed == {}
    with pytest.raises(ValueError, match="not videos of the cache"):
        FeatureDataset(cache, positions=[broken + 1])
