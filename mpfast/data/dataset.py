"""A torch Dataset of labelled videos, with a policy for broken input.

``on_error="skip"``: a video that cannot be read (missing, empty, unreadable, truncated)
is dropped from its batch with a warning, and :class:`BrokenVideoLog` counts it for the
summary at the end of the run; ``on_error="raise"``: :class:`VideoDecodeError` stops
the run. Videos shorter than a clip always go on, with repeated frames (and are counted).

Randomness (training frame positions, crops, flips) is drawn from generators seeded
with ``(seed, epoch, index)``, so a sample is the same whichever worker, process or
resumed run loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import Dataset

from .lists import VideoEntry
from .transforms import ClipTransform
from .video import SamplingConfig, VideoDecodeError, load_clips

logger = logging.getLogger("mpfast.data")

ERROR_POLICIES = ("skip", "raise")


def check_policy(on_error: str) -> str:
    if on_error not in ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ERROR_POLICIES}, got {on_error!r}")
    return on_error


def sample_seed(seed: int, epoch: int, index: int) -> list[int]:
    """Seed material of one sample's random choices."""
    return [int(seed) & 0xFFFFFFFF, int(epoch), int(index)]


class VideoDataset(Dataset):
    """Videos as normalised clip views.

    Args:
        entries: labelled videos (paths relative to ``root`` unless absolute).
        root: folder of the videos.
        sampling: frame sampling (T, mode, stride).
        transform: spatial transform; its ``train`` flag selects random clips.
        num_clips: temporal views when evaluating (ignored when training).
        on_error: "skip" or "raise" (see the module docstring).
        seed: base seed of the training randomness.

    Items are dicts: ``video`` float32 ``[V, T, 3, S, S]`` (``V = num_clips * crops``,
    clip-major), ``label`` int, ``index`` int, ``short`` bool; or, for a skipped video,
    ``index`` and ``error`` (a message).
    """

    def __init__(self, entries: Sequence[VideoEntry], root: str | os.PathLike, sampling: SamplingConfig,
                 transform: ClipTransform, *, num_clips: int = 1, on_error: str = "skip", seed: int = 0):
        if not entries:
            raise ValueError("entries must list at least one video")
        if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
            raise ValueError(f"num_clips must be a positive int, got {num_clips!r}")
        self.entries, self.root, self.sampling, self.transform = list(entries), os.fspath(root), sampling, transform
        self.num_clips = 1 if transform.train else num_clips
        self.on_error, self.seed, self.epoch = check_policy(on_error), seed, 0

    @property
    def train(self) -> bool:
        return self.transform.train

    @property
    def num_views(self) -> int:
        return self.num_clips * self.transform.num_views

    def set_epoch(self, epoch: int) -> None:
        """Changes the training randomness (call at the start of every epoch)."""
        self.epoch = int(epoch)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.entries[index].path)

    video_path = path  # the name FeatureDataset shares (for messages)

    def check_found(self) -> None:
        """Raises :class:`FileNotFoundError` in one line when none of the videos exists (a wrong root, say).

        Stops at the first video found, so a good list costs one ``stat``.
        """
        if any(os.path.exists(self.path(index)) for index in range(len(self.entries))):
            return
        raise FileNotFoundError(f"nothing could be read: none of the {len(self.entries)} videos of the list exists "
                                f"(first tried: {self.path(0)!r}); root: {os.path.abspath(self.root)!r}")

    def fingerprint(self) -> str:
        """Digest of what this dataset serves: paths, labels, sampling, views and transform (not the root)."""
        material = {"entries": [[entry.path, entry.label] for entry in self.entries], "sampling": asdict(self.sampling),
                    "clips": self.num_clips, "transform": self.transform.describe()}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        path = self.path(index)
        material = sample_seed(self.seed, self.epoch, index)
        rng = np.random.default_rng(material) if self.train else None
        try:
            clips, length = load_clips(path, self.sampling, rng=rng, num_views=self.num_clips)
        except VideoDecodeError as exc:
            if self.on_error == "raise":
                raise
            return {"index": index, "error": str(exc)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence(material).generate_state(1)[0]))
            views = torch.cat([self.transform(torch.from_numpy(clip)) for clip in clips])
        return {"video": views, "label": self.entries[index].label, "index": index,
                "short": length < self.sampling.num_frames}


def collate_videos(items: Sequence[dict]) -> dict:
    """Batches dataset items, setting the skipped ones aside.

    Returns:
        ``video [B, V, T, 3, S, S]`` (None when every video failed), ``label [B]``,
        ``index [B]``, ``short`` (count), ``failed`` (list of ``(index, message)``).
    """
    good = [item for item in items if "error" not in item]
    failed = [(item["index"], item["error"]) for item in items if "error" in item]
    if not good:
        return {"video": None, "label": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long),
                "short": 0, "failed": failed}
    return {
        "video": torch.stack([item["video"] for item in good]),
        "label": torch.tensor([item["label"] for item in good], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "short": sum(bool(item["short"]) for item in good),
        "failed": failed,
    }


class BrokenVideoLog:
    """Counts skipped and short videos over a run; warns once per broken video."""

    def __init__(self) -> None:
        self.failed: dict[int, str] = {}
        self.short = 0

    def update(self, batch: dict) -> None:
        for index, message in batch.get("failed", ()):
            if index not in self.failed:
                logger.warning("skipping video: %s", message)
            self.failed[index] = message
        self.short += int(batch.get("short", 0))

    def summary(self) -> str:
        return f"{len(self.failed)} video(s) skipped, {self.short} clip(s) from videos shorter than the clip"

    def report(self) -> None:
        """Logs the summary (a warning when any video was skipped or shorter than the clip)."""
        (logger.warning if self.failed or self.short else logger.info)(self.summary())

