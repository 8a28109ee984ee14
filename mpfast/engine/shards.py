"""Feature-cache shard files: safetensors written atomically, checked, memory-mapped.

A shard holds the frame features of one range of a video list, ``[start, stop)``:
``features`` ``[n, V, T, D]`` (float16 or float32) of the ``n`` videos that could be
read, their list positions ``indices`` and ``labels`` (int64 ``[n]``). Its header
(safetensors metadata) records the range, the videos that could not be read and why,
the cache key, and a SHA-256 per tensor, computed from the values before they are
written. A shard is complete or absent: it is written to a temporary name, flushed and
renamed (:func:`mpfast.engine.checkpoint.atomic_save`).

:func:`check_shard` re-reads a file in chunks (no memory mapping, so the process's
resident memory does not grow) and says what is wrong with it: a header that does not
parse, a file cut short, another cache's or range's shard, a checksum that does not
match, non-finite features. :func:`map_shard` maps the features read-only, so a reader
touches only the rows it uses; :meth:`MappedShard.release` drops the pages this process
has mapped (the page cache keeps them), which bounds resident memory when a training
epoch reads the whole cache.

Offsets come from the safetensors header (8-byte little-endian length, JSON, then the
data), the documented file layout.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_save

SHARD_FORMAT = "mpfast-feature-shard-1"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
_CHUNK = 8 << 20  # bytes read at a time when checking a shard
# Bits of an IEEE float that are all ones exactly when the value is inf or NaN.
_EXPONENT_MASKS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


class ShardError(ValueError):
    """A shard file that cannot be used (the message says why)."""


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.safetensors"


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _all_finite(chunk: np.ndarray) -> bool:
    unsigned, mask = _EXPONENT_MASKS[chunk.dtype]
    return not np.any((chunk.view(unsigned) & mask) == mask)


def write_shard(path: str | os.PathLike, *, key: str, number: int, start: int, stop: int, features: torch.Tensor,
                indices: torch.Tensor, labels: torch.Tensor, failed: dict[int, str], short: int,
                rank: int = 0) -> None:
    """Writes one shard atomically (``features`` already in the storage dtype, finite)."""
    tensors = {"features": features.contiguous(), "indices": indices.long().contiguous(),
               "labels": labels.long().contiguous()}
    rows = tensors["features"].shape[0]
    if tensors["indices"].shape != (rows,) or tensors["labels"].shape != (rows,):
        raise ValueError(f"shard {number}: {rows} feature rows, indices {tuple(indices.shape)}, labels "
                         f"{tuple(labels.shape)}")
    if rows + len(failed) != stop - start:
        raise ValueError(f"shard {number} covers videos [{start}, {stop}) but holds {rows} rows and {len(failed)} failures")
    checksums = {name: _sha256(tensor.numpy()) for name, tensor in tensors.items()}
    metadata = {"format": SHARD_FORMAT, "key": key, "number": str(number), "start": str(start), "stop": str(stop),
                "failed": json.dumps({str(k): v for k, v in sorted(failed.items())}), "short": str(short),
                "rank": str(rank), "sha256": json.dumps(checksums)}
    atomic_save(tensors, path, metadata)


@dataclass
class ShardHeader:
    """What a shard's header says (tensors: name -> (numpy dtype, shape, absolute byte range))."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]]

    @property
    def number(self) -> int:
        return int(self.metadata["number"])

    @property
    def start(self) -> int:
        return int(self.metadata["start"])

    @property
    def stop(self) -> int:
        return int(self.metadata["stop"])

    @property
    def rows(self) -> int:
        return self.tensors["features"][1][0]

    @property
    def failed(self) -> dict[int, str]:
        return {int(k): v for k, v in json.loads(self.metadata["failed"]).items()}

    @property
    def short(self) -> int:
        return int(self.metadata["short"])


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parses a shard's header and checks that the file holds every byte it announces."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if not 2 <= length <= size - 8:
                raise ShardError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            tensors[name] = (np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + length + begin,
                             8 + length + end)
    except (ShardError, FileNotFoundError):
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ShardError(f"unreadable header ({type(exc).__name__}: {exc})") from exc
    if metadata.get("format") != SHARD_FORMAT:
        raise ShardError(f"not a feature shard (format {metadata.get('format')!r})")
    missing = {"features", "indices", "labels"} - set(tensors)
    if missing:
        raise ShardError(f"tensors {sorted(missing)} are missing")
    for name, (dtype, shape, begin, end) in tensors.items():
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ShardError(f"tensor {name} announces {end - begin} bytes for shape {list(shape)}")
    end_of_data = max(end for _, _, _, end in tensors.values())
    if size < end_of_data:
        raise ShardError(f"file is cut short ({size} bytes, {end_of_data} expected)")
    try:
        json.loads(metadata["failed"]), int(metadata["number"]), int(metadata["start"]), int(metadata["stop"])
        int(metadata["short"]), json.loads(metadata["sha256"])
    except (KeyError, ValueError) as exc:
        raise ShardError(f"damaged header metadata ({exc})") from exc
    return ShardHeader(path, metadata, tensors)


