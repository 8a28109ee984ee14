"""Video transforms matching the open_clip preprocessing of a model.

A transform takes one video, ``uint8 [T, H, W, 3]`` (as decoders return it) or
``[T, 3, H, W]`` (uint8 or float in [0, 1]), and returns ``float32 [T, 3, S, S]``
normalised with the model's mean and std. Random choices (crop, flip) are drawn once
per video, so every frame gets the same crop.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoTransform:
    """Resize the short side, crop (random for training, centre for evaluation), flip, normalise.

    Args:
        image_size: side S of the square output frames.
        mean: per-channel mean. std: per-channel std.
        train: random resized crop and horizontal flip when True; centre crop when False.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD, train: bool = False):
        self.image_size, self.train = image_size, train
        bicubic = v2.InterpolationMode.BICUBIC  # as open_clip's preprocessing
        if train:
            spatial = [v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic, antialias=True),
                       v2.RandomHorizontalFlip()]
        else:
            spatial = [v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]
        self.transform = v2.Compose([*spatial, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, video: Tensor) -> Tensor:
        if not isinstance(video, Tensor) or video.dim() != 4:
            raise ValueError(f"video must be a tensor [T,H,W,3] or [T,3,H,W], got {getattr(video, 'shape', type(video))}")
        if video.shape[1] != 3 and video.shape[-1] == 3:
            video = video.permute(0, 3, 1, 2)
        if video.shape[1] != 3:
            raise ValueError(f"video must have 3 colour channels, got shape {tuple(video.shape)}")
        return self.transform(video)

    def __repr__(self) -> str:
        return f"VideoTransform(image_size={self.image_size}, train={self.train})"
