"""Feature cache: same features as encoding on the fly, reuse, invalidation, damage, memory maps, pruning."""

import dataclasses
import json
import logging
import os
import tracemalloc

import numpy as np
import pytest
import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("decord")
pytest.importorskip("av")

from benchmarks.cache_scale import write_synthetic_cache  # noqa: E402
from mpfast import create_model_and_transforms  # noqa: E402
from mpfast.data import ClipTransform, SamplingConfig, VideoDataset, read_list  # noqa: E402
from mpfast.data.synthetic import make_synthetic_dataset  # noqa: E402
from mpfast.engine import FeatureCache, FeatureDataset, TrainConfig, Trainer, build_cache, evaluate  # noqa: E402
from mpfast.engine import cache as cache_module  # noqa: E402
from mpfast.engine.cache import CacheError, collate_features, list_caches, prune_caches  # noqa: E402
from mpfast.engine.shards import ShardError, check_shard, read_header  # noqa: E402

SHARD = 4  # videos per shard in these tests: the 9 videos make shards of 4, 4 and 1


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


def _dataset(paths, num_frames=4, crops=1, clips=2, mode="segment", root=None):
    return VideoDataset(read_list(paths["train"]), root or paths["root"], SamplingConfig(num_frames, mode, 2),
                        ClipTransform(32, crops=crops), num_clips=clips)


def _build(model, data, tmp_path, name, **options):
    return build_cache(model, _dataset(data), tmp_path, name, shard_size=SHARD, **options)


def _count_encodes(model, monkeypatch):
    """Records how many clip views each encode_frames call gets (2 per video here)."""
    calls = []
    original = model.encode_frames

    def counting(video):
        calls.append(video.shape[0])
        return original(video)

    monkeypatch.setattr(model, "encode_frames", counting)
    return calls


def _shard(cache, number):
    return os.path.join(cache.folder, f"shard-{number:06d}.safetensors")


def test_cache_holds_the_encoded_views_and_skips_broken_videos(data, model, tmp_path, tiny_model_name):
    dataset = _dataset(data)
    cache = build_cache(model, dataset, tmp_path, tiny_model_name, batch_size=3, dtype="float32", shard_size=SHARD)
    count = len(dataset)
    assert cache.meta["count"] == count and list(cache.failed) == [count - 1]
    assert cache.features.shape == (count - 1, 2, 4, model.dim) and cache.features.storage_dtype == torch.float32
    assert cache.indices.tolist() == list(range(count - 1))
    assert [shard["rows"] for shard in cache.meta["shards"]] == [4, 4, 0]  # the last shard: the broken video only
    for index in (0, 5):
        item = dataset[index]
        expected = model.encode_frames(item["video"])
        torch.testing.assert_close(cache.features[index], expected)
        assert cache.labels[index] == item["label"]
    train = FeatureDataset(cache, train=True, seed=1)
    batch = collate_features([train[0], train[1]])
    assert batch["features"].shape == (2, 1, 4, model.dim)
    assert any(torch.equal(train[0]["features"][0], cache.features[0, v]) for v in range(2))
    assert cache.video_path(count - 1) == os.path.join(os.path.abspath(data["root"]), "broken.mp4")


def test_float16_is_the_default_and_within_its_rounding_of_float32(data, model, tmp_path, tiny_model_name):
    half = _build(model, data, tmp_path, tiny_model_name)
    full = _build(model, data, tmp_path, tiny_model_name, dtype="float32")
    assert half.folder != full.folder and half.meta["dtype"] == "float16"
    assert half.features.storage_dtype == torch.float16
    a, b = half.features[:], full.features[:]
    assert a.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=2**-11, atol=2**-24)  # float16 rounding, nothing more
    stored = {c.folder: sum(read_header(_shard(c, n)).tensors["features"][3] - read_header(_shard(c, n)).tensors[
        "features"][2] for n in range(3)) for c in (half, full)}
    assert stored[half.folder] * 2 == stored[full.folder] == 8 * 2 * 4 * model.dim * 4


def test_cache_is_reused_without_decoding(data, model, tmp_path, tiny_model_name, monkeypatch):
    first = _build(model, data, tmp_path, tiny_model_name)
    calls = _count_encodes(model, monkeypatch)
    again = _build(model, data, tmp_path, tiny_model_name)
    assert calls == [] and again.folder == first.folder and again.built == {"shards": 3, "computed": 0,
                                                                            "videos_encoded": 0}
    torch.testing.assert_close(again.features[:], first.features[:])


