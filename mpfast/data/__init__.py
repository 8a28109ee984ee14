"""Video input: decoding, frame sampling, transforms, annotation files, datasets, protocols."""

from .dataset import BrokenVideoLog, VideoDataset, collate_videos
from .lists import (
    AnnotationError,
    VideoEntry,
    check_class_names,
    parse_class_names,
    read_class_names,
    read_hmdb51_split,
    read_kinetics_csv,
    read_list,
    read_ucf101_split,
    write_class_names,
    write_list,
)
from .protocols import (
    FEW_SHOT_K,
    average_views,
    classification_metrics,
    few_shot_indices,
    few_shot_subset,
    mean_std,
)
from .transforms import ClipTransform, VideoTransform, preprocess_config
from .video import SamplingConfig, VideoDecodeError, dense_indices, load_clips, segment_indices

__all__ = [
    "FEW_SHOT_K",
    "AnnotationError",
    "BrokenVideoLog",
    "ClipTransform",
    "SamplingConfig",
    "VideoDataset",
    "VideoDecodeError",
    "VideoEntry",
    "VideoTransform",
    "average_views",
    "check_class_names",
    "classification_metrics",
    "collate_videos",
    "dense_indices",
    "few_shot_indices",
    "few_shot_subset",
    "load_clips",
    "mean_std",
    "parse_class_names",
    "preprocess_config",
    "read_class_names",
    "read_hmdb51_split",
    "read_kinetics_csv",
    "read_list",
    "read_ucf101_split",
    "segment_indices",
    "write_class_names",
    "write_list",
]
