"""On-disk cache of frozen-CLIP frame features: crash-safe, safe to share, read row by row.

CLIP is frozen, so the features of a video's clip views never change unless something
that feeds them does. ``build_cache`` computes ``[N, V, T, D]`` features once (V views =
temporal clips x spatial crops) and stores them in a folder named by a key: the SHA-256
of everything that changes them —

* the model: open_clip name, its config, the precision, and a digest of the vision
  tower's weights (so random or retrained weights get their own cache);
* the frames: every video's path, size and modification time, and its label;
* the sampling (T, mode, stride, clips), the transform (size, mean, std, crops) and the
  storage (dtype, videos per shard).

A stale cache is never read: a different input gives a different key.

The folder holds independent shards (:mod:`mpfast.engine.shards`), shard ``i`` for the
videos ``[i * shard_size, (i + 1) * shard_size)`` of the list, each written atomically
with its range and checksums as soon as it is computed; ``videos.json`` (the inputs and
the list, written first) and ``meta.json`` (written last, atomically: the cache is
complete). A rerun after a crash checks the shards that are there, reuses the sound
ones and computes only the missing or damaged ones (a damaged shard is named in a
warning). Under ``torch.distributed`` the shards to compute are dealt out to the
processes, so a rerun with any number of processes reuses every finished shard.

One process at a time builds or repairs a key: a file lock (``filelock``) next to the
folder, ``<key>.lock``, is held while shards are checked, written and opened. A second
run on the same key waits, then finds the cache complete and reads it. Nothing deletes
a folder it does not hold the lock of; :func:`prune_caches` removes caches that no run
can use any more (a video changed or vanished, an older format) and, when asked, those
unused for some days.

Features are stored as float16 by default (``dtype="float32"`` on request) and read
row by row from the shard files when asked for (positional reads through the page
cache, see :class:`mpfast.engine.shards.ShardReader`): training and evaluation touch
only the rows they use and hold only their batches, so a cache larger than RAM can be
trained on; :meth:`FeatureCache.in_memory` loads a small one into RAM.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import open_clip
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader

from ..data.dataset import BrokenVideoLog, VideoDataset, collate_videos, sample_seed
from . import distributed
from .files import set_default_mode
from .progress import advance, video_bar
from .shards import (STORAGE_DTYPES, ShardError, ShardReader, allow_open_files, check_header, check_shard, read_array,
                     read_header, shard_name, write_shard)

logger = logging.getLogger("mpfast.engine")

CACHE_VERSION = 2
SHARD_SIZE = 1024  # videos per shard file
DEFAULT_DTYPE = "float16"  # storage dtype of the features
LOCK_POLL_SECONDS = 10.0
_KEY_PATTERN = re.compile(r"^[0-9a-f]{20}$")
_VERIFY_THREADS = min(8, os.cpu_count() or 1)  # threads checking shards (hashlib and numpy release the GIL)


class CacheError(RuntimeError):
    """A cache folder that cannot be used as it is (the message names the file and what to do)."""


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _file_identity(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}|{stat.st_mtime_ns}"


def _videos_digest(entries: Sequence[tuple[str, int]], root: str, with_files: bool) -> str:
    """SHA-256 of a list's paths and labels and, ``with_files``, the size and mtime of each file."""
    digest = hashlib.sha256()
    for path, label in entries:
        identity = f"|{_file_identity(os.path.join(root, path))}" if with_files else ""
        digest.update(f"{path}|{label}{identity}\n".encode())
    return digest.hexdigest()


