"""Evaluation protocols: closed-set metrics, all-way K-shot subsets, zero-shot summaries.

* Closed set: train and test on the same classes; report top-1, top-5 and mean class
  accuracy (:func:`classification_metrics`).
* Few-shot: all-way K-shot, K videos of every class drawn with a seeded sampler
  (:func:`few_shot_subset`); the standard settings are K in :data:`FEW_SHOT_K`.
* Zero-shot: train on one label set, evaluate on another (unseen class names); report
  the mean and standard deviation over the three HMDB-51 / UCF-101 splits
  (:func:`mean_std`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .lists import VideoEntry

FEW_SHOT_K: tuple[int, ...] = (2, 4, 8, 16)


def classification_metrics(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean class accuracy (fractions in [0, 1]).

    Args:
        logits: ``[N, C]`` scores. labels: ``[N]`` class indices.
        num_classes: C when it cannot be read from ``logits``.

    Mean class accuracy averages the per-class top-1 accuracy over the classes present
    in ``labels``. Top-5 is top-C accuracy when there are fewer than 5 classes.
    """
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N,C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no predictions to score (N = 0)")
    num_classes = num_classes or logits.shape[1]
    labels = labels.to(logits.device).long()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got range [{int(labels.min())}, {int(labels.max())}]")
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(dim=1)
    per_class = [correct1[labels == c].float().mean().item() for c in range(num_classes) if (labels == c).any()]
    return {"top1": correct1.float().mean().item(), "top5": correct5.float().mean().item(),
            "mean_class_accuracy": float(np.mean(per_class)), "count": int(labels.shape[0])}


def few_shot_indices(entries: Sequence[VideoEntry], shots: int, seed: int = 0) -> list[int]:
    """All-way K-shot: positions in ``entries`` of ``shots`` videos of every class present.

    The draw depends only on ``(entries, shots, seed)``; the positions are sorted. Lines
    listed twice are distinct candidates, so a class never gets more than ``shots``.
    Raises ValueError when a class has fewer than ``shots`` videos.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int (usually one of {FEW_SHOT_K}), got {shots!r}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, entry in enumerate(entries):
        by_class[entry.label].append(position)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_class):
        positions = by_class[label]
        if len(positions) < shots:
            raise ValueError(f"class {label} has {len(positions)} video(s), fewer than shots={shots}")
        chosen.extend(rng.choice(positions, size=shots, replace=False).tolist())
    return sorted(chosen)


def few_shot_subset(entries: Sequence[VideoEntry], shots: int, seed: int = 0) -> list[VideoEntry]:
    """The entries at :func:`few_shot_indices` (in the order of ``entries``)."""
    return [entries[i] for i in few_shot_indices(entries, shots, seed)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, as reported over the three splits."""
    if not values:
        raise ValueError("values must not be empty")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def average_views(logits: Tensor, num_views: int) -> Tensor:
    """Multi-view evaluation: ``[B * V, C]`` (view-minor) -> ``[B, C]`` mean logits."""
    if logits.shape[0] % num_views:
        raise ValueError(f"{logits.shape[0]} rows are not a multiple of num_views={num_views}")
    return logits.view(-1, num_views, logits.shape[-1]).mean(dim=1)


def class_split(num_classes: int, seen_fraction: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of class ids into seen (training) and unseen (zero-shot test) sets."""
    if num_classes < 2 or not 0 < seen_fraction < 1:
        raise ValueError(f"need num_classes >= 2 and 0 < seen_fraction < 1, got {num_classes}, {seen_fraction}")
    order = np.random.default_rng(seed).permutation(num_classes)
    cut = min(num_classes - 1, max(1, round(seen_fraction * num_classes)))
    return sorted(order[:cut].tolist()), sorted(order[cut:].tolist())


def relabel(entries: Sequence[VideoEntry], class_ids: Sequence[int]) -> list[VideoEntry]:
    """Keeps the entries of ``class_ids`` and renumbers their labels ``0..len(class_ids)-1``."""
    mapping = {c: i for i, c in enumerate(class_ids)}
    return [VideoEntry(e.path, mapping[e.label]) for e in entries if e.label in mapping]

