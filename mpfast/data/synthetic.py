"""Synthetic motion tasks: small videos whose label is in the motion, encoded losslessly.

Each task (:data:`TASKS`) draws ``[T, S, S, 3]`` uint8 videos of one moving shape on a
plain or cluttered background, with a class list whose names are the text prompts:

========================  ====================================================================
task                      classes (what tells them apart)
========================  ====================================================================
``direction``             moving left / right / up / down (the walk-through task)
``rotation``              a square circling the centre clockwise / counter-clockwise
``approach``              a square growing (approaching) / shrinking (receding)
``speed``                 one / two laps of a wrapping track in any direction: slowly / fast
``speed_direction``       slowly or fast, left or right (four classes)
``periodic``              back and forth along an edge / once across
``two_phase``             an L-shaped path: sideways then vertically / vertically then sideways
``clutter``               ``direction`` on a textured background with a moving distractor and
                          per-frame pixel noise
========================  ====================================================================

In every task but ``clutter``'s noise the frames a video shows are, as a set, drawn from
the same distribution for every class (``direction``, ``rotation``, ``approach``,
``two_phase``: time reversal maps one class onto another; ``speed``, ``speed_direction``,
``periodic``: every class covers its track uniformly), so a classifier of mean-pooled
frame features is at or near chance and the label has to come from the order and size
of the changes between frames. Videos are written losslessly (``libx264rgb``, CRF 0):
a lossy codec's errors grow with the distance from the key frame, which would leak the
direction of time. Encoding needs PyAV (``pip install 'mpfast[video]'``).

``python -m mpfast.data.synthetic OUT --task rotation`` writes one task as a dataset
in the common list format.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .lists import VideoEntry, write_class_names, write_list

DIRECTIONS = {"moving left": (0, -1), "moving right": (0, 1), "moving up": (-1, 0), "moving down": (1, 0)}
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(DIRECTIONS)

Renderer = Callable[[int, np.random.Generator, int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class MotionTask:
    """One synthetic task: its class names (also the text prompts) and its renderer."""

    name: str  # key in TASKS
    classes: tuple[str, ...]  # class names; label i is classes[i]
    description: str  # one line: what separates the classes
    draw: Renderer  # (label, rng, size, num_frames) -> uint8 [T, size, size, 3] of a forward class
    reversed_pairs: tuple[tuple[int, int], ...] = ()  # (a, b): class b is class a played backwards

    def render(self, label: int, rng: np.random.Generator, size: int = 32, num_frames: int = 16) -> np.ndarray:
        """Draws one video of class ``label``: uint8 ``[num_frames, size, size, 3]``.

        A class ``b`` of :attr:`reversed_pairs` is drawn as a video of its class ``a``
        with the frame order reversed, so the two classes show the same frames.
        """
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < len(self.classes):
            raise ValueError(f"label must be an int in [0, {len(self.classes)}) for task {self.name!r}, got {label!r}")
        _check_size(size, num_frames)
        forward = {b: a for a, b in self.reversed_pairs}
        if int(label) in forward:
            return np.ascontiguousarray(self.draw(forward[int(label)], rng, size, num_frames)[::-1])
        return self.draw(int(label), rng, size, num_frames)


def _check_size(size: int, num_frames: int) -> None:
    if size < 8 or num_frames < 2:
        raise ValueError(f"size must be >= 8 and num_frames >= 2, got size={size}, num_frames={num_frames}")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random background colour and a shape colour far from it in every channel."""
    background = rng.integers(0, 256, 3)
    return background.astype(np.uint8), ((background + rng.integers(96, 160, 3)) % 256).astype(np.uint8)


def _canvas(background: np.ndarray, size: int, num_frames: int) -> np.ndarray:
    video = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    video[:] = background
    return video