def describe_inputs(model, model_name: str, dataset: VideoDataset, precision: str = "fp32", *,
                    dtype: str = DEFAULT_DTYPE, shard_size: int | None = None) -> dict[str, Any]:
    """Everything the cached features depend on, as JSON values."""
    entries = [(entry.path, entry.label) for entry in dataset.entries]
    return {
        "version": CACHE_VERSION,
        "model": {"name": model_name, "config": open_clip.get_model_config(model_name), "precision": precision,
                  "visual_weights": weights_digest(model.clip.visual)},
        "videos": {"count": len(entries), "digest": _videos_digest(entries, dataset.root, True),
                   "list": _videos_digest(entries, dataset.root, False), "root": os.path.abspath(dataset.root)},
        "sampling": {**asdict(dataset.sampling), "clips": dataset.num_clips},
        "transform": dataset.transform.describe(),
        "storage": {"dtype": dtype, "shard_size": SHARD_SIZE if shard_size is None else shard_size},
    }


def cache_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_json_atomic(path: str, value: Any) -> None:
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(value, out, indent=1, default=str)
            out.flush()
            os.fsync(out.fileno())
        set_default_mode(temporary)  # mkstemp makes 0600 files
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from a file, or :class:`CacheError` naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, dict):
        raise CacheError(f"{path} is damaged (not a JSON object)")
    return value


def _shard_bounds(number: int, count: int, shard_size: int) -> tuple[int, int]:
    return number * shard_size, min((number + 1) * shard_size, count)


def _videos_in(meta: dict[str, Any], numbers: Sequence[int]) -> int:
    """How many videos shards ``numbers`` cover."""
    return sum(stop - start for start, stop in (_shard_bounds(n, meta["count"], meta["shard_size"]) for n in numbers))


def _expected(meta: dict[str, Any], number: int) -> dict[str, Any]:
    """What shard ``number`` of a cache must look like."""
    start, stop = _shard_bounds(number, meta["count"], meta["shard_size"])
    return {"key": meta["key"], "number": number, "start": start, "stop": stop, "dtype": meta["dtype"],
            "row_shape": meta.get("row_shape")}


class _InMemory:
    """Rows of a feature array held in RAM (the block interface of :class:`ShardReader`)."""

    def __init__(self, array: np.ndarray):
        self.array, self.dtype, self.shape = array, array.dtype, array.shape

    def __len__(self) -> int:
        return len(self.array)

    def read(self, rows: np.ndarray, rest: tuple = ()) -> np.ndarray:
        return self.array[(rows, *rest)]

    def read_all(self) -> np.ndarray:
        return self.array


class CachedFeatures:
    """The feature rows of a cache, ``[N, V, T, D]``, read on demand as float32 tensors.

    ``features[i]`` is ``[V, T, D]``; ``features[rows]`` (slice, list, array or tensor)
    is ``[n, V, T, D]``; further indices select views etc. (``features[i, 0:1]`` reads
    one view). ``features[:]`` reads everything (small caches only). Rows of an on-disk
    cache are read from their shard files when asked for, nothing else is kept.
    """

    def __init__(self, blocks: Sequence[ShardReader | _InMemory], row_shape: tuple[int, ...]):
        self._blocks = list(blocks)
        self._offsets = np.cumsum([0] + [len(block) for block in self._blocks])
        self.shape = (int(self._offsets[-1]), *row_shape)
        storage = self._blocks[0].dtype if self._blocks else np.dtype(np.float32)
        self.storage_dtype = torch.from_numpy(np.zeros(0, dtype=storage)).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        single = isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0)
        if single:
            rows = np.array([int(key)])
        else:
            rows = (np.arange(self.shape[0])[key] if isinstance(key, slice)
                    else np.asarray(key, dtype=np.int64).reshape(-1))
        if rows.size and (rows.min() < -self.shape[0] or rows.max() >= self.shape[0]):
            raise IndexError(f"row(s) {rows[(rows < -self.shape[0]) | (rows >= self.shape[0])][:3].tolist()} out of "
                             f"range for {self.shape[0]} cached videos")
        values = self._gather(rows % max(self.shape[0], 1), rest)
        return torch.from_numpy(values[0] if single else values)

    def _gather(self, rows: np.ndarray, rest: tuple) -> np.ndarray:
        inner = np.empty((0, *self.shape[1:]), dtype=np.float32)[(slice(None), *rest)].shape[1:]
        out = np.empty((rows.size, *inner), dtype=np.float32)
        blocks = np.searchsorted(self._offsets, rows, side="right") - 1
        for block in np.unique(blocks):
            chosen = blocks == block
            out[chosen] = self._blocks[block].read(rows[chosen] - self._offsets[block], rest)
        return out


