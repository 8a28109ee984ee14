"""Accuracy benchmark: the motion head against standard temporal heads and against its own ablations.

    python -m benchmarks.accuracy --out runs/accuracy          # from the repository root

For each synthetic motion task of :mod:`mpfast.data.synthetic` and each seed, the
benchmark writes the task's videos (lossless; seed ``s`` draws its own videos), caches
their frozen-CLIP frame features once (:func:`mpfast.engine.build_cache`; a rerun reuses
videos and caches), then trains every head on the cached features with
:class:`mpfast.engine.Trainer` under one budget (same epochs, batch, learning rate,
warm-up, weight decay) and scores the test videos:

* ``chance``; ``zero_shot``: the untrained MotionCLIP, which is CLIP zero-shot on
  mean-pooled frames; ``linear_probe``: a linear classifier on mean-pooled frames;
* ``motion``: MotionCLIP's head with its defaults; ablations of its parts
  (:data:`benchmarks.accuracy_heads.ABLATIONS`);
* peers (:data:`benchmarks.accuracy_heads.PEERS`): a temporal transformer, a temporal
  conv, an LSTM and an X-CLIP-style head (a GRU and cosine-scored forms on request).

CLIP has random weights (no download; by default the tiny ``mpfast-tiny`` config of the
test suite, D = 32, the same weights for every seed), so class names carry no meaning
and every head has to learn the classes from the videos. Jobs run in ``--workers``
processes of one thread each.

Outputs in ``--out``: ``results.json`` (every seed's top-1, parameters, seconds, the
machine, its load and the command), ``results.md`` (mean +- standard deviation over
seeds per task, trainable parameters at the benchmark's width and at ViT-B/16's, D = 512
and 8 frames, and whether the motion head is within one test video of the best peer on
each task) and ``results.png``. ``--check`` exits with status 1 when the motion head
loses a task.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from torch import nn

from mpfast.data import ClipTransform, SamplingConfig, VideoDataset, read_list
from mpfast.data.synthetic import TASKS, get_task, make_synthetic_dataset
from mpfast.engine import FeatureDataset, NonFiniteError, TrainConfig, Trainer, build_cache, evaluate
from mpfast.engine.cache import FeatureCache, weights_digest
from mpfast.model import HeadConfig, MotionCLIP, create_model_and_transforms

from .accuracy_heads import ABLATIONS, PEERS, FeatureHead

logger = logging.getLogger("benchmarks.accuracy")

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "configs" / "mpfast-tiny.json"
BASELINES = ("chance", "zero_shot")
MOTION = "motion"
DEFAULT_PEERS = ("linear_probe", "transformer", "conv", "lstm", "xclip")  # "gru" on request: it scored as the LSTM
# Every head is at chance on "rotation" with the 32-pixel random-weight CLIP (telling the sense needs position times
# velocity; measured, top-1 0.43-0.50 for all heads with 96 or 512 training videos per class), so it is not run by default.
DEFAULT_TASKS = tuple(task for task in TASKS if task != "rotation")
DEFAULT_ROWS = (*BASELINES, MOTION, *ABLATIONS, *DEFAULT_PEERS)
NOT_PEERS = ("linear_probe",)  # trained rows that are baselines, not temporal heads
VIT_B16 = {"dim": 512, "frames": 8, "heads": 8, "classes": 400}  # widths of the parameter count


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers, besides the code."""

    model: str = "mpfast-tiny"  # open_clip model (random weights)
    train_per_class: int = 96  # training videos per class
    test_per_class: int = 64  # test videos per class
    size: int = 32  # frame side in pixels
    video_frames: int = 16  # frames per video
    frames: int = 8  # frames per clip T
    train_clips: int = 2  # temporal views cached per training video (one is drawn per epoch)
    test_clips: int = 2  # temporal views per test video (their logits are averaged)
    data_seed: int = 0  # seed of CLIP's random weights; the videos of seed s are drawn with data_seed + s
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-2  # learning rate of every head, unless lr_grid has several
    lr_grid: tuple[float, ...] = ()  # several: each head's lr is chosen on a validation split of its training videos
    val_fraction: float = 0.25  # of each class's training videos, held out to choose the lr
    warmup_steps: int = 20
    weight_decay: float = 0.05
    num_heads: int = 4  # attention heads of the motion head and of the attention peers


