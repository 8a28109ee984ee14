"""Training engine: feature cache, trainer, checkpoints, distributed helpers, CLI commands."""

from .cache import CacheError, FeatureCache, FeatureDataset, build_cache, list_caches, prune_caches
from .checkpoint import NonFiniteError, load_checkpoint, load_head, save_checkpoint
from .trainer import TrainConfig, Trainer, check_output_dir, evaluate

__all__ = ["CacheError", "FeatureCache", "FeatureDataset", "NonFiniteError", "TrainConfig", "Trainer", "build_cache",
           "check_output_dir", "evaluate", "list_caches", "load_checkpoint", "load_head", "prune_caches",
           "save_checkpoint"]
