"""Video decoding with decord and frame sampling.

Two sampling schemes pick the ``T`` frame indices of a clip:

* ``segment`` (TSN): the video is cut into ``T`` equal segments and one frame is taken
  from each, at a random position when training, at the centre when evaluating;
  temporal views ``i = 0..V-1`` take the frame at ``(i + 0.5) / V`` of each segment.
* ``dense``: ``T`` frames ``stride`` apart; the start is random when training, and the
  ``V`` temporal views start at evenly spaced positions when evaluating.

A video with fewer frames than a clip needs repeats frames (the indices are clamped).
Decoding problems raise :class:`VideoDecodeError`, whatever decord raised.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

SAMPLING_MODES = ("segment", "dense")


class VideoDecodeError(RuntimeError):
    """A video could not be read: missing, empty, unreadable or truncated file.

    Attributes:
        path: the file. reason: what went wrong, in words.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read video {path!r}: {reason}")
        self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the ``T`` frames of a clip are chosen."""

    num_frames: int = 8  # T, frames per clip
    mode: str = "segment"  # "segment" (TSN) or "dense" (fixed stride)
    stride: int = 4  # frame step of dense clips

    def __post_init__(self) -> None:
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {self.num_frames!r}")
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be a positive int, got {self.stride!r}")


def segment_indices(length: int, num_frames: int, *, rng: np.random.Generator | None = None,
                    view: int = 0, num_views: int = 1) -> np.ndarray:
    """TSN segment sampling.

    Args:
        length: frames in the video (>= 1).
        num_frames: T.
        rng: random positions inside each segment when given (training); else the
            deterministic position of temporal view ``view`` of ``num_views``.

    Returns:
        int64 indices ``[T]`` in ``[0, length)``, non-decreasing.
    """
    _check_length(length)
    edges = np.linspace(0.0, float(length), num_frames + 1)
    width = edges[1:] - edges[:-1]
    if rng is not None:
        offset = rng.random(num_frames)
    else:
        _check_view(view, num_views)
        offset = np.full(num_frames, (view + 0.5) / num_views)
    return np.clip(np.floor(edges[:-1] + offset * width), 0, length - 1).astype(np.int64)


def dense_indices(length: int, num_frames: int, stride: int, *, rng: np.random.Generator | None = None,
                  view: int = 0, num_views: int = 1) -> np.ndarray:
    """Fixed-stride clip sampling: ``T`` frames ``stride`` apart.

    Args:
        length: frames in the video (>= 1).
        num_frames: T. stride: step between frames.
        rng: random start when given (training); else view ``view`` of ``num_views``
            evenly spaced starts (the centre clip when ``num_views == 1``).

    Returns:
        int64 indices ``[T]``; past the end of a short video the last frame repeats.
    """
    _check_length(length)
    span = (num_frames - 1) * stride + 1
    room = max(0, length - span)
    if rng is not None:
        start = int(rng.integers(0, room + 1))
    else:
        _check_view(view, num_views)
        start = room // 2 if num_views == 1 else int(round(view * room / (num_views - 1)))
    return np.minimum(start + np.arange(num_frames, dtype=np.int64) * stride, length - 1)


def sample_indices(length: int, sampling: SamplingConfig, *, rng: np.random.Generator | None = None,
                   view: int = 0, num_views: int = 1) -> np.ndarray:
    """Indices ``[T]`` of one clip under ``sampling`` (see :func:`segment_indices`, :func:`dense_indices`)."""
    if sampling.mode == "segment":
        return segment_indices(length, sampling.num_frames, rng=rng, view=view, num_views=num_views)
    return dense_indices(length, sampling.num_frames, sampling.stride, rng=rng, view=view, num_views=num_views)


def _check_length(length: int) -> None:
    if length < 1:
        raise ValueError(f"length must be >= 1 frame, got {length}")


def _check_view(view: int, num_views: int) -> None:
    if num_views < 1 or not 0 <= view < num_views:
        raise ValueError(f"view must be in [0, num_views) with num_views >= 1, got view={view}, num_views={num_views}")


def open_video(path: str | os.PathLike):
    """Opens a video with decord, raising :class:`VideoDecodeError` for any problem.

    Returns:
        a ``decord.VideoReader`` with at least one frame.
    """
    try:
        import decord
    except ImportError as exc:  # optional dependency
        raise ImportError("reading videos needs decord: pip install 'mpfast[video]'") from exc
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file does not exist")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        length = len(reader)
    except Exception as exc:  # decord raises RuntimeError/DECORDError with C++ text
        raise VideoDecodeError(path, f"unreadable ({_first_line(exc)})") from exc
    if length < 1:
        raise VideoDecodeError(path, "video has no frames")
    return reader


def read_frames(reader, indices: np.ndarray, path: str = "?") -> np.ndarray:
    """Decodes frames ``indices`` of an open reader: uint8 ``[len(indices), H, W, 3]``.

    Each distinct frame is decoded once. A truncated file raises :class:`VideoDecodeError`.
    """
    unique, inverse = np.unique(indices, return_inverse=True)
    try:
        frames = reader.get_batch(unique.tolist()).asnumpy()
    except Exception as exc:
        raise VideoDecodeError(path, f"decoding failed, the file may be truncated ({_first_line(exc)})") from exc
    if frames.ndim != 4 or frames.shape[0] != len(unique) or frames.shape[-1] != 3:
        raise VideoDecodeError(path, f"decoder returned frames of shape {frames.shape}")
    return frames[inverse]


def load_clips(path: str | os.PathLike, sampling: SamplingConfig, *, rng: np.random.Generator | None = None,
               num_views: int = 1) -> tuple[np.ndarray, int]:
    """Decodes the temporal views of one video.

    Args:
        path: the video file.
        sampling: frame sampling.
        rng: training mode (one random clip) when given; else ``num_views`` evaluation clips.

    Returns:
        ``(frames, length)``: uint8 ``[V, T, H, W, 3]`` (``V = 1`` when training) and the
        number of frames in the video (``length < T`` means frames were repeated).
    """
    path = os.fspath(path)
    reader = open_video(path)
    length = len(reader)
    if rng is not None:
        index_sets = [sample_indices(length, sampling, rng=rng)]
    else:
        index_sets = [sample_indices(length, sampling, view=i, num_views=num_views) for i in range(num_views)]
    stacked = np.stack(index_sets)
    frames = read_frames(reader, stacked.reshape(-1), path)
    return frames.reshape(*stacked.shape, *frames.shape[1:]), length


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