class FeatureCache:
    """A complete cache folder: features of the readable videos, and the skipped ones.

    Args:
        folder: the cache folder (``cache_dir/<key>``, holding ``meta.json``).
        verify: read every shard and check its checksums and values (no memory is
            kept); False checks only the headers and sizes.

    Attributes:
        features: :class:`CachedFeatures` ``[N_ok, V, T, D]`` in dataset order of ``indices``.
        indices: int64 ``[N_ok]`` dataset positions of the rows.
        labels: int64 ``[N_ok]``.
        failed: ``{dataset index: message}`` of the videos that could not be read.
        meta: the metadata (its ``inputs`` field is the key's description).
        built: what :func:`build_cache` did (``shards``, ``computed``, ``videos_encoded``), else None.

    Raises:
        CacheError: naming the file that is missing or damaged and what to do.
    """

    def __init__(self, folder: str | os.PathLike, *, verify: bool = True):
        self.folder = os.fspath(folder)
        self.built: dict[str, int] | None = None
        self._entries: list | None = None
        meta_path = os.path.join(self.folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise CacheError(f"{self.folder!r} is not a complete feature cache (no meta.json): build it with "
                             "`mpfast cache` (or train/eval with --cache-dir)")
        self.meta = meta = _read_json(meta_path)
        if meta.get("version") != CACHE_VERSION:
            raise CacheError(f"{self.folder!r} was written by another mpfast version (cache format "
                             f"{meta.get('version')!r}, expected {CACHE_VERSION}): delete it, or rebuild with "
                             "`mpfast cache`")
        try:
            expected = [_expected(meta, number) for number in range(len(meta["shards"]))]
            if len(expected) != math.ceil(meta["count"] / meta["shard_size"]) or len(meta["row_shape"]) != 3:
                raise KeyError("shards")
            failed = {int(k): str(v) for k, v in meta["failed"].items()}
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
            raise CacheError(f"{meta_path} is damaged (field {exc} missing or wrong): rerun `mpfast cache` with the "
                             "same arguments to write it again") from exc
        paths = [os.path.join(self.folder, shard_name(number)) for number in range(len(expected))]
        with ThreadPoolExecutor(min(_VERIFY_THREADS, max(1, len(paths)))) as pool:
            headers = list(pool.map(lambda args: _open_shard(*args, verify=verify), zip(paths, expected)))
        allow_open_files(len(headers))
        readers = [ShardReader(header) for header in headers]
        none = [np.zeros(0, np.int64)]
        self.indices = torch.from_numpy(np.concatenate([read_array(h, "indices") for h in headers] or none))
        self.labels = torch.from_numpy(np.concatenate([read_array(h, "labels") for h in headers] or none))
        self.failed = failed
        self.features = CachedFeatures(readers, tuple(meta["row_shape"]))
        if len(self.features) != meta["count"] - len(self.failed):
            raise CacheError(f"cache {self.folder!r} is inconsistent: {len(self.features)} rows, {meta['count']} "
                             f"videos, {len(self.failed)} failed: delete its meta.json and rerun `mpfast cache`")

    @classmethod
    def from_tensors(cls, features: torch.Tensor, labels: torch.Tensor) -> FeatureCache:
        """An in-memory cache of precomputed features ``[N, V, T, D]`` with labels ``[N]``."""
        if features.dim() != 4 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"need features [N,V,T,D] and labels [N], got {tuple(features.shape)}, {tuple(labels.shape)}")
        features = features.detach().cpu()
        if features.dtype not in (torch.float16, torch.float32, torch.float64):
            features = features.float()
        cache = cls.__new__(cls)
        cache.folder, cache.failed, cache.built, cache._entries = None, {}, None, None
        cache.features = CachedFeatures([_InMemory(features.numpy())], tuple(features.shape[1:]))
        cache.labels = labels.long()
        cache.indices = torch.arange(features.shape[0])
        cache.meta = {"count": features.shape[0], "views": features.shape[1], "short": 0}
        return cache

    def in_memory(self) -> FeatureCache:
        """A copy of this cache with every shard's features read into RAM (same dtype)."""
        copy = FeatureCache.__new__(FeatureCache)
        copy.__dict__.update(self.__dict__)
        copy.features = CachedFeatures([_InMemory(block.read_all()) for block in self.features._blocks],
                                       self.features.shape[1:])
        return copy

    def __len__(self) -> int:
        return len(self.features)

    def video_path(self, index: int) -> str | None:
        """The file of the video at list position ``index`` (None for an in-memory cache)."""
        if self.folder is None:
            return None
        if self._entries is None:
            try:
                listing = _read_json(os.path.join(self.folder, "videos.json"))
                root = listing["inputs"]["videos"]["root"]
                self._entries = [os.path.join(root, path) for path, _ in listing["entries"]]
            except (CacheError, KeyError, TypeError, ValueError):
                self._entries = []
        return self._entries[index] if 0 <= index < len(self._entries) else None


