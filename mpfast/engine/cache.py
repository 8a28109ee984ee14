"""On-disk cache of frozen-CLIP frame features.

CLIP is frozen, so the features of a video's clip views never change unless something
that feeds them does. ``build_cache`` computes ``[N, V, T, D]`` features once (V views =
temporal clips x spatial crops) and stores them as safetensors shards in a folder named
by a key: the SHA-256 of everything that changes them —

* the model: open_clip name, its config, the precision, and a digest of the vision
  tower's weights (so random or retrained weights get their own cache);
* the frames: every video's path, size and modification time, and its label;
* the sampling (T, mode, stride, clips) and the transform (size, mean, std, crops).

A stale cache is never read: a different input gives a different key. A folder counts
as complete only once ``meta.json`` is written (last, atomically). Under
``torch.distributed`` every process encodes its own share (``index % world == rank``)
into its own shards, and rank 0 writes the metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ..data.dataset import BrokenVideoLog, VideoDataset, collate_videos, sample_seed
from . import distributed
from .checkpoint import atomic_save
from .files import set_default_mode
from .progress import advance, video_bar

logger = logging.getLogger("mpfast.engine")

CACHE_VERSION = 1
SHARD_SIZE = 1024  # videos per shard file


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def describe_inputs(model, model_name: str, dataset: VideoDataset, precision: str = "fp32") -> dict[str, Any]:
    """Everything the cached features depend on, as JSON values."""
    videos = hashlib.sha256()
    for index, entry in enumerate(dataset.entries):
        path = dataset.path(index)
        try:
            stat = os.stat(path)
            identity = f"{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            identity = "missing"
        videos.update(f"{entry.path}|{entry.label}|{identity}\n".encode())
    return {
        "version": CACHE_VERSION,
        "model": {"name": model_name, "config": open_clip.get_model_config(model_name), "precision": precision,
                  "visual_weights": weights_digest(model.clip.visual)},
        "videos": {"count": len(dataset.entries), "digest": videos.hexdigest(), "root": os.path.abspath(dataset.root)},
        "sampling": {**asdict(dataset.sampling), "clips": dataset.num_clips},
        "transform": dataset.transform.describe(),
    }


def cache_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:20]


class FeatureCache:
    """A complete cache folder: features of the readable videos, and the skipped ones.

    Attributes:
        features: float32 ``[N_ok, V, T, D]`` in dataset order of ``indices``.
        indices: int64 ``[N_ok]`` dataset positions of the rows.
        labels: int64 ``[N_ok]``.
        failed: ``{dataset index: message}`` of the videos that could not be read.
        meta: the metadata (its ``inputs`` field is the key's description).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        meta_path = os.path.join(self.folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{self.folder!r} is not a complete feature cache (no meta.json)")
        with open(meta_path, encoding="utf-8") as handle:
            self.meta = json.load(handle)
        features, indices, labels = [], [], []
        for shard in self.meta["shards"]:
            tensors = load_file(os.path.join(self.folder, shard))
            features.append(tensors["features"])
            indices.append(tensors["indices"])
            labels.append(tensors["labels"])
        order = torch.cat(indices).argsort()
        self.indices = torch.cat(indices)[order]
        self.labels = torch.cat(labels)[order]
        self.features = torch.cat(features)[order]
        self.failed = {int(k): v for k, v in self.meta["failed"].items()}
        if self.features.shape[0] != self.meta["count"] - len(self.failed):
            raise ValueError(f"cache {self.folder!r} is inconsistent: {self.features.shape[0]} rows, "
                             f"{self.meta['count']} videos, {len(self.failed)} failed")

    @classmethod
    def from_tensors(cls, features: torch.Tensor, labels: torch.Tensor) -> FeatureCache:
        """An in-memory cache of precomputed features ``[N, V, T, D]`` with labels ``[N]``."""
        if features.dim() != 4 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"need features [N,V,T,D] and labels [N], got {tuple(features.shape)}, {tuple(labels.shape)}")
        cache = cls.__new__(cls)
        cache.folder, cache.failed = None, {}
        cache.features, cache.labels = features, labels.long()
        cache.indices = torch.arange(features.shape[0])
        cache.meta = {"count": features.shape[0], "views": features.shape[1], "short": 0}
        return cache


def cache_folder(cache_dir: str | os.PathLike, description: dict[str, Any]) -> str:
    return os.path.join(os.fspath(cache_dir), cache_key(description))


