"""Training and evaluation of the MotionCLIP head.

Only ``model.trainable_parameters()`` are optimised (AdamW, linear warm-up then cosine
decay, optional AMP and gradient clipping), with cross-entropy over the class logits.
Batches come from cached features (:class:`mpfast.engine.cache.FeatureDataset`, the
fast path) or from videos decoded and encoded every step
(:class:`mpfast.data.VideoDataset`). Progress shows on a tqdm bar counting videos (rate,
ETA, running loss), with one line per epoch (train loss and accuracy, validation top-1);
metrics go to a JSONL log; resumable checkpoints are written atomically.

Nothing silently wrong: a non-finite loss or gradient stops the run before the step is
taken, naming the step and the batch's videos; a run already in the output folder is
never overwritten unless the caller resumes that run or asks to overwrite; a resumed
checkpoint must come from a run with the same data, classes, options and model (a
digest of each is stored in the checkpoint).

Determinism: the epoch's sample order comes from ``DistributedSampler(seed, epoch)``
and each sample's random choices from ``(seed, epoch, index)``, so a resumed run skips
the batches already done and continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.dataset import BrokenVideoLog, VideoDataset, collate_videos
from ..data.protocols import average_views, classification_metrics
from ..model import MotionCLIP
from . import distributed
from .cache import FeatureDataset, collate_features
from .checkpoint import (NonFiniteError, load_checkpoint, load_head, load_optimizer, restore_rng, save_checkpoint,
                         trainable_module_names)
from .progress import advance, video_bar

logger = logging.getLogger("mpfast.engine")

AMP_MODES = ("none", "bf16", "fp16")
# TrainConfig fields that do not change the trained head (may differ when resuming).
_NOT_IN_RUN = ("log_every", "checkpoint_every", "num_workers", "progress")
_CHECKPOINT_NAME, _METRICS_NAME = "last.safetensors", "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    """Options of :class:`Trainer`."""

    epochs: int = 30  # passes over the training set
    batch_size: int = 32  # global batch: split evenly over the processes
    lr: float = 3e-3  # peak learning rate of AdamW
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 20  # linear warm-up steps from 0 to lr
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at the last step
    amp: str = "none"  # autocast dtype of the head: "none", "bf16" or "fp16" (CUDA only)
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    seed: int = 0  # seed of the sample order and the per-sample randomness
    log_every: int = 10  # steps between JSONL records and progress-bar loss updates
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end of each epoch only)
    num_workers: int = 0  # DataLoader workers
    progress: bool = True  # a tqdm bar and one printed line per epoch (rank 0); else the epoch lines are logged

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "log_every", "checkpoint_every", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0, weight_decay >= 0, grad_clip >= 0 and 0 <= min_lr_ratio <= 1")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to ``floor``."""

    def __init__(self, warmup: int, total: int, floor: float = 0.0):
        self.warmup, self.total, self.floor = warmup, max(total, 1), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _collate_for(dataset: Dataset):
    return collate_features if isinstance(dataset, FeatureDataset) else collate_videos


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def batch_logits(model: MotionCLIP, batch: dict, class_features: torch.Tensor, device: torch.device,
                 amp: str = "none") -> torch.Tensor:
    """Logits ``[B, C]`` of a batch of cached features ``[B, V, T, D]`` or videos
    ``[B, V, T, 3, S, S]``; the V views' logits are averaged."""
    if batch.get("features") is not None:
        features = batch["features"].to(device)
    else:
        video = batch["video"].to(device)
        features = model.encode_frames(video.flatten(0, 1)).view(*video.shape[:3], -1)
    views = features.shape[1]
    with _autocast(device, amp):
        logits = model.forward_features(features.flatten(0, 1), class_features)
    return average_views(logits.float(), views)


def _has_rows(batch: dict) -> bool:
    return batch.get("features") is not None or batch.get("video") is not None