def _open_shard(path: str, expected: dict[str, Any], *, verify: bool):
    try:
        return check_shard(path, expected) if verify else check_header(path, expected)
    except FileNotFoundError as exc:
        raise CacheError(f"cache shard {path} is missing: rerun `mpfast cache` (or train/eval with --cache-dir) with "
                         "the same arguments to compute it again") from exc
    except ShardError as exc:
        raise CacheError(f"cache shard {path} is damaged ({exc}): rerun `mpfast cache` (or train/eval with "
                         "--cache-dir) with the same arguments to compute it again") from exc


# --------------------------------------------------------------------------- building
@contextlib.contextmanager
def _key_lock(lock_path: str, folder: str) -> Iterator[None]:
    """Holds the lock of one cache key: rank 0 takes it for the process group, the others wait with it."""
    lock = FileLock(lock_path)
    leader = distributed.rank() == 0
    if leader:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    waited = False
    while True:
        held = False
        if leader:
            try:
                lock.acquire(timeout=LOCK_POLL_SECONDS if waited else 0)
                held = True
            except Timeout:
                if not waited:
                    logger.warning("another process is building the cache %s; waiting for it (lock %s)", folder,
                                   lock_path)
        waited = True
        if distributed.broadcast_object(held):
            break
    try:
        yield
    finally:
        if leader:
            lock.release()


@dataclass
class _Plan:
    """Shards to compute, and for each damaged one the videos it had recorded as unreadable (None: unknown)."""

    total: int
    todo: list[int]
    damaged: dict[int, dict[int, str] | None] = field(default_factory=dict)
    old_meta: dict[str, Any] | None = None  # the meta.json found, if it parsed