def machine() -> dict[str, Any]:
    """The machine and software, and the load when asked."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


# --------------------------------------------------------------------------- data
def register_configs() -> None:
    open_clip.add_model_config(TINY_CONFIG)


@functools.lru_cache(maxsize=2)
def make_clip_model(settings: Settings) -> tuple[MotionCLIP, Any]:
    """The untrained MotionCLIP whose frozen CLIP encodes the videos (random weights from ``data_seed``)."""
    register_configs()
    torch.manual_seed(settings.data_seed)
    model, _, _, tokenizer = create_model_and_transforms(settings.model, None, num_frames=settings.frames,
                                                         num_heads=settings.num_heads)
    return model.eval(), tokenizer


def image_size(model: MotionCLIP) -> int:
    size = model.clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def write_dataset(task: str, settings: Settings, folder: Path, video_seed: int) -> Path:
    """Writes the task's videos once: into a temporary folder, renamed when complete."""
    key = json.dumps([task, settings.train_per_class, settings.test_per_class, settings.size, settings.video_frames,
                      video_seed])
    root = folder / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (root / "classes.csv").is_file():
        return root
    partial = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    make_synthetic_dataset(partial, settings.train_per_class, settings.test_per_class, settings.size,
                           settings.video_frames, video_seed, task=task)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(partial, root)
    return root


def prepare_task(task: str, seed: int, settings: Settings, out: str) -> dict[str, Any]:
    """Videos, feature caches and class embeddings of one task for one seed; returns where they are."""
    started = time.perf_counter()
    out = Path(out)
    root = write_dataset(task, settings, out / "data", settings.data_seed + seed)
    model, _ = make_clip_model(settings)
    sampling = SamplingConfig(settings.frames)
    folders = {}
    for split, clips in (("train", settings.train_clips), ("test", settings.test_clips)):
        dataset = VideoDataset(read_list(root / f"{split}.txt"), root, sampling, ClipTransform(image_size(model)),
                               num_clips=clips, on_error="raise")
        folders[split] = build_cache(model, dataset, out / "cache", settings.model, batch_size=64).folder
    classes = list(get_task(task).classes)
    with torch.no_grad():
        class_features = model.encode_classes(classes)
    return {"task": task, "seed": seed, "classes": classes, "caches": folders,
            "class_features": class_features.tolist(), "seconds": time.perf_counter() - started}


@functools.lru_cache(maxsize=64)
def load_cache(folder: str) -> FeatureCache:
    return FeatureCache(folder).in_memory()  # a few MB; every epoch reads every row


# --------------------------------------------------------------------------- heads
def build_head(row: str, settings: Settings, classes: list[str], class_features: torch.Tensor, seed: int) -> nn.Module:
    """A fresh head of ``row`` (the motion head, an ablation or a peer), initialised from ``seed``."""
    clip_model, tokenizer = make_clip_model(settings)
    torch.manual_seed(seed)
    if row in (MOTION, "zero_shot") or row in ABLATIONS:
        overrides, change = ABLATIONS.get(row, ({}, None))
        config = HeadConfig(num_frames=settings.frames, num_heads=settings.num_heads, **overrides)
        model = MotionCLIP(clip_model.clip, config, tokenizer)
        if change is not None:
            change(model)
        return model
    head = PEERS[row](class_features.shape[1], len(classes), settings.frames, settings.num_heads,
                      float(clip_model.logit_scale()))
    return FeatureHead(head, {tuple(classes): class_features})


class _WidthOnlyCLIP(nn.Module):
    """Stands in for CLIP when only the head's parameter count at another width is needed."""

    def __init__(self, dim: int):
        super().__init__()
        self.visual = nn.Module()
        self.visual.output_dim = dim

    def encode_image(self, x):
        raise NotImplementedError

    def encode_text(self, x):
        raise NotImplementedError


@functools.lru_cache(maxsize=None)
def count_trainable(row: str, dim: int, frames: int, heads: int, classes: int) -> int:
    """Trainable parameters of ``row`` at width ``dim`` (``classes`` sizes the classifier peers)."""
    if row in BASELINES:
        return 0
    if row == MOTION or row in ABLATIONS:
        overrides, change = ABLATIONS.get(row, ({}, None))
        model = MotionCLIP(_WidthOnlyCLIP(dim), HeadConfig(num_frames=frames, num_heads=heads, **overrides))
        if change is not None:
            change(model)
        return sum(p.numel() for p in model.trainable_parameters())
    head = PEERS[row](dim, classes, frames, heads, 1.0)
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