def merge_process_logs(log: BrokenVideoLog, device: torch.device) -> None:
    """Gives every process the skipped videos and short clips of all processes (counts; messages stay local)."""
    if not distributed.is_distributed():
        return
    failed = distributed.gather_rows(torch.tensor(sorted(log.failed), dtype=torch.long, device=device))
    for index in failed.tolist():
        log.failed.setdefault(index, "skipped by another process")
    log.short = int(distributed.all_reduce_sum(torch.tensor([log.short], device=device)).item())


@torch.no_grad()
def evaluate(model: MotionCLIP, dataset: Dataset, class_names: Sequence[str], *, batch_size: int = 32,
             device: str | torch.device = "cpu", amp: str = "none", num_workers: int = 0,
             progress: bool = False) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Scores a dataset (all its views, logits averaged); shares the work under torch.distributed.

    Returns:
        ``(metrics, logits [N_ok, C], labels [N_ok])`` with ``metrics`` = top1, top5,
        mean_class_accuracy, count and ``skipped`` (videos the policy dropped).
    """
    device = torch.device(device)
    if isinstance(dataset, VideoDataset):
        dataset.check_found()
    model.eval()
    class_features = model.encode_classes(list(class_names))
    sampler = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(), shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=_collate_for(dataset))
    bar = video_bar(len(dataset), "evaluating") if progress and distributed.rank() == 0 else None
    broken = BrokenVideoLog()
    if isinstance(dataset, FeatureDataset) and distributed.rank() == 0:
        broken.update({"failed": sorted(dataset.failed.items())})  # left out when the cache was built
    all_logits, all_labels, all_indices = [], [], []
    for batch in loader:
        broken.update(batch)
        advance(bar, (len(batch["index"]) + len(batch.get("failed", ()))) * distributed.world_size())
        if not _has_rows(batch):
            continue
        all_logits.append(batch_logits(model, batch, class_features, device, amp).cpu())
        all_labels.append(batch["label"])
        all_indices.append(batch["index"])
    if bar is not None:
        bar.close()
    width = class_features.shape[0]
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, width)
    labels = torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.long)
    indices = torch.cat(all_indices) if all_indices else torch.zeros(0, dtype=torch.long)
    logits, labels, indices = (distributed.gather_rows(t.to(device)).cpu() for t in (logits, labels, indices))
    order = torch.argsort(indices, stable=True)
    indices, logits, labels = indices[order], logits[order], labels[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]  # the sampler pads with repeats
    logits, labels, indices = logits[keep], labels[keep], indices[keep]
    merge_process_logs(broken, device)
    if distributed.rank() == 0:
        broken.report()
    if logits.shape[0] == 0:
        raise _nothing_read(f"{len(dataset)} videos of the evaluation set", broken, getattr(dataset, "root", None))
    finite = torch.isfinite(logits).all(dim=1)
    if not finite.all():
        raise NonFiniteError(f"non-finite logits for {int((~finite).sum())} of {len(finite)} videos "
                             f"({_name_videos(dataset, indices[~finite].tolist())}): the cached features or the "
                             "checkpoint hold inf or NaN; no result is reported")
    metrics = classification_metrics(logits, labels, len(class_names))
    metrics["skipped"] = len(broken.failed)
    return metrics, logits, labels


def _nothing_read(videos: str, broken: BrokenVideoLog, root: str | None) -> ValueError:
    """The one-line error of a dataset of which no video could be read (an input error, like an unreadable video)."""
    first = f" (first tried: {broken.failed[min(broken.failed)]})" if broken.failed else ""
    where = f"; root: {os.path.abspath(root)!r}" if root is not None else ""
    return ValueError(f"nothing could be read: none of the {videos}{first}{where}")


def _name_videos(dataset: Dataset, indices: Sequence[int], limit: int = 3) -> str:
    """``path, path, path and 5 more`` for messages."""
    paths = [dataset.video_path(int(index)) for index in indices[:limit]]
    return ", ".join(paths) + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def check_output_dir(output_dir: str | os.PathLike, *, resume: str | os.PathLike | None = None,
                     overwrite: bool = False) -> None:
    """Raises :class:`FileExistsError` when ``output_dir`` holds a run that training into it would overwrite.

    A run is there when it holds a checkpoint or a non-empty metrics log. Training may go
    on when it resumes that run's own checkpoint, or when ``overwrite`` is asked for.
    """
    output_dir = os.fspath(output_dir)
    checkpoint, metrics = os.path.join(output_dir, _CHECKPOINT_NAME), os.path.join(output_dir, _METRICS_NAME)
    found = [name for name, path in ((_CHECKPOINT_NAME, checkpoint), (_METRICS_NAME, metrics))
             if os.path.isfile(path) and os.path.getsize(path) > 0]
    if not found or overwrite:
        return
    if resume is not None and os.path.isfile(checkpoint) and os.path.isfile(resume) and os.path.samefile(resume,
                                                                                                        checkpoint):
        return
    hint = f"--resume {checkpoint} to continue it, " if os.path.isfile(checkpoint) else ""
    raise FileExistsError(f"--output {output_dir!r} already holds a run ({', '.join(found)}): pass {hint}--overwrite "
                          "to replace it, or choose another --output")


class MetricsLog:
    """Appends one JSON object per line (rank 0 only)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = os.fspath(path) if path is not None and distributed.rank() == 0 else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def start(self, step: int) -> None:
        """Keeps the records up to ``step`` (where training starts or resumes): a fresh run
        starts an empty log, a resumed one drops what it will redo after its checkpoint."""
        if not self.path or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:  # a write cut short by a crash
                    logger.warning("%s:%d is not a complete record; dropping it", self.path, number)
                    continue
                if record is not None and step and record.get("step", 0) <= step:
                    kept.append(line.rstrip("\n") + "\n")
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(temporary, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class Trainer:
    """Trains the head of a MotionCLIP.

    Args:
        model: the MotionCLIP (its CLIP stays frozen).
        class_names: names of the training classes (label ``i`` is ``class_names[i]``).
        train_set: :class:`FeatureDataset` (``train=True``) or :class:`VideoDataset` with
            a training transform; both must have ``set_epoch``.
        config: :class:`TrainConfig`.
        eval_set: evaluated at the end of every epoch when given (``eval_class_names``
            default to ``class_names``).
        device: where the model runs.
        output_dir: where ``last.safetensors`` and ``metrics.jsonl`` go (None: nowhere).
        model_info: JSON-able description of the CLIP stored in checkpoints.
        overwrite: replace a run found in ``output_dir`` (else :meth:`fit` refuses to
            start there unless it resumes that run's checkpoint).
    """

    def __init__(self, model: MotionCLIP, class_names: Sequence[str], train_set: Dataset, config: TrainConfig, *,
                 eval_set: Dataset | None = None, eval_class_names: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", output_dir: str | os.PathLike | None = None,
                 model_info: dict[str, Any] | None = None, overwrite: bool = False):
        if not isinstance(train_set, (FeatureDataset, VideoDataset)):
            raise TypeError(f"train_set must be a FeatureDataset or VideoDataset, got {type(train_set).__name__}")
        if not train_set.train:
            raise ValueError("train_set must be in training mode (FeatureDataset(train=True) or a training transform)")
        if len(train_set) == 0:
            raise ValueError(f"the training set is empty (none of its {len(getattr(train_set, 'failed', ()))} videos "
                             "could be read)")
        if isinstance(train_set, VideoDataset):
            train_set.check_found()
        world = distributed.world_size()
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
        self.model, self.class_names, self.train_set, self.config = model, list(class_names), train_set, config
        self.eval_set, self.eval_class_names = eval_set, list(eval_class_names or class_names)
        self.device = torch.device(device)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device, got {self.device}; use amp='bf16' on CPU")
        self.output_dir = os.fspath(output_dir) if output_dir is not None else None
        self.model_info = model_info or {}
        self.overwrite, self.resumed_from, self._saved_step, self._data_digest = overwrite, None, None, None
        self.local_batch = config.batch_size // world
        self.parameters = model.trainable_parameters()
        if not self.parameters:
            raise ValueError("model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        samples_per_rank = math.ceil(len(train_set) / world)
        self.steps_per_epoch = math.ceil(samples_per_rank / self.local_batch)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = LambdaLR(self.optimizer, WarmupCosine(config.warmup_steps, self.total_steps, config.min_lr_ratio))
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" and self.device.type == "cuda" else None
        self.step = 0
        self.log = MetricsLog(os.path.join(self.output_dir, "metrics.jsonl") if self.output_dir else None)
        self.broken = BrokenVideoLog()
        if isinstance(train_set, FeatureDataset) and distributed.rank() == 0:
            self.broken.update({"failed": sorted(train_set.failed.items())})  # left out when the cache was built
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.output_dir, _CHECKPOINT_NAME) if self.output_dir else None

    def run_fingerprint(self) -> dict[str, Any]:
        """What makes a run the same run: digests of the data and classes, the options, the model."""
        if self._data_digest is None:  # the data do not change during a run
            self._data_digest = self.train_set.fingerprint()
        return {"data": self._data_digest, "videos": len(self.train_set), "classes": _digest(self.class_names),
                "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _NOT_IN_RUN},
                "model": {k: self.model_info.get(k) for k in ("model", "pretrained", "precision", "init_seed")},
                "head": _digest(dataclasses.asdict(self.model.config))}

    def save(self, path: str | os.PathLike) -> None:
        """Writes a resumable checkpoint (rank 0 writes; every rank must call)."""
        if distributed.rank() == 0:
            state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": dataclasses.asdict(self.config),
                     "parameter_names": trainable_module_names(self.model), "world_size": distributed.world_size(),
                     "run": self.run_fingerprint()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            save_checkpoint(path, self.model, model_info=self.model_info, class_names=self.class_names,
                            train_state=state, optimizer=self.optimizer)
        self._saved_step = self.step
        distributed.barrier()

    def resume(self, path: str | os.PathLike) -> None:
        """Restores model, optimiser, scheduler, step and RNG states from a training checkpoint."""
        checkpoint = load_checkpoint(path)
        if checkpoint.train_state is None:
            raise ValueError(f"{os.fspath(path)!r} holds no training state (not written by Trainer)")
        state = checkpoint.train_state
        if state.get("parameter_names") != trainable_module_names(self.model):
            raise ValueError("checkpoint's trainable parameters differ from this model's")
        self._check_same_run(os.fspath(path), state.get("run"))
        load_head(self.model, checkpoint)
        load_optimizer(self.optimizer, checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        restore_rng(checkpoint)
        self.resumed_from = os.fspath(path)
        logger.info("resumed from %s at step %d", os.fspath(path), self.step)

    def _check_same_run(self, path: str, saved: dict[str, Any] | None) -> None:
        """Refuses to resume a checkpoint of another run (data, classes, options or model)."""
        if saved is None:
            raise ValueError(f"cannot resume {path!r}: it records no digest of its run's data, classes and options "
                             "(written by an older mpfast); start a new run")
        mine = self.run_fingerprint()
        differences = []
        if saved["data"] != mine["data"]:
            differences.append(f"the training data ({saved['videos']} videos, this run {mine['videos']}: same list, "
                               "--shots, sampling, views and cache dtype needed)")
        if saved["classes"] != mine["classes"]:
            differences.append("the class list")
        for group in ("config", "model"):
            for key in sorted(set(saved[group]) | set(mine[group])):
                if saved[group].get(key) != mine[group].get(key):
                    differences.append(f"{key}={saved[group].get(key)!r} (this run: {mine[group].get(key)!r})")
        if saved["head"] != mine["head"]:
            differences.append("the head config")
        if differences:
            raise ValueError(f"cannot resume {path!r}, it comes from another run: {'; '.join(differences)}. Resume "
                             "with that run's options, or start a new run in another --output")

    # ----------------------------------------------------------------- training
    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        sampler = DistributedSampler(self.train_set, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                     shuffle=True, seed=self.config.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i:i + self.local_batch] for i in range(0, len(order), self.local_batch)][skip_batches:]
        self.train_set.set_epoch(epoch)
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.config.num_workers,
                          collate_fn=_collate_for(self.train_set))

    def train_step(self, batch: dict, class_features: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a (local) batch; returns loss, correct and count of the global batch."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        labels = batch["label"].to(self.device)
        count = distributed.all_reduce_sum(torch.tensor([float(labels.shape[0])], device=self.device)).item()
        finite_rows = torch.ones(labels.shape[0], dtype=torch.bool)
        if _has_rows(batch) and labels.numel():
            logits = batch_logits(self.model, batch, class_features, self.device, self.config.amp)
            finite_rows = torch.isfinite(logits.detach()).all(dim=1).cpu()
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            loss = loss_sum / max(count, 1.0)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            correct = (logits.argmax(dim=1) == labels).sum().float()
            loss_sum = loss_sum.detach()
        else:
            loss_sum = correct = torch.zeros((), device=self.device)
        for parameter in self.parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        distributed.sum_gradients(self.parameters)
        totals = distributed.all_reduce_sum(torch.stack([loss_sum.float(), correct.float()]))
        if count > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = (torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip) if self.config.grad_clip > 0
                    else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters])))
            # the fp16 scaler skips steps whose gradients overflowed: only the loss must be finite then
            self._stop_if_non_finite(batch, finite_rows, totals[0], norm if self.scaler is None else None)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        else:  # no readable video in the global batch: the schedule still moves on with the step count
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.scheduler.step()
        self.step += 1
        return {"loss_sum": totals[0].item(), "correct": totals[1].item(), "count": count}

    def _stop_if_non_finite(self, batch: dict, finite_rows: torch.Tensor, loss_sum: torch.Tensor,
                            norm: torch.Tensor | None) -> None:
        """Raises :class:`NonFiniteError` naming the step and the videos when the loss or gradient is not finite."""
        loss_ok, gradient_ok = bool(torch.isfinite(loss_sum)), norm is None or bool(torch.isfinite(norm))
        if loss_ok and gradient_ok:
            return
        indices = batch["index"]
        bad = distributed.gather_rows(indices[~finite_rows].to(self.device)).tolist()
        everyone = distributed.gather_rows(indices.to(self.device)).tolist()
        videos = (f"non-finite logits for {_name_videos(self.train_set, bad)}" if bad
                  else f"the batch: {_name_videos(self.train_set, everyone)}")
        raise NonFiniteError(f"non-finite {'loss' if not loss_ok else 'gradient'} at step {self.step + 1} (epoch "
                             f"{self.step // self.steps_per_epoch}); {videos}. The step was not taken; the last "
                             "checkpoint holds the last finite state")

    @contextlib.contextmanager
    def _claim_output(self):
        """Holds ``output_dir`` for this run: its lock, and the check that no other run gets overwritten."""
        if self.output_dir is None:
            yield
            return
        lock, held, error = FileLock(os.path.join(self.output_dir, ".lock")), False, None
        if distributed.rank() == 0:
            os.makedirs(self.output_dir, exist_ok=True)
            try:
                lock.acquire(timeout=0)
                held = True
                check_output_dir(self.output_dir, resume=self.resumed_from, overwrite=self.overwrite)
                self._clear_output()
            except Timeout:
                error = f"another process is training into {self.output_dir!r}: wait for it, or choose another --output"
            except FileExistsError as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)
        try:
            if error is not None:
                raise FileExistsError(error)
            yield
        finally:
            if held:
                lock.release()

    def _clear_output(self) -> None:
        """Removes unfinished writes and, when overwriting another run, that run's checkpoint and metrics."""
        checkpoint = self.checkpoint_path()
        own = self.resumed_from is not None and os.path.isfile(checkpoint) and os.path.samefile(self.resumed_from,
                                                                                                 checkpoint)
        for name in os.listdir(self.output_dir):
            replaced = self.overwrite and not own and name in (_CHECKPOINT_NAME, _METRICS_NAME)
            if name.startswith(".tmp-") or replaced:
                os.remove(os.path.join(self.output_dir, name))

    def videos_before(self, step: int) -> int:
        """Training videos (of all processes) in the steps before ``step``: what the progress bar counts."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        return epoch * len(self.train_set) + min(offset * self.config.batch_size, len(self.train_set))

    def fit(self) -> list[dict[str, Any]]:
        """Trains until ``epochs`` are done (from the current step); returns the eval records.

        Refuses to start when ``output_dir`` holds another run (:func:`check_output_dir`) or
        another process trains into it; ends with a checkpoint of the final state. A
        non-finite loss or gradient raises :class:`NonFiniteError` before its step is taken.

        With ``config.progress`` rank 0 shows a bar counting videos and prints one line per
        epoch (else the lines go to the log at INFO). The bar is closed however ``fit`` ends
        (Ctrl-C included), so a message after it starts on its own line.
        """
        with self._claim_output():
            bar = None
            if self.config.progress and distributed.rank() == 0:
                bar = video_bar(self.videos_before(self.total_steps), "training", initial=self.videos_before(self.step))
            try:
                history = self._fit(bar)
            finally:
                if bar is not None:
                    bar.close()
            if self.checkpoint_path() and self._saved_step != self.step:
                self.save(self.checkpoint_path())  # e.g. a finished run resumed into a new folder
            return history

    def _epoch_line(self, epoch: int, totals: dict[str, float], seconds: float, record: dict | None, bar) -> None:
        count = max(totals["count"], 1.0)
        line = (f"epoch {epoch + 1}/{self.config.epochs}: train loss {totals['loss_sum'] / count:.4f}, "
                f"accuracy {totals['correct'] / count:.3f} ({int(totals['count'])} videos, {seconds:.1f} s)")
        if record is not None:
            line += (f"; val top-1 {record['top1']:.4f}, top-5 {record['top5']:.4f}, mean class accuracy "
                     f"{record['mean_class_accuracy']:.4f} ({record['count']} videos)")
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            logger.info(line)

    def _fit(self, bar) -> list[dict[str, Any]]:
        config = self.config
        class_features = self.model.encode_classes(self.class_names)
        self.log.start(self.step)
        running = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        started = time.perf_counter()
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            epoch_totals, epoch_started = dict.fromkeys(running, 0.0), time.perf_counter()
            for batch in self._loader(epoch, offset):
                self.broken.update(batch)
                result = self.train_step(batch, class_features)
                for key in running:
                    running[key] += result[key]
                    epoch_totals[key] += result[key]
                if bar is not None:
                    bar.update(self.videos_before(self.step) - bar.n)
                if config.log_every and (self.step % config.log_every == 0 or self.step == self.total_steps):
                    self._log_train(epoch, running, started, bar)
                    running = {key: 0.0 for key in running}
                    started = time.perf_counter()
                if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.checkpoint_path():
                    self.save(self.checkpoint_path())
            if offset == 0 and epoch_totals["count"] == 0:
                raise _nothing_read(f"{len(self.train_set)} training videos", self.broken,
                                    getattr(self.train_set, "root", None))
            if self.checkpoint_path():
                self.save(self.checkpoint_path())
            record = None
            if self.eval_set is not None:
                metrics, _, _ = evaluate(self.model, self.eval_set, self.eval_class_names, batch_size=self.local_batch,
                                         device=self.device, amp=config.amp, num_workers=config.num_workers)
                record = {"type": "eval", "epoch": epoch, "step": self.step, **metrics}
                self.log.write(record)
                self.history.append(record)
            if distributed.rank() == 0:
                self._epoch_line(epoch, epoch_totals, time.perf_counter() - epoch_started, record, bar)
        merge_process_logs(self.broken, self.device)
        if distributed.rank() == 0:
            self.broken.report()
        return self.history

    def _log_train(self, epoch: int, running: dict[str, float], started: float, bar) -> None:
        count = max(running["count"], 1.0)
        record = {"type": "train", "epoch": epoch, "step": self.step, "loss": running["loss_sum"] / count,
                  "accuracy": running["correct"] / count, "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_s": running["count"] / max(time.perf_counter() - started, 1e-9)}
        self.log.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}", lr=f"{record['lr']:.2e}")