def test_an_interrupted_build_computes_only_the_missing_shards(data, model, tmp_path, tiny_model_name, monkeypatch):
    finish = cache_module._finish_shard
    written = []

    def crash_after_one(*args):
        if written:
            raise KeyboardInterrupt  # the process dies after its first shard
        finish(*args)
        written.append(args[4])

    monkeypatch.setattr(cache_module, "_finish_shard", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        _build(model, data, tmp_path, tiny_model_name)
    monkeypatch.setattr(cache_module, "_finish_shard", finish)
    folder = str(next(path for path in tmp_path.iterdir() if path.is_dir()))
    assert written == [0] and not os.path.exists(os.path.join(folder, "meta.json"))
    with pytest.raises(CacheError, match="not a complete feature cache"):
        FeatureCache(folder)
    with open(os.path.join(folder, ".tmp-half-written.safetensors"), "wb") as handle:
        handle.write(b"\0" * 10)
    calls = _count_encodes(model, monkeypatch)
    rebuilt = _build(model, data, tmp_path, tiny_model_name)
    # shards 1 and 2: 4 + 1 videos (the one of shard 2 is the broken one: nothing to encode), 2 views each
    assert sum(calls) == 2 * 4 and rebuilt.built == {"shards": 3, "computed": 2, "videos_encoded": 5}
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]
    fresh = build_cache(model, _dataset(data), tmp_path / "fresh", tiny_model_name, shard_size=SHARD)
    torch.testing.assert_close(rebuilt.features[:], fresh.features[:], rtol=0, atol=0)


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 7)


def _flip_a_byte(path):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) - 3)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x55]))


def _nan_resaved(path):
    """NaN features, written back with the shard's own header (as a careless edit would)."""
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors["features"][0, 0, 0, 0] = float("nan")
    save_file(tensors, path, metadata=metadata)


def _garbage(path):
    with open(path, "wb") as handle:
        handle.write(os.urandom(300))


