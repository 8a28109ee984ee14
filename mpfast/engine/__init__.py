"""Training engine: feature cache, trainer, checkpoints, distributed helpers, CLI commands."""

from .cache import FeatureCache, FeatureDataset, build_cache
from .checkpoint import load_checkpoint, load_head, save_checkpoint
from .trainer import TrainConfig, Trainer, evaluate

__all__ = ["FeatureCache", "FeatureDataset", "TrainConfig", "Trainer", "build_cache", "evaluate", "load_checkpoint",
           "load_head", "save_checkpoint"]