def _square(frame: np.ndarray, y: float, x: float, side: int, colour: np.ndarray, wrap: bool = False) -> None:
    """Paints a ``side`` square with top-left corner ``(y, x)`` (rounded); ``wrap``: on a torus."""
    size = frame.shape[0]
    top, left = int(round(y)), int(round(x))
    if wrap:
        rows, cols = np.arange(top, top + side) % size, np.arange(left, left + side) % size
        frame[np.ix_(rows, cols)] = colour
    else:
        frame[max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = colour


def _side(rng: np.random.Generator, size: int) -> int:
    return int(rng.integers(size // 4, size // 3 + 1))


def _draw_direction(label: int, rng: np.random.Generator, size: int, num_frames: int,
                    background: np.ndarray | None = None) -> np.ndarray:
    """Rightwards (label 1) or downwards (label 3), on ``background`` if given."""
    dy, dx = tuple(DIRECTIONS.values())[label]
    side = _side(rng, size)
    travel = size - side
    along = np.linspace(0, travel, num_frames)
    across = int(rng.integers(0, travel + 1))
    plain, colour = _colours(rng)
    video = _canvas(plain, size, num_frames) if background is None else np.repeat(background[None], num_frames, 0)
    for t in range(num_frames):
        y, x = (along[t], across) if dy else (across, along[t])
        _square(video[t], y, x, side, colour)
    return video


def render_video(direction: str, rng: np.random.Generator, size: int = 32, num_frames: int = 16) -> np.ndarray:
    """Draws one video of the ``direction`` task: uint8 ``[T, size, size, 3]``.

    A square of random colour and side (about a third of the frame) crosses a plain
    background of another random colour along ``direction``, a key of :data:`DIRECTIONS`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    return TASKS["direction"].render(SYNTHETIC_CLASSES.index(direction), rng, size, num_frames)


def _draw_rotation(label: int, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    """Clockwise on screen (the angle from +x towards +y grows): a square circling the centre."""
    background, colour = _colours(rng)
    video = _canvas(background, size, num_frames)
    side = _side(rng, size)
    centre = size / 2 + rng.uniform(-size / 16, size / 16, 2)
    radius = (size - side) / 2 * rng.uniform(0.7, 0.9)
    angles = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(0.6, 0.9) * 2 * np.pi, num_frames)
    for t, angle in enumerate(angles):
        _square(video[t], centre[0] + radius * np.sin(angle) - side / 2, centre[1] + radius * np.cos(angle) - side / 2,
                side, colour)
    return video


def _draw_approach(label: int, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    """Approaching: the square grows."""
    background, colour = _colours(rng)
    video = _canvas(background, size, num_frames)
    small, large = rng.uniform(0.12, 0.2) * size, rng.uniform(0.55, 0.7) * size
    sides = np.linspace(small, large, num_frames)
    centre = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    for t, side in enumerate(sides):
        side = int(round(side))
        _square(video[t], centre[0] - side / 2, centre[1] - side / 2, side, colour)
    return video


def _draw_lap(rng: np.random.Generator, size: int, num_frames: int, laps: int, axis: int, sign: int) -> np.ndarray:
    """A square doing ``laps`` whole laps of a wrapping (torus) track along ``axis``."""
    background, colour = _colours(rng)
    video = _canvas(background, size, num_frames)
    side = _side(rng, size)
    along = rng.uniform(0, size) + sign * laps * size * np.arange(num_frames) / num_frames
    across = int(rng.integers(0, size - side + 1))
    for t in range(num_frames):
        y, x = (along[t], across) if axis == 0 else (across, along[t])
        _square(video[t], y, x, side, colour, wrap=True)
    return video


def _draw_speed(label: int, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    return _draw_lap(rng, size, num_frames, laps=1 + label, axis=int(rng.integers(2)), sign=int(rng.choice([-1, 1])))


def _draw_speed_direction(label: int, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    """Rightwards, one lap (label 2) or two (label 3)."""
    return _draw_lap(rng, size, num_frames, laps=label - 1, axis=1, sign=1)


def _draw_periodic(label: int, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    background, colour = _colours(rng)
    video = _canvas(background, size, num_frames)
    side = _side(rng, size)
    travel = size - side
    phase = np.arange(num_frames) / (num_frames - 1)
    if label == 0:  # back and forth: one period of a triangle wave from a random phase
        phase = (phase * (num_frames - 1) / num_frames + rng.uniform()) % 1.0
        along = travel * (1 - np.abs(2 * phase - 1))
    else:
        along = travel * phase
    if rng.integers(2):
        along = travel - along
    axis, across = int(rng.integers(2)), int(rng.integers(0, travel + 1))
    for t in range(num_frames):
        y, x = (along[t], across) if axis == 0 else (across, along[t])
        _square(video[t], y, x, side, colour)
    return video


def _draw_two_phase(label: int, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    """Sideways (x) first, then vertically."""
    background, colour = _colours(rng)
    video = _canvas(background, size, num_frames)
    side = _side(rng, size)
    travel = size - side
    signs = rng.choice([-1, 1], 2)  # (vertical, horizontal) step directions
    start = np.where(signs > 0, 0.0, float(travel))
    first = 1  # the axis of the first phase: x
    half = num_frames // 2
    position = start.copy()
    for t in range(num_frames):
        axis = first if t < half else 1 - first
        progress = t / max(half - 1, 1) if t < half else (t - half) / max(num_frames - half - 1, 1)
        position[axis] = start[axis] + signs[axis] * travel * min(progress, 1.0)
        if t >= half:
            position[first] = start[first] + signs[first] * travel
        _square(video[t], position[0], position[1], side, colour)
    return video


def _draw_clutter(label: int, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    background = np.empty((size, size, 3), dtype=np.uint8)
    background[:] = rng.integers(0, 256, 3)
    for _ in range(int(rng.integers(5, 9))):
        y, x = rng.integers(0, size, 2)
        h, w = rng.integers(2, size // 3, 2)
        background[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    video = _draw_direction(label, rng, size, num_frames, background)
    colour = rng.integers(0, 256, 3).astype(np.uint8)
    side = max(2, size // 8)
    start, velocity = rng.uniform(0, size, 2), rng.normal(0, size / 16, 2)
    for t in range(num_frames):
        position = start + velocity * t
        _square(video[t], position[0], position[1], side, colour, wrap=True)
    noise = rng.normal(0, 6, video.shape)
    return np.clip(video + noise, 0, 255).round().astype(np.uint8)


TASKS: dict[str, MotionTask] = {task.name: task for task in (
    MotionTask("direction", SYNTHETIC_CLASSES, "a square crosses the frame: left, right, up or down",
               _draw_direction, reversed_pairs=((1, 0), (3, 2))),
    MotionTask("rotation", ("circling clockwise", "circling counter-clockwise"),
               "a square goes round the centre, two-thirds to nine-tenths of a turn, either way", _draw_rotation, reversed_pairs=((0, 1),)),
    MotionTask("approach", ("approaching", "receding"), "a square grows or shrinks", _draw_approach,
               reversed_pairs=((0, 1),)),
    MotionTask("speed", ("moving slowly", "moving fast"),
               "one or two laps of a wrapping track, in any of four directions", _draw_speed),
    MotionTask("speed_direction", ("moving slowly left", "moving fast left", "moving slowly right",
                                   "moving fast right"),
               "one or two laps of a horizontal wrapping track, leftwards or rightwards", _draw_speed_direction,
               reversed_pairs=((2, 0), (3, 1))),
    MotionTask("periodic", ("moving back and forth", "moving across"),
               "there and back again along an edge, or once across", _draw_periodic),
    MotionTask("two_phase", ("moving sideways then vertically", "moving vertically then sideways"),
               "an L-shaped path between two corners, in either order", _draw_two_phase,
               reversed_pairs=((0, 1),)),
    MotionTask("clutter", tuple(f"{name} in clutter" for name in SYNTHETIC_CLASSES),
               "direction on a textured background, with a moving distractor and pixel noise", _draw_clutter,
               reversed_pairs=((1, 0), (3, 2))),
)}


def get_task(name: str) -> MotionTask:
    """The task called ``name`` (a key of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {list(TASKS)}")
    return TASKS[name]


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, faststart: bool = False,
                lossless: bool = True) -> None:
    """Encodes uint8 ``[T, H, W, 3]`` frames (even H and W) to an H.264 mp4 with PyAV.

    ``lossless`` (default) stores the RGB frames exactly (``libx264rgb``, CRF 0); else
    ``libx264`` at CRF 12 in yuv420p, whose errors depend on each frame's distance from
    the key frame. ``faststart`` puts the index (``moov``) before the frame data, as
    streamed files do; by default it comes last.
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
    codec, pix_fmt, options = (("libx264rgb", "bgr24", {"crf": "0"}) if lossless else
                               ("libx264", "yuv420p", {"crf": "12"}))
    with av.open(os.fspath(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {**options, "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def make_synthetic_dataset(root: str | os.PathLike, train_per_class: int = 16, test_per_class: int = 8,
                           size: int = 32, num_frames: int = 16, seed: int = 0,
                           classes: Sequence[str] | None = None, task: str = "direction") -> dict[str, Path]:
    """Writes one task as a small dataset in the common list format.

    Layout: ``root/videos/<split>/<class>_<i>.mp4``, ``root/train.txt``, ``root/test.txt``
    (paths relative to ``root``) and ``root/classes.csv``.

    Args:
        classes: a subset of the task's classes (default: all of them).
        task: a key of :data:`TASKS`.

    Returns:
        the paths ``{"root", "train", "test", "classes"}``.
    """
    spec = get_task(task)
    classes = spec.classes if classes is None else tuple(classes)
    unknown = [name for name in classes if name not in spec.classes]
    if unknown or not classes:
        raise ValueError(f"classes must be a non-empty subset of task {task!r}'s {list(spec.classes)}, got {classes!r}")
    _check_size(size, num_frames)
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
                write_video(root / relative, spec.render(spec.classes.index(name), rng, size, num_frames))
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
    parser.add_argument("--task", default="direction", choices=list(TASKS), help="which motion task")
    parser.add_argument("--train-per-class", type=int, default=128)
    parser.add_argument("--test-per-class", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="frame side in pixels (even)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_synthetic_dataset(args.out, args.train_per_class, args.test_per_class, args.size, args.frames,
                                   args.seed, task=args.task)
    print(json.dumps({key: str(value) for key, value in paths.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
