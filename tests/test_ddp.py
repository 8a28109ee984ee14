"""Data parallel: 2 gloo processes on CPU take the same steps as 1 process with the same global batch."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

pytest.importorskip("decord")
pytest.importorskip("av")

from mpfast import create_model_and_transforms
from mpfast.data import ClipTransform, SamplingConfig, VideoDataset, read_list
from mpfast.data.synthetic import make_synthetic_dataset
from mpfast.engine import FeatureCache, FeatureDataset, TrainConfig, Trainer, build_cache, evaluate

TINY_CONFIG = Path(__file__).parent / "configs" / "mpfast-tiny.json"
CLASSES = ["moving left", "moving right", "moving up", "moving down"]


def _model():
    import open_clip

    open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    return create_model_and_transforms("mpfast-tiny", None, num_frames=4)[0]


def _features():
    generator = torch.Generator().manual_seed(5)
    return FeatureCache.from_tensors(torch.randn(20, 2, 4, 32, generator=generator), torch.arange(20) % 4)


def _video_dataset(paths):
    return VideoDataset(read_list(paths["train"]), paths["root"], SamplingConfig(4), ClipTransform(32))


def _run(paths, cache_dir, output):
    """Trains, evaluates and caches; every process of a group calls it."""
    model = _model()
    trainer = Trainer(model, CLASSES, FeatureDataset(_features(), train=True, seed=2),
                      TrainConfig(epochs=2, batch_size=8, lr=1e-2, progress=False))
    trainer.fit()
    _, logits, labels = evaluate(model, FeatureDataset(_features()), CLASSES, batch_size=3)
    cache = build_cache(model, _video_dataset(paths), cache_dir, "mpfast-tiny", batch_size=2, shard_size=3)
    entries = read_list(paths["train"])
    moved = [entries[0], entries[-1], *entries[1:-1]]  # the broken video at position 1: the second process's
    videos, _, _ = evaluate(model, VideoDataset(moved, paths["root"], SamplingConfig(4), ClipTransform(32)), CLASSES,
                            batch_size=2)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tensors = {f"head.{k}": v.detach().contiguous() for k, v in model.named_parameters() if not k.startswith("clip.")}
        tensors.update(logits=logits, labels=labels, features=cache.features[:], indices=cache.indices)
        save_file(tensors, output, metadata={"failed": ",".join(map(str, sorted(cache.failed))),
                                             "shards": ",".join(str(shard["rank"]) for shard in cache.meta["shards"]),
                                             "video_eval": f"{videos['count']},{videos['skipped']}"})


def _worker(rank, world, port, paths, cache_dir, output):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run(paths, cache_dir, output)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    paths = make_synthetic_dataset(tmp_path / "data", train_per_class=2, test_per_class=1, size=32, num_frames=8)
    (tmp_path / "data" / "broken.mp4").write_bytes(b"")
    with open(paths["train"], "a") as handle:
        handle.write("broken.mp4 1\n")
    _run(paths, tmp_path / "cache1", tmp_path / "single.safetensors")
    mp.spawn(_worker, args=(2, _free_port(), paths, tmp_path / "cache2", tmp_path / "ddp.safetensors"), nprocs=2)
    single, ddp = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "ddp.safetensors")
    assert single.keys() == ddp.keys()
    initial = {f"head.{k}": v.detach() for k, v in _model().named_parameters() if not k.startswith("clip.")}
    for name in initial:
        assert (single[name] - initial[name]).abs().max() > 0, name  # training moved every tensor
        got, expected = ddp[name], single[name]
        if name.endswith("key_value.bias"):
            # The key half of these biases adds the same score to every key, which the
            # softmax ignores: its gradient is rounding noise, which Adam turns into steps
            # of size ~lr in both runs. Only the value half is compared.
            got, expected = got[got.shape[0] // 2:], expected[expected.shape[0] // 2:]
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4, msg=name)
    for name in ("logits", "labels", "features", "indices"):
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-4, msg=name)
    assert single["logits"].shape == (20, 4)  # evaluation gathered every video once
    from safetensors import safe_open

    with safe_open(tmp_path / "ddp.safetensors", "pt") as handle:
        meta = handle.metadata()
    with safe_open(tmp_path / "single.safetensors", "pt") as handle:
        assert handle.metadata()["video_eval"] == meta["video_eval"] == "8,1"  # 8 scored, 1 skipped by process 1
    assert meta["failed"] == "8"  # the broken video, found by one process, in the merged metadata
    assert meta["shards"] == "0,1,0"  # the 3 shards of 9 videos, dealt out to the 2 processes
