"""Walk-through: learn motion direction on synthetic videos, on CPU, in a few minutes.

Four classes — a square "moving left", "right", "up" or "down". Left and right (and up
and down) show the same kind of frames in opposite orders, so anything built on
mean-pooled frame features cannot tell them apart; the motion head can. CLIP has
random weights here (no pretrained weights are needed or downloaded): its frame
features still differ with the content of each frame.

The script

1. writes the dataset (mp4 files, list files, class names),
2. caches the frozen-CLIP frame features (``mpfast cache``),
3. scores two baselines on mean-pooled frames: the untrained model (exactly CLIP
   zero-shot with mean pooling) and a linear probe trained on mean-pooled features,
4. trains the motion head from the cache (``mpfast train``) and evaluates it,
5. times training steps from the cache against steps that decode and encode every
   video (on ViT-B/32 by default, where encoding dominates), and prints everything as
   a table and JSON (also written to OUT/results.json).

Run from the repository root:  python examples/synthetic_motion.py --out runs/synthetic
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from mpfast import create_model_and_transforms
from mpfast.data import ClipTransform, SamplingConfig, VideoDataset, read_class_names, read_list
from mpfast.data.synthetic import make_synthetic_dataset
from mpfast.engine import FeatureDataset, TrainConfig, Trainer, build_cache, evaluate

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "configs" / "mpfast-tiny.json"


def linear_probe(train_cache, test_cache, epochs: int = 300, lr: float = 1e-2) -> float:
    """Top-1 of a logistic regression on mean-pooled (over frames) cached features."""
    x_train = train_cache.features[:].mean(dim=2).flatten(0, 1)  # every view is a sample
    y_train = train_cache.labels.repeat_interleave(train_cache.features.shape[1])
    x_test = test_cache.features[:].mean(dim=2).mean(dim=1)
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(probe((x_train - mean) / std), y_train).backward()
        optimizer.step()
    return (probe((x_test - mean) / std).argmax(1) == test_cache.labels).float().mean().item()


def time_steps(args: argparse.Namespace, data: Path) -> dict:
    """Milliseconds per training step from the cache and from videos, on ``args.timing_model``."""
    torch.manual_seed(args.seed)
    model = create_model_and_transforms(args.timing_model, None, num_frames=args.frames)[0]
    size = model.clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    names = read_class_names(data / "classes.csv")
    entries = read_list(data / "train.txt")[: args.timing_steps * args.batch_size]
    sampling = SamplingConfig(args.frames)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, progress=False)
    started = time.perf_counter()
    cache = build_cache(model, VideoDataset(entries, data, sampling, ClipTransform(size)), Path(args.out) / "cache",
                        args.timing_model, batch_size=args.batch_size)
    build = time.perf_counter() - started
    model.encode_classes(names)  # the text side is encoded once per class list either way
    per_step = {}
    for label, dataset in (("cached", FeatureDataset(cache, train=True)),
                           ("decode_encode", VideoDataset(entries, data, sampling, ClipTransform(size, train=True)))):
        trainer = Trainer(model, names, dataset, config)
        started = time.perf_counter()
        trainer.fit()
        per_step[label] = (time.perf_counter() - started) / trainer.total_steps * 1000
    return {"model": args.timing_model, "steps": args.timing_steps, "ms_per_step_cached": per_step["cached"],
            "ms_per_step_decode_encode": per_step["decode_encode"],
            "speedup": per_step["decode_encode"] / per_step["cached"],
            "ms_per_video_cache_build": build / len(entries) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/synthetic", help="working folder")
    parser.add_argument("--model", default="mpfast-tiny", help="open_clip model (random weights)")
    parser.add_argument("--train-per-class", type=int, default=128)
    parser.add_argument("--test-per-class", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8, help="frames per clip T")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-model", default="ViT-B-32",
                        help="model of the cache speed-up measurement (random weights; 'mpfast-tiny' is quicker)")
    parser.add_argument("--timing-steps", type=int, default=2, help="training steps timed per mode")
    parser.add_argument("--cache-dtype", default="float16", choices=("float16", "float32"),
                        help="storage dtype of the feature cache")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    open_clip.add_model_config(TINY_CONFIG)
    out = Path(args.out)

    data = out / "data"
    if not (data / "classes.csv").exists():
        make_synthetic_dataset(data, args.train_per_class, args.test_per_class, size=32, num_frames=16, seed=args.seed)
    names = read_class_names(data / "classes.csv")
    torch.manual_seed(args.seed)
    model = create_model_and_transforms(args.model, None, num_frames=args.frames)[0]
    size = model.clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    sampling = SamplingConfig(args.frames)

    def videos(split: str, train: bool = False) -> VideoDataset:
        transform = ClipTransform(size, train=train, flip=False)
        return VideoDataset(read_list(data / f"{split}.txt"), data, sampling, transform, num_clips=1 if train else 2,
                            seed=args.seed)

    started = time.perf_counter()
    train_cache = build_cache(model, videos("train"), out / "cache", args.model, dtype=args.cache_dtype,
                              progress=not args.no_progress)
    test_cache = build_cache(model, videos("test"), out / "cache", args.model, dtype=args.cache_dtype,
                             progress=not args.no_progress)
    cache_seconds = time.perf_counter() - started

    zero_shot, _, _ = evaluate(model, FeatureDataset(test_cache), names)
    probe = linear_probe(train_cache, test_cache)

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         log_every=20, progress=not args.no_progress)
    trainer = Trainer(model, names, FeatureDataset(train_cache, train=True, seed=args.seed), config,
                      output_dir=out / "motion", model_info={"model": args.model, "init_seed": args.seed},
                      overwrite=True)  # a rerun of the walk-through replaces its own run
    started = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - started
    motion, _, _ = evaluate(model, FeatureDataset(test_cache), names)

    timing = time_steps(args, data)
    model_state = trainer.checkpoint_path()

    results = {
        "videos": {"train": len(train_cache.indices), "test": len(test_cache.indices)},
        "top1": {"chance": 1 / len(names), "zero_shot_mean_pooled": zero_shot["top1"],
                 "linear_probe_mean_pooled": probe, "motion_head": motion["top1"]},
        "motion_head": {k: motion[k] for k in ("top1", "top5", "mean_class_accuracy")},
        "seconds": {"cache_build": cache_seconds, "training": train_seconds},
        "timing": timing,
        "checkpoint": model_state,
    }
    print(f"\n{'classifier':40s} top-1 on {len(test_cache.indices)} test videos")
    print(f"{'chance':40s} {1 / len(names):.3f}")
    print(f"{'CLIP zero-shot, mean-pooled frames':40s} {zero_shot['top1']:.3f}")
    print(f"{'linear probe on mean-pooled frames':40s} {probe:.3f}")
    print(f"{'motion head (trained, ' + str(args.epochs) + ' epochs)':40s} {motion['top1']:.3f}")
    print(f"\ntraining step of {args.batch_size} videos on {timing['model']}: {timing['ms_per_step_cached']:.1f} ms from the "
          f"cache, {timing['ms_per_step_decode_encode']:.1f} ms decoding and encoding every step "
          f"({timing['speedup']:.1f}x); caching cost {timing['ms_per_video_cache_build']:.1f} ms per video, once")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
