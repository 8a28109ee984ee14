"""Synthetic action videos: a shape moving in one of four directions, encoded to mp4.

"moving left" and "moving right" (and "up"/"down") show the same kind of frames in
opposite orders, so a classifier on mean-pooled frame features cannot tell them
apart, while a model of the motion between frames can. Used by the tests and by
``examples/synthetic_motion.py``. Encoding needs PyAV (``pip install av``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .lists import VideoEntry, write_class_names, write_list

DIRECTIONS = {"moving left": (0, -1), "moving right": (0, 1), "moving up": (-1, 0), "moving down": (1, 0)}
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(DIRECTIONS)


def render_video(direction: str, rng: np.random.Generator, size: int = 32, num_frames: int = 16) -> np.ndarray:
    """Draws one video: uint8 ``[T, size, size, 3]``.

    A square of random colour and side (about a third of the frame) crosses a plain
    background of another random colour along ``direction``, a key of :data:`DIRECTIONS`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    if size < 8 or num_frames < 2:
        raise ValueError(f"size must be >= 8 and num_frames >= 2, got size={size}, num_frames={num_frames}")
    dy, dx = DIRECTIONS[direction]
    side = int(rng.integers(size // 4, size // 3 + 1))
    travel = size - side
    positions = np.linspace(0, travel, num_frames).round().astype(int)
    across = int(rng.integers(0, travel + 1))
    background = rng.integers(0, 256, 3)
    colour = (background + rng.integers(96, 160, 3)) % 256
    video = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    video[:] = background.astype(np.uint8)
    for t in range(num_frames):
        along = positions[t] if (dy + dx) > 0 else travel - positions[t]
        y, x = (along, across) if dy else (across, along)
        video[t, y:y + side, x:x + side] = colour.astype(np.uint8)
    return video


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, faststart: bool = False) -> None:
    """Encodes uint8 ``[T, H, W, 3]`` frames (even H and W) to an H.264 mp4 with PyAV.

    ``faststart`` puts the index (``moov``) before the frame data, as streamed files do;
    by default it comes last.
    """
    try:
        import av
    except ImportError as exc:
        raise ImportError("writing videos needs PyAV: pip install 'mpfast[video]'") from exc
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width}")
    with av.open(os.fspath(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def make_synthetic_dataset(root: str | os.PathLike, train_per_class: int = 16, test_per_class: int = 8,
                           size: int = 32, num_frames: int = 16, seed: int = 0,
                           classes: Sequence[str] = SYNTHETIC_CLASSES) -> dict[str, Path]:
    """Writes a small action dataset in the common list format.

    Layout: ``root/videos/<split>/<class>_<i>.mp4``, ``root/train.txt``, ``root/test.txt``
    (paths relative to ``root``) and ``root/classes.csv``.

    Returns:
        the paths ``{"root", "train", "test", "classes"}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    lists = {}
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        folder = root / "videos" / split
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(count):
            for label, name in enumerate(classes):
                relative = f"videos/{split}/{name.replace(' ', '_')}_{i:03d}.mp4"
                write_video(root / relative, render_video(name, rng, size, num_frames))
                entries.append(VideoEntry(relative, label))
        lists[split] = root / f"{split}.txt"
        write_list(lists[split], entries)
    write_class_names(root / "classes.csv", classes)
    return {"root": root, "train": lists["train"], "test": lists["test"], "classes": root / "classes.csv"}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpfast.data.synthetic OUT``: writes the dataset and prints its files."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m mpfast.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write (videos/, train.txt, test.txt, classes.csv)")
    parser.add_argument("--train-per-class", type=int, default=128)
    parser.add_argument("--test-per-class", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="frame side in pixels (even)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_synthetic_dataset(args.out, args.train_per_class, args.test_per_class, args.size, args.frames, args.seed)
    print(json.dumps({key: str(value) for key, value in paths.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
