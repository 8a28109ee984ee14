"""Feature-cache shard files: safetensors written atomically, checked, read row by row.

A shard holds the frame features of one range of a video list, ``[start, stop)``:
``features`` ``[n, V, T, D]`` (float16 or float32) of the ``n`` videos that could be
read, their list positions ``indices`` and ``labels`` (int64 ``[n]``). Its header
(safetensors metadata) records the range, the videos that could not be read and why,
the cache key, and a SHA-256 per tensor, computed from the values before they are
written. A shard is complete or absent: it is written to a temporary name, flushed and
renamed (:func:`mpfast.engine.checkpoint.atomic_save`).

:func:`check_shard` re-reads a file in chunks and says what is wrong with it: a header
that does not parse, a file cut short, another cache's or range's shard, a checksum that
does not match, non-finite features. :class:`ShardReader` reads only the rows asked for,
with positional reads through the page cache, so the resident memory of a process that
trains on a cache larger than RAM stays that of its batches.

Offsets come from the safetensors header (8-byte little-endian length, JSON, then the
data), the documented file layout.
"""

from __future__ import annotations

import hashlib
import json
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
_CHUNK = 1 << 20  # bytes read at a time when checking a shard
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
        raise ValueError(f"shard {number} covers videos [{start}, {stop}) but holds {rows} rows and {len(failed)} "
                         "failures")
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
        raise ShardError(f"{rows} rows and {len(header.failed)} failed videos for a range of "
                         f"{header.stop - header.start}")


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


def allow_open_files(count: int) -> None:
    """Raises the soft limit of open files, when needed, so that ``count`` more can be open."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


class ShardReader:
    """Reads rows of a shard's features ``[n, V, T, D]`` with positional reads of just those bytes.

    The rows go through the page cache, not through a memory map: on Linux with large
    folios, one small read through a map maps megabytes around it, so a training epoch in
    random order would pull the whole cache into the process's resident memory. Positional
    reads (``os.pread``) keep it to the rows being read, in any process sharing the reader.
    """

    def __init__(self, header: ShardHeader):
        self.dtype, self.shape, self._begin, end = header.tensors["features"]
        self.path = header.path
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._view_bytes = self._row_bytes // self.shape[1] if len(self.shape) > 1 and self.shape[1] else 0
        self._fd = os.open(self.path, os.O_RDONLY) if end > self._begin else None

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, self._begin + offset)
        if len(data) != size:
            raise ShardError(f"{self.path} was cut short while in use ({size} bytes wanted at {offset}, "
                             f"{len(data)} read)")
        return data

    def read(self, rows: np.ndarray, rest: tuple = ()) -> np.ndarray:
        """``features[(rows, *rest)]`` in the storage dtype; a leading view slice reads only those views."""
        if len(rows) and (min(rows) < 0 or max(rows) >= self.shape[0]):
            raise IndexError(f"rows out of range for the {self.shape[0]} rows of {self.path}")
        narrowed = bool(rest) and isinstance(rest[0], slice) and rest[0].step in (None, 1)
        views, rest = (rest[0], (slice(None), *rest[1:])) if narrowed else (slice(None), rest)
        first, stop, _ = views.indices(self.shape[1])
        count = max(stop - first, 0)
        out = np.empty((len(rows), count, *self.shape[2:]), dtype=self.dtype)
        if count:
            size = count * self._view_bytes
            for position, row in enumerate(rows):  # one read per row: rows come in any order
                offset = int(row) * self._row_bytes + first * self._view_bytes
                out[position] = np.frombuffer(self._read(offset, size), dtype=self.dtype).reshape(out.shape[1:])
        return out[(slice(None), *rest)] if rest else out

    def read_all(self) -> np.ndarray:
        """Every row, in one read."""
        if self._fd is None:
            return np.zeros(self.shape, dtype=self.dtype)
        data = self._read(0, self.shape[0] * self._row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape).copy()
