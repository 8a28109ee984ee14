"""``mpfast cache | train | eval | classify``: the training engine on the command line.

Every command builds the model from an open_clip name (``--model``, ``--pretrained``);
``--model-config PATH`` registers a custom open_clip model config (json) first, so any
architecture can be used offline. A checkpoint carries everything the model was trained
with (open_clip name and config, weights, precision, frames, head options, class
names): ``eval`` and ``classify`` of a checkpoint use those unless a flag says
otherwise. ``--classes`` takes a class-name file or a comma-separated list. Under
``torchrun`` ``cache``, ``train`` and ``eval`` share the work over the processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Any

import open_clip
import torch

from ..cli import Interrupted, UsageError, nonnegative_float, nonnegative_int, positive_float, positive_int
from ..data.dataset import VideoDataset, check_policy
from ..data.lists import VideoEntry, parse_class_names, read_list
from ..data.protocols import few_shot_indices, mean_std
from ..data.transforms import ClipTransform
from ..data.video import SAMPLING_MODES, SamplingConfig, open_video
from ..model import PRECISIONS, add_model_config, create_model_and_transforms
from . import distributed
from .cache import DEFAULT_DTYPE, FeatureDataset, build_cache, list_caches, prune_caches
from .checkpoint import Checkpoint, NonFiniteError, load_checkpoint, load_head
from .shards import STORAGE_DTYPES
from .trainer import AMP_MODES, TrainConfig, Trainer, check_output_dir, evaluate

logger = logging.getLogger("mpfast.engine")
_DEFAULTS = TrainConfig()  # the CLI's training defaults are the library's

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_NUM_FRAMES = 8
CLASSES_HELP = "class names: a file ('id,name' CSV, or one name per line) or a comma-separated list \"run,jump,walk\""


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help=f"open_clip model name, or mpfast-tiny (default: the checkpoint's, else the one "
                            f"--model-config registers, else {DEFAULT_MODEL})")
    group.add_argument("--pretrained", default=None,
                       help="open_clip pretrained tag or local weights file (default: the checkpoint's, else random "
                            "weights)")
    group.add_argument("--model-config", action="append", default=[], metavar="JSON",
                       help="register a custom open_clip model config file (repeatable); its file name is the model "
                            "name (default: none; a checkpoint brings its own)")
    group.add_argument("--num-frames", type=positive_int, default=None,
                       help=f"frames per clip T (default: the checkpoint's, else {DEFAULT_NUM_FRAMES})")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="precision of the frozen CLIP's weights; the head stays float32 (default: the "
                            "checkpoint's, else fp32)")
    group.add_argument("--init-seed", type=nonnegative_int, default=None,
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
    group.add_argument("--stride", type=positive_int, default=4, help="frame stride of dense sampling")
    group.add_argument("--clips", type=positive_int, default=1, help="temporal views per video (evaluation and cache)")
    group.add_argument("--crops", type=int, choices=(1, 3), default=1, help="spatial views per clip (evaluation and cache)")
    group.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                       help="broken videos: skip with a warning (counted) or stop")
    group.add_argument("--batch-size", type=positive_int, default=32, help="videos per batch (global under torchrun)")
    group.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    group.add_argument("--cache-dir", default=None,
                       help="folder of feature caches: compute once, reuse while valid (default: no cache, decode and "
                            "encode every video)")
    group.add_argument("--cache-dtype", choices=sorted(STORAGE_DTYPES), default=DEFAULT_DTYPE,
                       help="storage dtype of cached features (float32 takes twice the space)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines go to the -v log)")


def add_commands(subparsers) -> None:
    """Adds ``cache``, ``train``, ``eval`` and ``classify``."""
    cache = subparsers.add_parser("cache", help="compute and store frozen-CLIP frame features of a video list")
    _model_arguments(cache)
    _data_arguments(cache, required=False)
    group = cache.add_argument_group("cache folders")
    group.add_argument("--list-caches", action="store_true", help="describe the caches in --cache-dir and exit")
    group.add_argument("--prune", action="store_true",
                       help="delete the caches in --cache-dir that no run can use any more (a video changed or "
                            "vanished)")
    group.add_argument("--older-than", type=nonnegative_float, default=None, metavar="DAYS",
                       help="with --prune: also delete caches not used for DAYS days")
    group.add_argument("--dry-run", action="store_true", help="with --prune: list what would be deleted")
    cache.set_defaults(func=run_cache)

    train = subparsers.add_parser("train", help="train the motion-prompt head")
    _model_arguments(train)
    _data_arguments(train, list_flag="--train-list")
    group = train.add_argument_group("training")
    group.add_argument("--classes", required=True, help=CLASSES_HELP + "; label i is name i")
    group.add_argument("--val-list", default=None, metavar="FILE",
                       help="evaluated after every epoch with the same classes (default: none)")
    group.add_argument("--output", required=True, metavar="DIR", help="checkpoint and metrics.jsonl folder")
    group.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs, help="passes over the training set")
    group.add_argument("--lr", type=positive_float, default=_DEFAULTS.lr, help="peak learning rate of AdamW")
    group.add_argument("--weight-decay", type=nonnegative_float, default=0.05, help="AdamW weight decay")
    group.add_argument("--warmup-steps", type=nonnegative_int, default=_DEFAULTS.warmup_steps,
                       help="steps of linear learning-rate warm-up before the cosine decay")
    group.add_argument("--amp", choices=AMP_MODES, default="none",
                       help="autocast dtype of the head (fp16 needs CUDA); the CLIP's dtype is --precision")
    group.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="max gradient norm (0: off)")
    group.add_argument("--seed", type=nonnegative_int, default=0,
                       help="seed of the sample order, augmentation and few-shot subset")
    group.add_argument("--shots", type=positive_int, default=None,
                       help="few-shot: K training videos per class, seeded (default: all videos)")
    group.add_argument("--no-flip", action="store_true", help="no horizontal flips (when left/right matters)")
    group.add_argument("--log-every", type=nonnegative_int, default=10,
                       help="steps between train records in metrics.jsonl and progress-bar updates (0: off)")
    group.add_argument("--checkpoint-every", type=nonnegative_int, default=0,
                       help="steps between checkpoints (0: at the end of each epoch only)")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue a run from its last.safetensors (default: start a new run)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a run already in --output (default: refuse; --resume continues it)")
    train.set_defaults(func=run_train)

    evaluate_parser = subparsers.add_parser("eval", help="top-1/top-5/mean class accuracy of a checkpoint")
    _model_arguments(evaluate_parser)
    _data_arguments(evaluate_parser, repeat=True)
    evaluate_parser.add_argument("--classes", default=None,
                                 help=CLASSES_HELP + "; the list's labels index it (default: the checkpoint's classes)")
    evaluate_parser.add_argument("--checkpoint", default=None,
                                 help="trained head (default: none, i.e. CLIP zero-shot on mean-pooled frames)")
    evaluate_parser.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    evaluate_parser.set_defaults(func=run_eval)

    classify = subparsers.add_parser("classify", help="top-5 classes of one video")
    _model_arguments(classify)
    classify.add_argument("video", help="video file")
    classify.add_argument("--classes", default=None, help=CLASSES_HELP + " (default: the checkpoint's classes)")
    classify.add_argument("--checkpoint", default=None, help="trained head (default: untrained = CLIP zero-shot)")
    classify.add_argument("--clips", type=positive_int, default=1, help="temporal views")
    classify.add_argument("--crops", type=int, choices=(1, 3), default=1, help="spatial views")
    classify.set_defaults(func=run_classify)


# --------------------------------------------------------------------------- helpers
@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How a command reads videos (the data flags, passed explicitly to the helpers below)."""

    sampling: str = "segment"  # frame sampling mode
    stride: int = 4  # frame stride of dense sampling
    clips: int = 1  # temporal views per video
    crops: int = 1  # spatial views per clip
    on_error: str = "skip"  # broken videos: "skip" or "raise"
    batch_size: int = 32  # global batch size
    workers: int = 0  # DataLoader workers
    cache_dir: str | None = None  # feature cache folder (None: no cache)
    progress: bool = True  # progress bars
    cache_dtype: str = DEFAULT_DTYPE  # storage dtype of cached features

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataOptions":
        return cls(args.sampling, args.stride, args.clips, args.crops, check_policy(args.on_error), args.batch_size,
                   args.workers, args.cache_dir, not args.no_progress, args.cache_dtype)

    @property
    def local_batch(self) -> int:
        return max(1, self.batch_size // distributed.world_size())


def _class_names(value: str | None, checkpoint: Checkpoint | None) -> list[str]:
    """``--classes`` (file or list), else the checkpoint's class names."""
    if value is not None:
        try:
            return parse_class_names(value)
        except (ValueError, OSError) as exc:
            raise UsageError(f"--classes: {exc}") from exc
    if checkpoint is not None and checkpoint.class_names:
        return list(checkpoint.class_names)
    raise UsageError("--classes is needed: give a class-name file or a comma-separated list "
                     "(only a --checkpoint written by `mpfast train` brings its own)")


def _register_model(args: argparse.Namespace, info: dict[str, Any]) -> str:
    """Registers ``--model-config`` files and a checkpoint's stored config; returns the model name."""
    registered = [add_model_config(path) for path in args.model_config]
    if len(registered) > 1 and not (args.model or info.get("model")):
        raise UsageError(f"--model is needed to choose among the {len(registered)} --model-config files")
    name = args.model or info.get("model") or (registered[0] if registered else DEFAULT_MODEL)
    stored = info.get("open_clip_config")
    if info.get("model") and stored:
        if info["model"] in registered:
            if open_clip.get_model_config(info["model"]) != stored:
                logger.warning("--model-config %s differs from the config the checkpoint was trained with",
                               info["model"])
        else:
            add_model_config(stored, info["model"])
    if info.get("model") and info["model"] != name:
        logger.warning("checkpoint was trained on %s, loading it on %s", info["model"], name)
    return name


def _head_options(args: argparse.Namespace, checkpoint: Checkpoint | None) -> dict[str, Any]:
    if checkpoint is None:
        return {"num_frames": args.num_frames or DEFAULT_NUM_FRAMES}
    options = dataclasses.asdict(checkpoint.head_config)
    if args.num_frames is not None and args.num_frames != options["num_frames"]:
        raise UsageError(f"--num-frames {args.num_frames} does not fit the checkpoint, whose head was trained with "
                         f"{options['num_frames']} frames (leave --num-frames out to use them)")
    return options


def _pretrained(args: argparse.Namespace, info: dict[str, Any]) -> str | None:
    if args.pretrained is not None:
        return args.pretrained
    stored = info.get("pretrained")
    if stored and (os.sep in stored or os.path.splitext(stored)[1]) and not os.path.isfile(stored):
        raise FileNotFoundError(f"the checkpoint was trained on the CLIP weights {stored!r}, which do not exist here; "
                                f"pass their path with --pretrained")
    return stored


def _build_model(args: argparse.Namespace, device: torch.device, checkpoint: Checkpoint | None = None):
    """Builds the model the flags and the checkpoint (if any) describe; returns ``(model, model_info)``.

    ``model_info`` is what a checkpoint stores about the CLIP: open_clip name and config,
    pretrained weights, precision and the seed of random weights.
    """
    info = checkpoint.model_info if checkpoint is not None else {}
    name = _register_model(args, info)
    options = _head_options(args, checkpoint)
    pretrained = _pretrained(args, info)
    precision = args.precision or info.get("precision") or "fp32"
    init_seed = args.init_seed if args.init_seed is not None else int(info.get("init_seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # random CLIP weights are the same in every command
        model, _, _, _ = create_model_and_transforms(name, pretrained, device=device, precision=precision, **options)
    if checkpoint is not None:
        load_head(model, checkpoint)
        logger.info("checkpoint head on %s (weights %s, %s, %d frames)", name, pretrained or "random", precision,
                    options["num_frames"])
    schema = name.startswith(("hf-hub:", "local-dir:"))  # their config lives with the weights
    model_info = {"model": name, "pretrained": pretrained, "precision": precision, "init_seed": init_seed,
                  "open_clip_config": None if schema else open_clip.get_model_config(name)}
    return model, model_info


def _sampling(model, data: DataOptions) -> SamplingConfig:
    return SamplingConfig(model.config.num_frames, data.sampling, data.stride)


def _root(root: str | None, list_path: str) -> str:
    return root if root is not None else os.path.dirname(os.path.abspath(list_path))


def _eval_dataset(model, data: DataOptions, entries, root) -> VideoDataset:
    return VideoDataset(entries, root, _sampling(model, data), ClipTransform.for_clip(model.clip, crops=data.crops),
                        num_clips=data.clips, on_error=data.on_error)


def _cached(model, model_info, data: DataOptions, entries, root, device, *, train: bool, seed: int = 0,
            positions=None) -> FeatureDataset:
    dataset = _eval_dataset(model, data, entries, root)
    cache = build_cache(model, dataset, data.cache_dir, model_info["model"], precision=model_info["precision"],
                        dtype=data.cache_dtype, batch_size=data.local_batch, num_workers=data.workers, device=device,
                        progress=data.progress)
    return FeatureDataset(cache, train=train, seed=seed, positions=positions)


def _maybe_cached(model, model_info, data: DataOptions, entries, root, device):
    """An evaluation dataset: from the feature cache with ``--cache-dir``, else decoded videos."""
    if data.cache_dir:
        return _cached(model, model_info, data, entries, root, device, train=False)
    return _eval_dataset(model, data, entries, root)


# --------------------------------------------------------------------------- commands
def run_cache(args: argparse.Namespace) -> int:
    if args.list_caches or args.prune:
        if not args.cache_dir:
            raise UsageError("--list-caches and --prune need --cache-dir")
        if args.prune:
            print(json.dumps({"pruned": prune_caches(args.cache_dir, args.older_than, dry_run=args.dry_run),
                              "dry_run": args.dry_run}))
        else:
            print(json.dumps({"caches": list_caches(args.cache_dir)}))
        return 0
    if not args.list:
        raise UsageError("--list is needed: the videos to cache (or --list-caches/--prune to look after --cache-dir)")
    device = distributed.init_from_environment(args.device)
    data = DataOptions.from_args(args)
    if not data.cache_dir:
        raise UsageError("--cache-dir is needed: the folder the features are written to")
    model, model_info = _build_model(args, device)
    entries = read_list(args.list)
    dataset = _cached(model, model_info, data, entries, _root(args.root, args.list), device, train=False)
    cache = dataset.cache
    if distributed.rank() == 0:
        print(json.dumps({"cache": cache.folder, "videos": cache.meta["count"], "skipped": len(cache.failed),
                          "short": cache.meta["short"], "shape": list(cache.features.shape),
                          "dtype": cache.meta["dtype"], "encoded": cache.built["videos_encoded"],
                          "seconds": round(cache.meta["seconds"], 3)}))
    return 0


def run_train(args: argparse.Namespace) -> int:
    try:
        check_output_dir(args.output, resume=args.resume, overwrite=args.overwrite)  # before hours of caching
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    device = distributed.init_from_environment(args.device)
    data = DataOptions.from_args(args)
    class_names = _class_names(args.classes, None)
    model, model_info = _build_model(args, device)
    entries = read_list(args.train_list, num_classes=len(class_names))
    positions = list(range(len(entries)))
    if args.shots is not None:
        positions = few_shot_indices(entries, args.shots, seed=args.seed)
    root = _root(args.root, args.train_list)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, amp=args.amp, grad_clip=args.grad_clip, seed=args.seed,
                         log_every=args.log_every, checkpoint_every=args.checkpoint_every, num_workers=args.workers,
                         progress=data.progress)
    if data.cache_dir:
        train_set = _cached(model, model_info, data, entries, root, device, train=True, seed=args.seed,
                            positions=positions)
    else:
        transform = ClipTransform.for_clip(model.clip, train=True, flip=not args.no_flip)
        train_set = VideoDataset([entries[i] for i in positions], root, _sampling(model, data), transform,
                                 on_error=data.on_error, seed=args.seed)
    eval_set = None
    if args.val_list:
        val_entries = read_list(args.val_list, num_classes=len(class_names))
        eval_set = _maybe_cached(model, model_info, data, val_entries, _root(args.root, args.val_list), device)
    trainer = Trainer(model, class_names, train_set, config, eval_set=eval_set, device=device,
                      output_dir=args.output, model_info=model_info, overwrite=args.overwrite)
    if args.resume:
        trainer.resume(args.resume)
    try:
        history = trainer.fit()
    except KeyboardInterrupt:
        raise Interrupted(_resume_hint(trainer)) from None
    if distributed.rank() == 0:
        result = {"checkpoint": trainer.checkpoint_path(), "steps": trainer.step, "train_videos": len(train_set),
                  "skipped": len(trainer.broken.failed)}
        if history:
            result["eval"] = {k: history[-1][k] for k in ("top1", "top5", "mean_class_accuracy", "count", "skipped")}
        print(json.dumps(result))
    return 0


def _resume_hint(trainer: Trainer) -> str:
    """What an interrupted run kept, and how to continue it."""
    where = f"at step {trainer.step} of {trainer.total_steps}"
    path = trainer.checkpoint_path()
    if path is None or not os.path.isfile(path):
        return f"{where}; no checkpoint was written yet, so a new run starts from the beginning"
    try:
        saved = (load_checkpoint(path).train_state or {}).get("step", "?")
    except (OSError, ValueError):  # a damaged checkpoint: say where it is anyway
        saved = "?"
    return f"{where}; {path} holds step {saved}: continue with the same command and --resume {path}"


def run_eval(args: argparse.Namespace) -> int:
    device = distributed.init_from_environment(args.device)
    data = DataOptions.from_args(args)
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else None
    class_names = _class_names(args.classes, checkpoint)
    model, model_info = _build_model(args, device, checkpoint)
    results = []
    for list_path in args.list:
        entries = read_list(list_path, num_classes=len(class_names))
        dataset = _maybe_cached(model, model_info, data, entries, _root(args.root, list_path), device)
        metrics, _, _ = evaluate(model, dataset, class_names, batch_size=data.local_batch, device=device,
                                 num_workers=data.workers, progress=data.progress)
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
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else None
    class_names = _class_names(args.classes, checkpoint)
    model, _ = _build_model(args, device, checkpoint)
    path = os.path.abspath(args.video)
    data = DataOptions(clips=args.clips, crops=args.crops, on_error="raise")
    item = _eval_dataset(model, data, [VideoEntry(path, 0)], os.path.dirname(path))[0]  # VideoDecodeError: exit 2
    if item["short"]:
        logger.warning("%s has %d frame(s), fewer than the %d of a clip: frames are repeated, so the motion the head "
                       "sees is not the video's", args.video, len(open_video(path)), model.config.num_frames)
    with torch.no_grad():
        model.eval()
        video = item["video"].to(device)
        logits = model.forward_features(model.encode_frames(video), model.encode_classes(class_names)).mean(dim=0)
    probabilities = logits.float().softmax(dim=-1)
    if not torch.isfinite(probabilities).all():
        raise NonFiniteError(f"the model gave non-finite scores for {args.video}")
    top = probabilities.topk(min(5, len(class_names)))
    for probability, index in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{probability:.4f}  {class_names[index]}")
    return 0