DAMAGES = {"truncated": (_truncate, "cut short"), "flipped byte": (_flip_a_byte, "checksum"),
           "NaN features": (_nan_resaved, "non-finite"), "random bytes": (_garbage, "header"),
           "deleted": (os.remove, "missing")}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_shard_is_named_and_only_it_is_recomputed(data, model, tmp_path, tiny_model_name, monkeypatch,
                                                           caplog, damage):
    first = _build(model, data, tmp_path, tiny_model_name)
    reference = first.features[:]
    spoil, reason = DAMAGES[damage]
    spoil(_shard(first, 1))
    with pytest.raises(CacheError, match=rf"shard-000001.safetensors .*{reason}.*rerun `mpfast cache`"):
        FeatureCache(first.folder)
    calls = _count_encodes(model, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mpfast.engine"):
        healed = _build(model, data, tmp_path, tiny_model_name)
    assert sum(calls) == 2 * SHARD and healed.built["computed"] == 1  # shard 1 only
    assert f"{_shard(first, 1)} is {'missing' if damage == 'deleted' else 'damaged'}" in caplog.text
    torch.testing.assert_close(healed.features[:], reference, rtol=0, atol=0)
    FeatureCache(first.folder)  # sound again


@pytest.mark.parametrize("content", ["", "{\n", "[1, 2]", '{"version": 2}'])
def test_a_damaged_meta_json_is_rewritten_from_the_shards(data, model, tmp_path, tiny_model_name, monkeypatch,
                                                          caplog, content):
    first = _build(model, data, tmp_path, tiny_model_name)
    meta_path = os.path.join(first.folder, "meta.json")
    with open(meta_path, "w") as handle:
        handle.write(content)
    with pytest.raises(CacheError, match=r"meta.json is damaged"):
        FeatureCache(first.folder)
    calls = _count_encodes(model, monkeypatch)
    healed = _build(model, data, tmp_path, tiny_model_name)
    assert calls == [] and healed.meta["shards"] == first.meta["shards"] and healed.failed == first.failed


def test_a_damaged_shard_whose_videos_cannot_be_read_any_more(data, model, tmp_path, tiny_model_name, monkeypatch):
    first = _build(model, data, tmp_path, tiny_model_name)
    _flip_a_byte(_shard(first, 0))
    from mpfast.data import dataset as dataset_module

    load_clips = dataset_module.load_clips
    gone = _dataset(data).path(2)

    def unreadable(path, *args, **kwargs):
        if path == gone:
            raise dataset_module.VideoDecodeError(path, "permission denied")
        return load_clips(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "load_clips", unreadable)
    for _ in range(2):  # the shard stays damaged, so the error stays until something is done
        with pytest.raises(CacheError, match=rf"shard-000000.safetensors was damaged .* can no longer be read "
                                             rf"\(first: cannot read video '{gone}': permission denied\); restore "
                                             rf"those videos, or delete {first.folder}"):
            _build(model, data, tmp_path, tiny_model_name)
    monkeypatch.setattr(dataset_module, "load_clips", load_clips)  # the video is back
    _build(model, data, tmp_path, tiny_model_name)


@pytest.mark.parametrize("change", ["frames", "sampling", "transform", "weights", "video_file", "dtype"])
def test_any_input_change_gives_a_new_cache(data, model, tmp_path, tiny_model_name, change, monkeypatch):
    dataset = _dataset(data)
    old = build_cache(model, dataset, tmp_path, tiny_model_name)
    options = {}
    if change == "frames":
        dataset = _dataset(data, num_frames=6)
    elif change == "sampling":
        dataset = _dataset(data, mode="dense")
    elif change == "transform":  # only the transform: the clip count is part of the sampling
        dataset = _dataset(data, crops=3)
    elif change == "weights":
        with torch.no_grad():
            next(model.clip.visual.parameters()).add_(0.5)
    elif change == "dtype":
        options["dtype"] = "float32"
    else:
        path = dataset.path(0)
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    calls = _count_encodes(model, monkeypatch)
    new = build_cache(model, dataset, tmp_path, tiny_model_name, **options)
    assert new.folder != old.folder and calls
    with open(os.path.join(old.folder, "meta.json")) as handle:
        old_inputs = json.load(handle)["inputs"]
    assert old_inputs != new.meta["inputs"]
    if change in ("weights",):
        assert not torch.allclose(new.features[:], old.features[:])


def test_cache_rejects_training_datasets_and_bad_options(data, model, tmp_path, tiny_model_name):
    dataset = _dataset(data)
    train = dataclasses.replace(dataset.transform, train=True, crops=1)
    with pytest.raises(ValueError, match="evaluation-mode"):
        build_cache(model, VideoDataset(dataset.entries, dataset.root, dataset.sampling, train), tmp_path, tiny_model_name)
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_cache(model, dataset, tmp_path, tiny_model_name, dtype="bfloat16")
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        build_cache(model, dataset, tmp_path, tiny_model_name, shard_size=0)


def test_a_list_of_which_nothing_exists_fails_in_one_line(data, model, tmp_path, tiny_model_name):
    with pytest.raises(FileNotFoundError) as error:
        build_cache(model, _dataset(data, root=tmp_path / "nowhere"), tmp_path, tiny_model_name)
    message = str(error.value)
    assert "\n" not in message and "none of the 9 videos" in message
    assert f"first tried: '{tmp_path / 'nowhere' / 'videos'}" in message
    assert f"root: '{tmp_path / 'nowhere'}'" in message
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_list_of_which_nothing_can_be_read_fails_in_one_line(tmp_path, model, tiny_model_name):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"junk")
    (tmp_path / "list.txt").write_text("a.mp4 0\nb.mp4 1\n")
    dataset = _dataset({"train": tmp_path / "list.txt", "root": tmp_path})
    with pytest.raises(ValueError, match=r"nothing could be read: none of the 2 videos of the list \(first tried: "
                                           r"cannot read video .*a.mp4.*\); root: "):
        build_cache(model, dataset, tmp_path / "cache", tiny_model_name)


@pytest.mark.parametrize("values, error", [(float("nan"), "non-finite features"), (1e6, "--cache-dtype float32")])
def test_non_finite_or_overflowing_features_are_never_stored(data, model, tmp_path, tiny_model_name, monkeypatch,
                                                             values, error):
    original = model.encode_frames
    monkeypatch.setattr(model, "encode_frames", lambda video: torch.full_like(original(video), values))
    with pytest.raises((FloatingPointError, OverflowError), match=error):
        _build(model, data, tmp_path, tiny_model_name)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert not list(folder.glob("shard-*"))
    if values == 1e6:  # float32 holds them
        cache = _build(model, data, tmp_path, tiny_model_name, dtype="float32")
        assert cache.features[0].max() == 1e6


def test_rows_are_read_from_the_shard_files_across_shards(data, model, tmp_path, tiny_model_name):
    cache = _build(model, data, tmp_path, tiny_model_name)
    everything = cache.features[:]
    assert everything.shape == (8, 2, 4, model.dim)
    rows = [7, 0, 4, 3, 4, -1]
    torch.testing.assert_close(cache.features[rows], everything[rows], rtol=0, atol=0)
    torch.testing.assert_close(cache.features[torch.tensor(rows)], everything[rows], rtol=0, atol=0)
    torch.testing.assert_close(cache.features[5, 1:2], everything[5, 1:2], rtol=0, atol=0)
    torch.testing.assert_close(cache.features[5, 1], everything[5, 1], rtol=0, atol=0)
    torch.testing.assert_close(cache.features[rows, :, 2], everything[rows, :, 2], rtol=0, atol=0)
    torch.testing.assert_close(cache.features[2:6], everything[2:6], rtol=0, atol=0)
    assert cache.features[[]].shape == (0, 2, 4, model.dim)
    with pytest.raises(IndexError, match=r"row\(s\) \[8\] out of range for 8 cached videos"):
        cache.features[8]
    with pytest.raises(IndexError):
        cache.features[[0, 9]]
    in_ram = cache.in_memory()
    torch.testing.assert_close(in_ram.features[rows], everything[rows], rtol=0, atol=0)
    _truncate(_shard(cache, 1))  # a file cut short under a running job: an error, not garbage
    with pytest.raises(ShardError, match="shard-000001.safetensors was cut short while in use"):
        cache.features[7]


