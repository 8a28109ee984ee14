"""``mpfast cache | train | eval | classify``: the training engine on the command line.

Every command builds the model from an open_clip name (``--model``, ``--pretrained``);
``--model-config PATH`` registers a custom open_clip model config (json) first, so any
architecture can be used offline. Under ``torchrun`` ``cache``, ``train`` and ``eval``
share the work over the processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import open_clip
import torch

from ..data.dataset import VideoDataset, check_policy
from ..data.lists import VideoEntry, read_class_names, read_list
from ..data.protocols import few_shot_indices, mean_std
from ..data.transforms import ClipTransform
from ..data.video import SAMPLING_MODES, SamplingConfig, VideoDecodeError
from ..model import create_model_and_transforms
from . import distributed
from .cache import DEFAULT_DTYPE, FeatureDataset, build_cache, list_caches, prune_caches
from .checkpoint import load_checkpoint, load_head
from .shards import STORAGE_DTYPES
from .trainer import AMP_MODES, TrainConfig, Trainer, check_output_dir, evaluate

logger = logging.getLogger("mpfast.engine")

DEFAULT_MODEL = "ViT-B-32"


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help=f"open_clip model name (default: the checkpoint's, else {DEFAULT_MODEL})")
    group.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local weights file (default: random)")
    group.add_argument("--model-config", action="append", default=[], metavar="JSON",
                       help="register a custom open_clip model config file (repeatable); its file name is the model name")
    group.add_argument("--num-frames", type=int, default=None, help="frames per clip T (default: checkpoint's, else 8)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--precision", default="fp32", help="precision of the frozen CLIP (fp32, bf16, fp16)")
    group.add_argument("--init-seed", type=int, default=None,
                       help="seed of the random CLIP weights without --pretrained (default: the checkpoint's, else 0)")


def _data_arguments(parser: argparse.ArgumentParser, *, list_flag: str = "--list", required: bool = True,
                    repeat: bool = False) -> None:
    group = parser.add_argument_group("data")
    if repeat:
        group.add_argument(list_flag, action="append", required=required, metavar="FILE",
                           help="list file 'relative/path.mp4 label' per line; repeat for several splits (mean ± std)")
    else:
        group.add_argument(list_flag, required=required, metavar="FILE", help="list file 'relative/path.mp4 label' per line")
    group.add_argument("--root", default=None, help="folder the list's paths are relative to (default: the list's folder)")
    group.add_argument("--sampling", choices=SAMPLING_MODES, default="segment", help="frame sampling (TSN segments or dense)")
    group.add_argument("--stride", type=int, default=4, help="frame stride of dense sampling")
    group.add_argument("--clips", type=int, default=1, help="temporal views per video (evaluation and cache)")
    group.add_argument("--crops", type=int, choices=(1, 3), default=1, help="spatial views per clip (evaluation and cache)")
    group.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                       help="broken videos: skip with a warning (counted) or stop")
    group.add_argument("--batch-size", type=int, default=32, help="videos per batch (global under torchrun)")
    group.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    group.add_argument("--cache-dir", default=None, help="folder of feature caches (compute once, reuse while valid)")
    group.add_argument("--cache-dtype", choices=sorted(STORAGE_DTYPES), default=DEFAULT_DTYPE,
                       help="storage dtype of cached features")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_commands(subparsers) -> None:
    """Adds ``cache``, ``train``, ``eval`` and ``classify``."""
    cache = subparsers.add_parser("cache", help="compute and store frozen-CLIP frame features of a video list")
    _model_arguments(cache)
    _data_arguments(cache, required=False)
    group = cache.add_argument_group("cache folders")
    group.add_argument("--list-caches", action="store_true", help="describe the caches in --cache-dir and exit")
    group.add_argument("--prune", action="store_true",
                       help="delete the caches in --cache-dir that no run can use any more (a video changed or vanished)")
    group.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                       help="with --prune: also delete caches not used for DAYS days")
    group.add_argument("--dry-run", action="store_true", help="with --prune: list what would be deleted")
    cache.set_defaults(func=run_cache)

    train = subparsers.add_parser("train", help="train the motion-prompt head")
    _model_arguments(train)
    _data_arguments(train, list_flag="--train-list")
    group = train.add_argument_group("training")
    group.add_argument("--classes", required=True, metavar="CSV", help="class names, 'id,name' per line")
    group.add_argument("--val-list", default=None, metavar="FILE", help="evaluated after every epoch (same classes)")
    group.add_argument("--output", required=True, metavar="DIR", help="checkpoint and metrics.jsonl folder")
    group.add_argument("--epochs", type=int, default=10)
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument("--amp", choices=AMP_MODES, default="none")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--shots", type=int, default=None, help="few-shot: K training videos per class (seeded)")
    group.add_argument("--no-flip", action="store_true", help="no horizontal flips (when left/right matters)")
    group.add_argument("--log-every", type=int, default=10)
    group.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: each epoch)")
    group.add_argument("--resume", default=None, metavar="CKPT", help="continue a run from its last.safetensors")
    group.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    train.set_defaults(func=run_train)

    evaluate_parser = subparsers.add_parser("eval", help="top-1/top-5/mean class accuracy of a checkpoint")
    _model_arguments(evaluate_parser)
    _data_arguments(evaluate_parser, repeat=True)
    evaluate_parser.add_argument("--classes", required=True, metavar="CSV", help="class names, 'id,name' per line")
    evaluate_parser.add_argument("--checkpoint", default=None,
                                 help="trained head (default: none, i.e. CLIP zero-shot on mean-pooled frames)")
    evaluate_parser.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    evaluate_parser.set_defaults(func=run_eval)

    classify = subparsers.add_parser("classify", help="top-5 classes of one video")
    _model_arguments(classify)
    classify.add_argument("video", help="video file")
    classify.add_argument("--classes", required=True, help='comma-separated class names, e.g. "run,jump,walk"')
    classify.add_argument("--checkpoint", default=None, help="trained head (default: untrained = CLIP zero-shot)")
    classify.add_argument("--clips", type=int, default=1, help="temporal views")
    classify.add_argument("--crops", type=int, choices=(1, 3), default=1, help="spatial views")
    classify.set_defaults(func=run_classify)


# --------------------------------------------------------------------------- helpers
def _build_model(args: argparse.Namespace, device: torch.device):
    """Registers configs, reads the checkpoint (if any) and builds the model; returns (model, model_info, checkpoint)."""
    for path in args.model_config:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --model-config {path!r} does not exist")
        open_clip.add_model_config(path)
    checkpoint = load_checkpoint(args.checkpoint) if getattr(args, "checkpoint", None) else None
    info = checkpoint.model_info if checkpoint is not None else {}
    name = args.model or info.get("model") or DEFAULT_MODEL
    if checkpoint is not None and info.get("model") and info["model"] != name:
        logger.warning("checkpoint was trained on %s, loading it on %s", info["model"], name)
    options: dict[str, Any] = {}
    if checkpoint is not None:
        options = {k: v for k, v in vars(checkpoint.head_config).items()}
        if args.num_frames is not None:
            options["num_frames"] = args.num_frames
    else:
        options["num_frames"] = args.num_frames or 8
    init_seed = args.init_seed if args.init_seed is not None else int(info.get("init_seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # random CLIP weights are the same in every command
        model, _, _, _ = create_model_and_transforms(name, args.pretrained, device=device, precision=args.precision,
                                                     **options)
    if checkpoint is not None:
        load_head(model, checkpoint)
    model_info = {"model": name, "pretrained": args.pretrained, "precision": args.precision, "init_seed": init_seed}
    return model, model_info, checkpoint


def _transform(model, *, train: bool, crops: int = 1, flip: bool = True) -> ClipTransform:
    visual = model.clip.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = getattr(visual, "image_mean", None) or ClipTransform.__dataclass_fields__["mean"].default
    std = getattr(visual, "image_std", None) or ClipTransform.__dataclass_fields__["std"].default
    return ClipTransform(size, tuple(mean), tuple(std), train=train, crops=1 if train else crops, flip=flip)


def _sampling(args: argparse.Namespace, model) -> SamplingConfig:
    return SamplingConfig(model.config.num_frames, args.sampling, args.stride)


def _root(args: argparse.Namespace, list_path: str) -> str:
    return args.root if args.root is not None else os.path.dirname(os.path.abspath(list_path))


def _eval_dataset(args, model, entries, root) -> VideoDataset:
    return VideoDataset(entries, root, _sampling(args, model), _transform(model, train=False, crops=args.crops),
                        num_clips=args.clips, on_error=check_policy(args.on_error))


def _cached(args, model, model_info, entries, root, device, *, train: bool, seed: int = 0, positions=None):
    dataset = _eval_dataset(args, model, entries, root)
    cache = build_cache(model, dataset, args.cache_dir, model_info["model"], precision=args.precision,
                        dtype=args.cache_dtype, batch_size=max(1, args.batch_size // distributed.world_size()),
                        num_workers=args.workers, device=device, progress=not args.no_progress)
    return FeatureDataset(cache, train=train, seed=seed, positions=positions)


# --------------------------------------------------------------------------- commands
def run_cache(args: argparse.Namespace) -> int:
    if args.list_caches or args.prune:
        if not args.cache_dir:
            raise ValueError("--list-caches and --prune need --cache-dir")
        if args.prune:
            print(json.dumps({"pruned": prune_caches(args.cache_dir, args.older_than, dry_run=args.dry_run),
                              "dry_run": args.dry_run}))
        else:
            print(json.dumps({"caches": list_caches(args.cache_dir)}))
        return 0
    if not args.list or not args.cache_dir:
        raise ValueError("mpfast cache needs --list and --cache-dir (or --list-caches/--prune with --cache-dir)")
    device = distributed.init_from_environment(args.device)
    model, model_info, _ = _build_model(args, device)
    entries = read_list(args.list)
    dataset = _cached(args, model, model_info, entries, _root(args, args.list), device, train=False)
    cache = dataset.cache
    if distributed.rank() == 0:
        print(json.dumps({"cache": cache.folder, "videos": cache.meta["count"], "skipped": len(cache.failed),
                          "short": cache.meta["short"], "shape": list(cache.features.shape),
                          "dtype": cache.meta["dtype"], "encoded": cache.built["videos_encoded"],
                          "seconds": round(cache.meta["seconds"], 3)}))
    return 0


def run_train(args: argparse.Namespace) -> int:
    check_output_dir(args.output, resume=args.resume, overwrite=args.overwrite)  # before hours of caching
    device = distributed.init_from_environment(args.device)
    args.checkpoint = None
    model, model_info, _ = _build_model(args, device)
    class_names = read_class_names(args.classes)
    entries = read_list(args.train_list, num_classes=len(class_names))
    positions = list(range(len(entries)))
    if args.shots is not None:
        positions = few_shot_indices(entries, args.shots, seed=args.seed)
    root = _root(args, args.train_list)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, amp=args.amp, grad_clip=args.grad_clip, seed=args.seed,
                         log_every=args.log_every, checkpoint_every=args.checkpoint_every, num_workers=args.workers,
                         progress=not args.no_progress)
    if args.cache_dir:
        train_set = _cached(args, model, model_info, entries, root, device, train=True, seed=args.seed,
                            positions=positions)
    else:
        transform = _transform(model, train=True, flip=not args.no_flip)
        train_set = VideoDataset([entries[i] for i in positions], root, _sampling(args, model), transform,
                                 on_error=args.on_error, seed=args.seed)
    eval_set = None
    if args.val_list:
        val_entries = read_list(args.val_list, num_classes=len(class_names))
        val_root = _root(args, args.val_list) if args.root is None else args.root
        eval_set = (_cached(args, model, model_info, val_entries, val_root, device, train=False) if args.cache_dir
                    else _eval_dataset(args, model, val_entries, val_root))
    trainer = Trainer(model, class_names, train_set, config, eval_set=eval_set, device=device,
                      output_dir=args.output, model_info=model_info, overwrite=args.overwrite)
    if args.resume:
        trainer.resume(args.resume)
    history = trainer.fit()
    if distributed.rank() == 0:
        result = {"checkpoint": trainer.checkpoint_path(), "steps": trainer.step, "train_videos": len(train_set),
                  "skipped": len(trainer.broken.failed)}
        if history:
            result["eval"] = {k: history[-1][k] for k in ("top1", "top5", "mean_class_accuracy", "count", "skipped")}
        print(json.dumps(result))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    device = distributed.init_from_environment(args.device)
    model, model_info, _ = _build_model(args, device)
    class_names = read_class_names(args.classes)
    results = []
    for list_path in args.list:
        entries = read_list(list_path, num_classes=len(class_names))
        root = _root(args, list_path)
        dataset = (_cached(args, model, model_info, entries, root, device, train=False) if args.cache_dir
                   else _eval_dataset(args, model, entries, root))
        metrics, _, _ = evaluate(model, dataset, class_names, batch_size=max(1, args.batch_size // distributed.world_size()),
                                 device=device, num_workers=args.workers, progress=not args.no_progress)
        results.append({"list": list_path, **metrics})
    summary: dict[str, Any] = {"splits": results}
    if len(results) > 1:
        for key in ("top1", "top5", "mean_class_accuracy"):
            mean, std = mean_std([r[key] for r in results])
            summary[key] = {"mean": mean, "std": std}
    if distributed.rank() == 0:
        text = json.dumps(summary)
        print(text)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
    return 0


def run_classify(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    class_names = [name.strip() for name in args.classes.split(",") if name.strip()]
    if not class_names:
        raise SystemExit("error: --classes must list at least one class name")
    model, _, _ = _build_model(args, device)
    args.sampling, args.stride, args.on_error = "segment", 4, "raise"
    dataset = _eval_dataset(args, model, [VideoEntry(os.path.abspath(args.video), 0)], "/")
    try:
        item = dataset[0]
    except VideoDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with torch.no_grad():
        model.eval()
        video = item["video"].to(device)
        logits = model.forward_features(model.encode_frames(video), model.encode_classes(class_names)).mean(dim=0)
    probabilities = logits.float().softmax(dim=-1)
    if not torch.isfinite(probabilities).all():
        print(f"error: the model gave non-finite scores for {args.video}", file=sys.stderr)
        return 1
    top = probabilities.topk(min(5, len(class_names)))
    for probability, index in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{probability:.4f}  {class_names[index]}")
    return 0