def check_header(path: str | os.PathLike, expected: dict[str, Any]) -> ShardHeader:
    """Reads a shard's header and checks it against what the cache expects (see :func:`check_shard`)."""
    header = read_header(path)
    _check_layout(header, expected)
    return header


def _check_layout(header: ShardHeader, expected: dict[str, Any]) -> None:
    """The header against what the cache expects: key, number, range, shapes, dtype."""
    for field in ("key", "number", "start", "stop"):
        if header.metadata.get(field) != str(expected[field]):
            raise ShardError(f"{field} is {header.metadata.get(field)!r}, expected {expected[field]!r}")
    dtype, shape, _, _ = header.tensors["features"]
    if dtype != np.dtype(STORAGE_DTYPES[expected["dtype"]]):
        raise ShardError(f"features are {dtype}, expected {expected['dtype']}")
    row_shape = expected.get("row_shape")
    if len(shape) != 4 or (row_shape is not None and tuple(shape[1:]) != tuple(row_shape)):
        raise ShardError(f"features have shape {list(shape)}, expected [n, {', '.join(map(str, row_shape or 'VTD'))}]")
    rows = shape[0]
    for name in ("indices", "labels"):
        if header.tensors[name][1] != (rows,):
            raise ShardError(f"{name} have shape {list(header.tensors[name][1])}, expected [{rows}]")
    if rows + len(header.failed) != header.stop - header.start:
        raise ShardError(f"{rows} rows and {len(header.failed)} failed videos for a range of {header.stop - header.start}")


def check_shard(path: str | os.PathLike, expected: dict[str, Any]) -> ShardHeader:
    """Reads a whole shard and returns its header, or raises :class:`ShardError` saying what is wrong.

    Args:
        expected: ``key``, ``number``, ``start``, ``stop``, ``dtype`` (storage dtype name)
            and ``row_shape`` (``(V, T, D)``, or None when not known yet).
    """
    header = check_header(path, expected)
    checksums = json.loads(header.metadata["sha256"])
    with open(header.path, "rb") as handle:
        for name, (dtype, shape, begin, end) in header.tensors.items():
            digest = hashlib.sha256()
            handle.seek(begin)
            remaining = end - begin
            while remaining:
                chunk = handle.read(min(_CHUNK - _CHUNK % dtype.itemsize, remaining))
                if not chunk:
                    raise ShardError(f"file is cut short in tensor {name}")
                remaining -= len(chunk)
                digest.update(chunk)
                if name == "features" and not _all_finite(np.frombuffer(chunk, dtype=dtype)):
                    raise ShardError("features hold non-finite values (inf or NaN)")
            if digest.hexdigest() != checksums.get(name):
                raise ShardError(f"checksum of {name} does not match (the file was changed or damaged)")
    indices = read_array(header, "indices")
    if indices.size and (indices.min() < header.start or indices.max() >= header.stop or np.any(np.diff(indices) <= 0)):
        raise ShardError(f"indices are not increasing positions in [{header.start}, {header.stop})")
    return header


def read_array(header: ShardHeader, name: str) -> np.ndarray:
    """One (small) tensor of a shard, read into memory."""
    dtype, shape, begin, end = header.tensors[name]
    with open(header.path, "rb") as handle:
        handle.seek(begin)
        return np.frombuffer(handle.read(end - begin), dtype=dtype).reshape(shape).copy()


class MappedShard:
    """A shard's features mapped read-only: ``array`` ``[n, V, T, D]`` reads pages on demand."""

    def __init__(self, header: ShardHeader):
        dtype, shape, begin, end = header.tensors["features"]
        self.path = header.path
        if end == begin:  # nothing to map (every video of the range failed)
            self._map, self.array = None, np.zeros(shape, dtype=dtype)
            return
        with open(header.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape)), offset=begin).reshape(shape)

    def release(self) -> None:
        """Unmaps the pages this process touched (they stay in the page cache); later reads map them again."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