def _mapped_file_bytes():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_an_epoch_over_a_cache_keeps_resident_memory_to_its_batches(tmp_path):
    """The scale benchmark (benchmarks/cache_scale.py) scaled down: 64 MB of features, every row in random order.

    Allocations are counted by tracemalloc (numpy reports its buffers to it), pages of
    mapped files by the kernel (RssFile: what memory-mapped reading would hold).
    """
    folder = write_synthetic_cache(str(tmp_path), 8192, frames=8, dim=512, classes=4, shard_size=1024)
    order = np.random.default_rng(0).permutation(8192)
    held, mapped = {}, {}
    tracemalloc.start()
    try:
        for where in ("disk", "ram"):
            cache = FeatureCache(folder)
            tracemalloc.reset_peak()
            allocated, pages = tracemalloc.get_traced_memory()[0], _mapped_file_bytes()
            dataset = FeatureDataset(cache.in_memory() if where == "ram" else cache, train=True)
            for position in order:
                dataset[position]
            held[where] = tracemalloc.get_traced_memory()[1] - allocated
            mapped[where] = _mapped_file_bytes() - pages
            del cache, dataset
    finally:
        tracemalloc.stop()
    assert held["disk"] < 4 << 20 and mapped["disk"] < 4 << 20, (held, mapped)  # the features are 64 MB
    assert held["ram"] >= 64 << 20, held  # what holding them costs


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


def test_check_shard_reports_another_caches_shard(data, model, tmp_path, tiny_model_name):
    cache = _build(model, data, tmp_path, tiny_model_name)
    expected = {"key": cache.meta["key"], "number": 1, "start": 4, "stop": 8, "dtype": "float16",
                "row_shape": (2, 4, model.dim)}
    assert check_shard(_shard(cache, 1), expected).rows == 4
    with pytest.raises(ShardError, match="start is '4', expected 0"):
        check_shard(_shard(cache, 1), {**expected, "number": 1, "start": 0})
    with pytest.raises(ShardError, match="key is"):
        check_shard(_shard(cache, 1), {**expected, "key": "0" * 20})


def test_list_and_prune_caches(data, model, tmp_path, tiny_model_name):
    old = build_cache(model, _dataset(data), tmp_path, tiny_model_name)
    path = _dataset(data).path(1)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # a touched video
    new = build_cache(model, _dataset(data), tmp_path, tiny_model_name)
    busy = build_cache(model, _dataset(data, num_frames=6), tmp_path, tiny_model_name)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # stale, but in use below
    legacy = tmp_path / "0123456789abcdef0123"  # a cache of the previous format
    legacy.mkdir()
    (legacy / "meta.json").write_text('{"version": 1}')
    (tmp_path / "notes").mkdir()  # not a cache: never touched
    states = {info["cache"]: info["state"] for info in list_caches(tmp_path)}
    assert states == {old.folder: "stale", new.folder: "stale", busy.folder: "stale", str(legacy): "old format"}
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns - 10**9))
    lock = FileLock(busy.folder + ".lock")
    with lock:
        states = {info["cache"]: info["state"] for info in list_caches(tmp_path)}
        assert states == {old.folder: "stale", new.folder: "complete", busy.folder: "in use", str(legacy): "old format"}
        assert [info["cache"] for info in prune_caches(tmp_path, dry_run=True)] == sorted([old.folder, str(legacy)])
        assert all(os.path.isdir(folder) for folder in (old.folder, new.folder, busy.folder, legacy))
        pruned = prune_caches(tmp_path)
        assert sorted(info["cache"] for info in pruned) == sorted([old.folder, str(legacy)])
        assert all(info["bytes"] > 0 for info in pruned)
        assert prune_caches(tmp_path, older_than_days=0) and not os.path.exists(new.folder)  # unused "for 0 days"
    assert os.path.isdir(busy.folder) and os.path.isdir(tmp_path / "notes")
    FeatureCache(busy.folder)
    with pytest.raises(ValueError, match="older_than_days"):
        prune_caches(tmp_path, older_than_days=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_caches(tmp_path / "none")