def _prepare(folder: str, meta: dict[str, Any], description: dict[str, Any], entries: list) -> _Plan:
    """Checks what a (possibly interrupted or damaged) folder holds; rank 0, under the key's lock."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith(".tmp-"):  # a write that a killed process left unfinished
            os.remove(os.path.join(folder, name))
    listing_path = os.path.join(folder, "videos.json")
    try:
        _read_json(listing_path)
    except CacheError:
        _write_json_atomic(listing_path, {"inputs": description, "entries": entries})
    old_meta, meta_path = None, os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        try:
            old_meta = _read_json(meta_path)
        except CacheError as exc:
            logger.warning("%s; writing it again from the shards", exc)
    total = math.ceil(meta["count"] / meta["shard_size"])

    def inspect(number: int) -> tuple[str, str | None]:
        path = os.path.join(folder, shard_name(number))
        if not os.path.exists(path):
            return "missing", None
        try:
            check_shard(path, _expected(meta, number))
            return "ok", None
        except ShardError as exc:
            return "damaged", str(exc)

    with ThreadPoolExecutor(min(_VERIFY_THREADS, max(1, total))) as pool:
        states = list(pool.map(inspect, range(total)))
    plan = _Plan(total, [number for number, (state, _) in enumerate(states) if state != "ok"], old_meta=old_meta)
    for number, (state, problem) in enumerate(states):
        if state == "missing" and old_meta is not None:  # the cache was complete once
            logger.warning("cache shard %s is missing; computing its videos again",
                           os.path.join(folder, shard_name(number)))
        if state == "damaged":
            path = os.path.join(folder, shard_name(number))
            logger.warning("cache shard %s is damaged (%s); computing its videos again", path, problem)
            plan.damaged[number] = _recorded_failures(path, old_meta, *_shard_bounds(number, meta["count"],
                                                                                      meta["shard_size"]))
    return plan


def _recorded_failures(path: str, old_meta: dict | None, start: int, stop: int) -> dict[int, str] | None:
    """The videos of ``[start, stop)`` a damaged shard had recorded as unreadable, if still known."""
    with contextlib.suppress(ShardError, OSError):
        return read_header(path).failed
    if old_meta is not None and isinstance(old_meta.get("failed"), dict):
        return {int(k): v for k, v in old_meta["failed"].items() if start <= int(k) < stop}
    return None


def _encode_shards(model, dataset: VideoDataset, folder: str, meta: dict[str, Any], plan: _Plan, numbers: list[int],
                   *, batch_size: int, num_workers: int, device, progress: bool) -> None:
    """Encodes the videos of shards ``numbers`` and writes each shard as soon as it is complete."""
    bounds = {number: _shard_bounds(number, meta["count"], meta["shard_size"]) for number in numbers}
    batches, owners = [], []
    for number, (start, stop) in bounds.items():
        for first in range(start, stop, batch_size):
            batches.append(list(range(first, min(first + batch_size, stop))))
            owners.append(number)
    if not batches:
        return
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_videos)
    world = distributed.world_size()
    bar = video_bar(_videos_in(meta, plan.todo), "caching features") if progress else None  # every process's
    broken = BrokenVideoLog()
    parts: dict[str, list] = {"features": [], "indices": [], "labels": []}
    failed: dict[int, str] = {}
    short = 0
    for position, batch in enumerate(loader):
        broken.update(batch)
        advance(bar, (len(batch["index"]) + len(batch["failed"])) * world)
        failed.update(batch["failed"])
        short += batch["short"]
        if batch["video"] is not None:
            video = batch["video"].to(device)
            with torch.no_grad():
                features = model.encode_frames(video.flatten(0, 1)).float().cpu()
            parts["features"].append(features.view(*video.shape[:3], -1))
            parts["indices"].append(batch["index"])
            parts["labels"].append(batch["label"])
        number = owners[position]
        if position + 1 == len(owners) or owners[position + 1] != number:
            _finish_shard(dataset, folder, meta, plan, number, bounds[number], parts, failed, short)
            parts = {key: [] for key in parts}
            failed, short = {}, 0
    if bar is not None:
        bar.close()
    broken.report()


def _finish_shard(dataset: VideoDataset, folder: str, meta: dict[str, Any], plan: _Plan, number: int,
                  bounds: tuple[int, int], parts: dict[str, list], failed: dict[int, str], short: int) -> None:
    start, stop = bounds
    path = os.path.join(folder, shard_name(number))
    features = torch.cat(parts["features"]) if parts["features"] else torch.zeros(0, *meta["row_shape"])
    indices = torch.cat(parts["indices"]) if parts["indices"] else torch.zeros(0, dtype=torch.long)
    labels = torch.cat(parts["labels"]) if parts["labels"] else torch.zeros(0, dtype=torch.long)
    finite = torch.isfinite(features).flatten(1).all(dim=1)
    if not finite.all():
        bad = [dataset.path(int(i)) for i in indices[~finite][:3]]
        raise FloatingPointError(f"the frame encoder gave non-finite features for {int((~finite).sum())} video(s) of "
                                 f"{stop - start} (first: {', '.join(bad)}); check the model's weights and --precision "
                                 "(fp16 can overflow: try bf16 or fp32)")
    stored = features.to(getattr(torch, meta["dtype"]))
    overflow = ~torch.isfinite(stored).flatten(1).all(dim=1)
    if overflow.any():
        first = dataset.path(int(indices[overflow][0]))
        raise OverflowError(f"features of {int(overflow.sum())} video(s) (first: {first}) exceed the range of "
                            f"{meta['dtype']} (largest |value| {features.abs().max().item():.3g}): cache them with "
                            "--cache-dtype float32")
    recorded = plan.damaged.get(number)
    if recorded is not None:
        lost = sorted(set(failed) - set(recorded))
        if lost:
            raise CacheError(f"cache shard {path} was damaged and had to be computed again, but {len(lost)} of its "
                             f"videos can no longer be read (first: {failed[lost[0]]}); restore those videos, or "
                             "delete "
                             f"{folder} to build the cache without them")
    write_shard(path, key=meta["key"], number=number, start=start, stop=stop, features=stored, indices=indices,
                labels=labels, failed=failed, short=short, rank=distributed.rank())


def collect_meta(folder: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The complete metadata of a cache whose shards are all written (from their headers)."""
    shards, failed, short = [], {}, 0
    for number in range(math.ceil(meta["count"] / meta["shard_size"])):
        header = check_header(os.path.join(folder, shard_name(number)), _expected(meta, number))
        shards.append({"file": shard_name(number), "start": header.start, "stop": header.stop, "rows": header.rows,
                       "rank": int(header.metadata.get("rank", 0)), "sha256": json.loads(header.metadata["sha256"])})
        failed.update({str(k): v for k, v in header.failed.items()})
        short += header.short
    return {**meta, "shards": shards, "failed": failed, "short": short}