def validation_split(cache: FeatureCache, seed: int, fraction: float) -> tuple[list[int], list[int]]:
    """Dataset positions of the training videos split per class into (fit, validation), drawn from ``seed``."""
    rng = np.random.default_rng([seed, 11])
    fit, held = [], []
    indices, labels = cache.indices.numpy(), cache.labels.numpy()
    for label in np.unique(labels):
        mine = rng.permutation(indices[labels == label])
        count = min(max(1, round(fraction * len(mine))), len(mine) - 1)
        held += mine[:count].tolist()
        fit += mine[count:].tolist()
    return sorted(fit), sorted(held)


def _fit(row: str, seed: int, settings: Settings, task: dict[str, Any], lr: float,
         positions: list[int] | None = None) -> nn.Module:
    """A fresh head of ``row`` trained with ``lr`` on the training videos at ``positions`` (default: all)."""
    model = build_head(row, settings, task["classes"], torch.tensor(task["class_features"]), seed)
    if row != "zero_shot":
        config = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=lr,
                             warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay, seed=seed,
                             log_every=0, progress=False)
        train = FeatureDataset(load_cache(task["caches"]["train"]), train=True, seed=seed, positions=positions)
        Trainer(model, task["classes"], train, config).fit()
    return model


def _score(model: nn.Module, dataset: FeatureDataset, classes: list[str]) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of ``model`` on ``dataset``."""
    metrics, logits, labels = evaluate(model, dataset, classes, batch_size=256)
    return metrics["top1"], float(torch.nn.functional.cross_entropy(logits, labels))


def train_and_score(row: str, seed: int, settings: Settings, task: dict[str, Any]) -> dict[str, Any]:
    """Trains one head on one task with one seed; returns its test top-1, learning rate and seconds.

    With several ``settings.lr_grid`` values, the head is trained with each on the training
    videos less a validation part (``val_fraction`` of each class), the lr with the best
    validation top-1 (then the lower validation loss) is kept, and the head is trained
    again with it on all training videos. The test videos are only scored at the end.
    """
    started = time.perf_counter()
    lr, validation = settings.lr, {}
    if row != "zero_shot" and len(settings.lr_grid) > 1:
        train_cache = load_cache(task["caches"]["train"])
        fit, held = validation_split(train_cache, seed, settings.val_fraction)
        held_out = FeatureDataset(train_cache, positions=held)
        for candidate in settings.lr_grid:
            try:
                validation[candidate] = _score(_fit(row, seed, settings, task, candidate, fit), held_out,
                                               task["classes"])
            except NonFiniteError:  # training diverged at this rate: it cannot be chosen
                validation[candidate] = (-math.inf, math.inf)
        lr = max(settings.lr_grid, key=lambda c: (validation[c][0], -validation[c][1]))
        if validation[lr][0] == -math.inf:
            raise RuntimeError(f"{row} on {task['task']} (seed {seed}) diverged at every rate of the lr grid "
                               f"{list(settings.lr_grid)}: add lower rates")
    try:
        model = _fit(row, seed, settings, task, lr)
    except NonFiniteError as error:
        raise RuntimeError(f"{row} on {task['task']} (seed {seed}) diverged at lr {lr:g}: {error}") from error
    top1, _ = _score(model, FeatureDataset(load_cache(task["caches"]["test"])), task["classes"])
    if not math.isfinite(top1):
        raise RuntimeError(f"{row} on {task['task']} (seed {seed}) gave a non-finite top-1")
    return {"task": task["task"], "row": row, "seed": seed, "top1": top1, "lr": lr if row != "zero_shot" else None,
            "validation_top1": {str(c): v[0] if math.isfinite(v[0]) else None for c, v in validation.items()},
            "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- running
def _worker_init() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights in every process
    register_configs()


def check_clip(settings: Settings, task: dict[str, Any]) -> None:
    """Every process must rebuild exactly the CLIP that encoded the cache."""
    digest = load_cache(task["caches"]["test"]).meta["inputs"]["model"]["visual_weights"]
    if weights_digest(make_clip_model(settings)[0].clip.visual) != digest:
        raise RuntimeError("this process built a CLIP with other weights than the cache's; check data_seed")


def _run_job(job: tuple) -> dict[str, Any]:
    started = time.process_time()
    kind, *args = job
    if kind == "prepare":
        result = prepare_task(*args)
    else:
        row, seed, settings, task = args
        check_clip(settings, task)
        result = train_and_score(row, seed, settings, task)
    return {**result, "cpu_seconds": time.process_time() - started}


def run(settings: Settings, tasks: list[str], rows: list[str], seeds: list[int], out: Path, workers: int) -> dict:
    """Prepares every task, trains every (task, row, seed), and returns the results dict."""
    started = time.perf_counter()
    load_before = os.getloadavg()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        prepare = [("prepare", t, seed, settings, str(out)) for t in tasks for seed in seeds]
        prepared = {(p["task"], p["seed"]): p for p in pool.map(_run_job, prepare)}
        logger.info("data and caches ready in %.0f s", time.perf_counter() - started)
        jobs = [(row, seed, settings, prepared[t, seed]) for t in tasks for row in rows if row != "chance"
                for seed in seeds]
        jobs.sort(key=lambda job: job[0] in ("transformer", "xclip", MOTION, *ABLATIONS), reverse=True)  # long first
        records = []
        for done, record in enumerate(pool.map(_run_job, [("train", *job) for job in jobs]), start=1):
            records.append(record)
            if done % 20 == 0 or done == len(jobs):
                logger.info("%d/%d heads trained (%.0f s)", done, len(jobs), time.perf_counter() - started)
    cpu = sum(r["cpu_seconds"] for r in [*prepared.values(), *records])
    return summarise(settings, prepared, rows, seeds, records, {
        "seconds": time.perf_counter() - started, "cpu_seconds": cpu, "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()), "workers": workers})


def summarise(settings: Settings, prepared: dict, rows: list[str], seeds: list[int], records: list[dict],
              timing: dict) -> dict[str, Any]:
    """Per task and row: top-1 per seed, mean, standard deviation, parameters; the verdict per task."""
    results: dict[str, Any] = {
        "benchmark": "accuracy", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.accuracy", *sys.argv[1:]]), "machine": machine(), **timing,
        "settings": dataclasses.asdict(settings), "seeds": seeds, "rows": rows, "tasks": {}}
    dim = len(next(iter(prepared.values()))["class_features"][0])
    for task in dict.fromkeys(task for task, _ in prepared):
        info = prepared[task, seeds[0]]
        classes = info["classes"]
        test_videos = load_cache(info["caches"]["test"]).features.shape[0]
        entry = {"classes": classes, "test_videos": test_videos,
                 "train_videos": load_cache(info["caches"]["train"]).features.shape[0], "rows": {}}
        for row in rows:
            if row == "chance":
                scores, seconds, lrs = [1 / len(classes)], [0.0], [None]
            else:
                mine = sorted((r for r in records if r["task"] == task and r["row"] == row), key=lambda r: r["seed"])
                scores, seconds, lrs = [r["top1"] for r in mine], [r["seconds"] for r in mine], [r["lr"] for r in mine]
            entry["rows"][row] = {
                "top1": scores, "mean": statistics.fmean(scores), "lr": lrs,
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "seconds": seconds,
                "params": count_trainable(row, dim, settings.frames, settings.num_heads, len(classes)),
                "params_vit_b16": count_trainable(row, VIT_B16["dim"], VIT_B16["frames"], VIT_B16["heads"],
                                                  VIT_B16["classes"])}
        entry["verdict"] = verdict(entry, rows)
        results["tasks"][task] = entry
    return results


def verdict(entry: dict, rows: list[str]) -> dict[str, Any] | None:
    """Whether the motion head is within one test video of the best peer on this task."""
    peers = [r for r in rows if r in PEERS and r not in NOT_PEERS]
    if MOTION not in rows or not peers:
        return None
    best = max(peers, key=lambda r: entry["rows"][r]["mean"])
    margin = entry["rows"][MOTION]["mean"] - entry["rows"][best]["mean"]
    tolerance = 1 / entry["test_videos"]
    return {"best_peer": best, "best_peer_top1": entry["rows"][best]["mean"], "motion_top1": entry["rows"][MOTION]["mean"],
            "margin": margin, "tolerance": tolerance, "wins": margin >= -tolerance - 1e-12}


# --------------------------------------------------------------------------- reporting
def markdown(results: dict) -> str:
    """The results as a Markdown table (rows: heads; columns: tasks), with the verdicts."""
    tasks = list(results["tasks"])
    rows = results["rows"]
    first = results["tasks"][tasks[0]]["rows"]
    header = ["head", *tasks, "mean", "params", "params ViT-B/16"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row in rows:
        cells = []
        for task in tasks:
            stats = results["tasks"][task]["rows"][row]
            cells.append(f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if len(stats["top1"]) > 1 else ""))
        overall = statistics.fmean(results["tasks"][t]["rows"][row]["mean"] for t in tasks)
        params = first[row]["params"]
        cells += [f"{overall:.3f}", f"{params:,}" if row not in BASELINES else "0",
                  f"{first[row]['params_vit_b16']:,}" if row not in BASELINES else "0"]
        name = f"**{row}**" if row == MOTION else row
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for task in tasks:
        v = results["tasks"][task]["verdict"]
        if v is not None:
            lines.append(f"- {task}: motion {v['motion_top1']:.3f}, best peer {v['best_peer']} {v['best_peer_top1']:.3f} "
                         f"(margin {v['margin']:+.3f}, one test video = {v['tolerance']:.4f}): "
                         f"{'wins' if v['wins'] else 'LOSES'}")
    settings, m = results["settings"], results["machine"]
    grid = settings.get("lr_grid") or ()
    if len(grid) > 1:
        lines += ["", f"Learning rates chosen on the validation split (per task and seed, from {list(grid)}):"]
        for row in rows:
            chosen = [lr for t in tasks for lr in results["tasks"][t]["rows"][row].get("lr", []) if lr is not None]
            if chosen:
                counts = ", ".join(f"{lr:g} x{chosen.count(lr)}" for lr in sorted(set(chosen)))
                lines.append(f"- {row}: {counts}")
    schedule = (f"lr chosen per head, task and seed from {list(grid)} on {settings['val_fraction']:.0%} of each "
                f"class's training videos" if len(grid) > 1 else f"one lr for every head, {settings['lr']:g}")
    lines += ["", f"Top-1 on the test videos, mean ± standard deviation over seeds {results['seeds']} (each seed draws "
              f"its own videos and initialises the heads); "
              f"{settings['model']} with random weights; {settings['train_per_class']} training and "
              f"{settings['test_per_class']} test videos per class; {settings['epochs']} epochs, batch "
              f"{settings['batch_size']}, {schedule}, {settings['warmup_steps']} warm-up steps. "
              f"params: trainable parameters at the benchmark's width and at ViT-B/16's (D = 512, 8 frames, "
              f"400 classes for the classifier heads). The peers read per-video standardised frames "
              f"(`<peer>_raw` rows: the raw frames, on request).",
              f"{m['cpu']} ({m['cpus']} CPUs), torch {m['torch']}; {results['workers']} worker processes; "
              f"{results['seconds']:.0f} s in all ({results['cpu_seconds']:.0f} s of CPU time in the workers); "
              f"load average {results['load_average_before'][0]:.1f} before, "
              f"{results['load_average_after'][0]:.1f} after; {results['date']}.",
              f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """A heat map of mean top-1, heads by tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = list(results["tasks"]), results["rows"]
    values = [[results["tasks"][t]["rows"][r]["mean"] for t in tasks] for r in rows]
    figure, axes = plt.subplots(figsize=(1.1 * len(tasks) + 3, 0.4 * len(rows) + 1.5))
    image = axes.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                      fontsize=8)
    figure.colorbar(image, ax=axes, label="top-1 (mean over seeds)")
    axes.set_title(f"accuracy benchmark ({results['settings']['model']}, random weights)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1)), ("results.md", markdown(results))):
        temporary = out / f".{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, out / name)
    plot(results, out / "results.png")


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/accuracy", help="folder of the videos, caches and results")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS), metavar="TASK",
                        help=f"tasks of {list(TASKS)} (default: %(default)s)")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=[*BASELINES, MOTION, *ABLATIONS, *PEERS],
                        metavar="ROW", help="heads to score (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="processes (one thread each)")
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        default = getattr(defaults, field.name)
        kind = {"nargs": "+", "type": float} if isinstance(default, tuple) else {"type": type(default)}
        parser.add_argument("--" + field.name.replace("_", "-"), default=default, help="default: %(default)s", **kind)
    parser.add_argument("--check", action="store_true", help="exit 1 when the motion head loses a task")
    args = parser.parse_args(argv)
    if args.workers < 1 or not args.seeds:
        parser.error("need --workers >= 1 and at least one seed")
    if not all(lr > 0 for lr in (args.lr, *args.lr_grid)) or not 0 < args.val_fraction < 1:
        parser.error("need learning rates > 0 and 0 < --val-fraction < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = Settings(**{f.name: tuple(value) if isinstance(value := getattr(args, f.name), list) else value
                           for f in dataclasses.fields(Settings)})
    out = Path(args.out)
    results = run(settings, args.tasks, list(dict.fromkeys(args.rows)), args.seeds, out, args.workers)
    write_outputs(results, out)
    print(markdown(results))
    losses = [t for t, entry in results["tasks"].items() if entry["verdict"] is not None and not entry["verdict"]["wins"]]
    if args.check and losses:
        print(f"the motion head loses on {losses}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