def build_cache(model, dataset: VideoDataset, cache_dir: str | os.PathLike, model_name: str, *,
                precision: str = "fp32", batch_size: int = 16, num_workers: int = 0,
                device: str | torch.device = "cpu", progress: bool = False) -> FeatureCache:
    """Returns the cache of ``dataset``'s features, computing it when absent.

    Args:
        model: the MotionCLIP whose frozen CLIP encodes the frames.
        dataset: an evaluation-mode :class:`VideoDataset` (its views are cached).
        cache_dir: parent folder; the cache lives in ``cache_dir/<key>``.
        model_name: open_clip name of ``model.clip`` (part of the key).
        precision: the CLIP's precision (part of the key).
        batch_size: videos per encoding batch (per process).

    Under ``torch.distributed`` every process must call this; each encodes a share.
    """
    if dataset.train:
        raise ValueError("cache an evaluation-mode dataset (transform.train=False): training randomness cannot be cached")
    description = describe_inputs(model, model_name, dataset, precision)
    folder = cache_folder(cache_dir, description)
    if os.path.isfile(os.path.join(folder, "meta.json")):
        logger.info("using feature cache %s", folder)
        return FeatureCache(folder)
    rank, world = distributed.rank(), distributed.world_size()
    if rank == 0 and os.path.isdir(folder):
        shutil.rmtree(folder)  # an interrupted build
    distributed.barrier()
    os.makedirs(folder, exist_ok=True)
    started = time.perf_counter()
    share = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, share), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_videos)
    broken = BrokenVideoLog()
    shards, buffer = [], {"features": [], "indices": [], "labels": []}

    def flush() -> None:
        if not buffer["indices"]:
            return
        name = f"shard-r{rank:03d}-{len(shards):05d}.safetensors"
        atomic_save({key: torch.cat(values) for key, values in buffer.items()}, os.path.join(folder, name), {})
        shards.append(name)
        for values in buffer.values():
            values.clear()

    model.eval()
    bar = video_bar(len(dataset), "caching features") if progress and rank == 0 else None
    for batch in loader:
        broken.update(batch)
        advance(bar, (len(batch["index"]) + len(batch["failed"])) * world)
        if batch["video"] is None:
            continue
        video = batch["video"].to(device)
        features = model.encode_frames(video.flatten(0, 1)).float().cpu()
        buffer["features"].append(features.view(*video.shape[:3], -1))
        buffer["indices"].append(batch["index"])
        buffer["labels"].append(batch["label"])
        if sum(len(i) for i in buffer["indices"]) >= SHARD_SIZE:
            flush()
    flush()
    if bar is not None:
        bar.close()
    failed = {str(k): v for k, v in broken.failed.items()}
    with open(os.path.join(folder, f"part-r{rank:03d}.json"), "w", encoding="utf-8") as handle:
        json.dump({"shards": shards, "failed": failed, "short": broken.short}, handle)
    distributed.barrier()
    if rank == 0:
        merged = {"shards": [], "failed": {}, "short": 0}
        for part_rank in range(world):
            with open(os.path.join(folder, f"part-r{part_rank:03d}.json"), encoding="utf-8") as handle:
                part = json.load(handle)
            merged["shards"] += part["shards"]
            merged["failed"].update(part["failed"])
            merged["short"] += part["short"]
        meta = {"inputs": description, "count": len(dataset), "views": dataset.num_views,
                "num_frames": dataset.sampling.num_frames, **merged,
                "seconds": time.perf_counter() - started}
        _write_json_atomic(os.path.join(folder, "meta.json"), meta)
        logger.info("cached features of %d videos in %s (%.1f s; %s)", len(dataset), folder, meta["seconds"],
                    f"{len(merged['failed'])} skipped")
    distributed.barrier()
    broken.report()
    return FeatureCache(folder)


def _write_json_atomic(path: str, value: Any) -> None:
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(value, out, indent=1, default=str)
    set_default_mode(temporary)  # mkstemp makes 0600 files
    os.replace(temporary, path)


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features as a dataset.

    Args:
        cache: the features.
        train: one view per item (drawn from ``(seed, epoch, index)``) when True, else every view.
        seed: base seed of the view choice.
        positions: the dataset positions (indices into the cached video list) to serve,
            e.g. a few-shot subset; by default every readable video.

    Items: ``features`` float32 ``[V', T, D]``, ``label`` and ``index``. Videos the cache
    could not read are left out and listed in :attr:`failed`, so the caller can count them.
    """

    def __init__(self, cache: FeatureCache, *, train: bool = False, seed: int = 0,
                 positions: Sequence[int] | None = None):
        self.cache, self.train, self.seed, self.epoch = cache, train, seed, 0
        if positions is None:
            self.rows = list(range(cache.features.shape[0]))
            self.failed = dict(cache.failed)
        else:
            lookup = {int(index): row for row, index in enumerate(cache.indices.tolist())}
            unknown = [p for p in positions if p not in lookup and p not in cache.failed]
            if unknown:
                raise ValueError(f"positions {unknown[:5]} are not videos of the cache ({cache.meta['count']} videos)")
            self.rows = [lookup[p] for p in positions if p in lookup]
            self.failed = {p: cache.failed[p] for p in positions if p in cache.failed}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        row = self.rows[position]
        features = self.cache.features[row]
        index = int(self.cache.indices[row])
        if self.train and features.shape[0] > 1:
            view = int(np.random.default_rng(sample_seed(self.seed, self.epoch, index)).integers(features.shape[0]))
            features = features[view:view + 1]
        return {"features": features, "label": int(self.cache.labels[row]), "index": index}


def collate_features(items: Sequence[dict]) -> dict:
    """Batches :class:`FeatureDataset` items: ``features [B, V, T, D]``, ``label [B]``, ``index [B]``."""
    return {"features": torch.stack([item["features"] for item in items]),
            "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "failed": [], "short": 0}