def write_meta(folder: str, meta: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Writes ``meta.json`` from the shards' headers, atomically: the last write of a complete cache.

    Args:
        meta: the cache's fields (``key``, ``count``, ``shard_size``, ``dtype``, ``row_shape`` ...).
        seconds: how long the build took.
    """
    complete = collect_meta(folder, meta)
    complete.update(seconds=seconds, written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    _write_json_atomic(os.path.join(folder, "meta.json"), complete)
    return complete


def _finish_meta(folder: str, meta: dict[str, Any], plan: _Plan, seconds: float) -> dict[str, Any]:
    """Writes ``meta.json`` unless the one there says the same."""
    old = {k: v for k, v in (plan.old_meta or {}).items() if k not in ("seconds", "written")}
    if old == json.loads(json.dumps(collect_meta(folder, meta), default=str)):
        logger.info("using feature cache %s", folder)
        return plan.old_meta
    complete = write_meta(folder, meta, seconds)
    logger.info("cached features of %d videos in %s (%.1f s; %d shard(s) of %d computed, %d video(s) skipped)",
                meta["count"], folder, seconds, len(plan.todo), plan.total, len(complete["failed"]))
    return complete


def build_cache(model, dataset: VideoDataset, cache_dir: str | os.PathLike, model_name: str, *,
                precision: str = "fp32", dtype: str = DEFAULT_DTYPE, batch_size: int = 16, num_workers: int = 0,
                device: str | torch.device = "cpu", progress: bool = False,
                shard_size: int | None = None) -> FeatureCache:
    """Returns the cache of ``dataset``'s features, computing what is missing or damaged.

    Args:
        model: the MotionCLIP whose frozen CLIP encodes the frames.
        dataset: an evaluation-mode :class:`VideoDataset` (its views are cached).
        cache_dir: parent folder; the cache lives in ``cache_dir/<key>``.
        model_name: open_clip name of ``model.clip`` (part of the key).
        precision: the CLIP's precision (part of the key).
        dtype: storage dtype of the features, "float16" or "float32" (part of the key).
        batch_size: videos per encoding batch (per process).
        shard_size: videos per shard (part of the key; default :data:`SHARD_SIZE`).

    Under ``torch.distributed`` every process must call this; the shards to compute are
    dealt out to the processes.

    Raises:
        FileNotFoundError: when none of the videos exists (a wrong root, say).
        CacheError: a damaged shard whose videos can no longer be read.
        ValueError: when no video could be read.
    """
    if dataset.train:
        raise ValueError("cache an evaluation-mode dataset (transform.train=False): training randomness cannot be cached")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    shard_size = SHARD_SIZE if shard_size is None else shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    dataset.check_found()
    started = time.perf_counter()
    description = describe_inputs(model, model_name, dataset, precision, dtype=dtype, shard_size=shard_size)
    key = cache_key(description)
    folder = os.path.join(os.fspath(cache_dir), key)
    meta = {"version": CACHE_VERSION, "key": key, "inputs": description, "count": len(dataset),
            "views": dataset.num_views, "num_frames": dataset.sampling.num_frames, "dim": model.dim, "dtype": dtype,
            "shard_size": shard_size,
            "row_shape": [dataset.num_views, dataset.sampling.num_frames, model.dim]}
    rank, world = distributed.rank(), distributed.world_size()
    with _key_lock(os.path.join(os.fspath(cache_dir), f"{key}.lock"), folder):
        entries = [[entry.path, entry.label] for entry in dataset.entries]
        plan = distributed.broadcast_object(_prepare(folder, meta, description, entries) if rank == 0 else None)
        model.eval()
        _encode_shards(model, dataset, folder, meta, plan, plan.todo[rank::world], batch_size=batch_size,
                       num_workers=num_workers, device=device, progress=progress and rank == 0)
        distributed.barrier()
        if rank == 0:
            _finish_meta(folder, meta, plan, time.perf_counter() - started)
        distributed.barrier()
        cache = FeatureCache(folder, verify=False)
        if rank == 0:
            os.utime(folder)  # last use, for prune_caches(older_than_days=...)
    cache.built = {"shards": plan.total, "computed": len(plan.todo), "videos_encoded": _videos_in(meta, plan.todo)}
    if not len(cache):
        first = min(cache.failed)
        raise ValueError(f"nothing could be read: none of the {len(dataset)} videos of the list (first tried: "
                           f"{cache.failed[first]}); root: {os.path.abspath(dataset.root)!r}")
    return cache


# --------------------------------------------------------------------------- listing and pruning
def _folder_bytes(folder: str) -> int:
    total = 0
    for directory, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(directory, name))
    return total


def _is_stale(listing: dict[str, Any]) -> bool:
    videos = listing["inputs"]["videos"]
    return _videos_digest([tuple(e) for e in listing["entries"]], videos["root"], True) != videos["digest"]


def _describe_folder(folder: str) -> dict[str, Any]:
    used = datetime.datetime.fromtimestamp(os.path.getmtime(folder)).isoformat(timespec="seconds")
    info: dict[str, Any] = {"cache": folder, "bytes": _folder_bytes(folder), "last_used": used}
    meta_path, listing_path = os.path.join(folder, "meta.json"), os.path.join(folder, "videos.json")
    meta = None
    with contextlib.suppress(CacheError):
        meta = _read_json(meta_path) if os.path.exists(meta_path) else None
    if meta is not None and meta.get("version") != CACHE_VERSION:
        return {**info, "state": "old format"}
    try:
        listing = _read_json(listing_path)
        inputs = listing["inputs"]
    except (CacheError, KeyError):
        return {**info, "state": "unknown"}
    info.update(model=inputs["model"]["name"], videos=inputs["videos"]["count"], root=inputs["videos"]["root"],
                dtype=inputs["storage"]["dtype"])
    if _is_stale(listing):
        return {**info, "state": "stale"}
    return {**info, "state": "complete" if meta is not None else "incomplete"}


@contextlib.contextmanager
def _unless_in_use(cache_dir: str, key: str) -> Iterator[bool]:
    """Holds a key's lock when no other process does; yields whether it got it."""
    lock = FileLock(os.path.join(cache_dir, f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _each_cache(cache_dir: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(folder, description)`` of each cache folder, holding its lock while the caller looks at it."""
    cache_dir = os.fspath(cache_dir)
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"cache folder {cache_dir!r} does not exist")
    for name in sorted(os.listdir(cache_dir)):
        folder = os.path.join(cache_dir, name)
        if not _KEY_PATTERN.match(name) or not os.path.isdir(folder):
            continue
        with _unless_in_use(cache_dir, name) as free:
            yield folder, (_describe_folder(folder) if free else
                           {"cache": folder, "state": "in use", "bytes": _folder_bytes(folder)})


def list_caches(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Describes every cache folder in ``cache_dir``.

    Each item: ``cache`` (folder), ``state`` — "complete", "incomplete" (an interrupted
    build: its shards are reused), "in use" (another process holds its lock), "stale"
    (a video it was built from changed or vanished: no run can use it again), "old
    format" or "unknown" — ``bytes``, ``last_used`` and, when known, ``model``,
    ``videos``, ``root`` and ``dtype``.
    """
    return [info for _, info in _each_cache(cache_dir)]


def prune_caches(cache_dir: str | os.PathLike, older_than_days: float | None = None, *,
                 dry_run: bool = False) -> list[dict[str, Any]]:
    """Deletes the caches no run can use any more and, with ``older_than_days``, those unused that long.

    "No run can use": stale (a video changed or vanished since), an older format, or a
    folder without inputs (a build killed before it started). A folder whose lock another
    process holds is never touched; only folders named like cache keys are considered.

    Returns:
        the removed (with ``dry_run``: the removable) caches, as :func:`list_caches` describes them.
    """
    if older_than_days is not None and not older_than_days >= 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days!r}")
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    removed = []
    for folder, info in _each_cache(cache_dir):
        if info["state"] == "in use":
            continue
        unused = cutoff is not None and os.path.getmtime(folder) < cutoff
        if info["state"] in ("stale", "old format", "unknown") or unused:
            if not dry_run:
                shutil.rmtree(folder)
                logger.info("removed cache %s (%s, %d bytes)", folder, info["state"], info["bytes"])
            removed.append(info)
    return removed


# --------------------------------------------------------------------------- datasets
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
            self.rows = list(range(len(cache.features)))
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
        index = int(self.cache.indices[row])
        views = self.cache.features.shape[1]
        if self.train and views > 1:
            view = int(np.random.default_rng(sample_seed(self.seed, self.epoch, index)).integers(views))
            features = self.cache.features[row, view:view + 1]
        else:
            features = self.cache.features[row]
        return {"features": features, "label": int(self.cache.labels[row]), "index": index}

    def video_path(self, index: int) -> str:
        """The file of the video at list position ``index`` (for messages)."""
        return self.cache.video_path(index) or f"cached video {index}"

    def fingerprint(self) -> str:
        """Digest of what this dataset serves: the list, the features' inputs and the positions."""
        digest = hashlib.sha256()
        inputs = self.cache.meta.get("inputs")
        if inputs is not None:
            material = {**inputs, "videos": {k: v for k, v in inputs["videos"].items() if k in ("count", "list")}}
            digest.update(json.dumps(material, sort_keys=True, default=str).encode())
        else:  # in memory: the values themselves
            for block in self.cache.features._blocks:
                digest.update(np.ascontiguousarray(block.read_all()).reshape(-1).view(np.uint8))
            digest.update(self.cache.labels.numpy().tobytes())
        digest.update(self.cache.indices[self.rows].numpy().tobytes())
        return digest.hexdigest()


def collate_features(items: Sequence[dict]) -> dict:
    """Batches :class:`FeatureDataset` items: ``features [B, V, T, D]``, ``label [B]``, ``index [B]``."""
    return {"features": torch.stack([item["features"] for item in items]),
            "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "failed": [], "short": 0}
