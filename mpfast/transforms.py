"""The single-clip video transform returned by :func:`mpfast.create_model_and_transforms`.

A transform takes one video, ``uint8 [T, H, W, 3]`` (as decoders return it) or
``[T, 3, H, W]`` (uint8, or float in [0, 1]), and returns ``float32 [T, 3, S, S]``
normalised with the model's mean and std, exactly as open_clip preprocesses an image
(bicubic short-side resize, centre crop). Random choices (crop, flip) are drawn once per
video, so every frame gets the same crop. The multi-view version used by the data
pipeline is :class:`mpfast.data.ClipTransform`; this is its one-view form.
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from .data.transforms import ClipTransform


class VideoTransform:
    """Resize the short side, crop (random for training, centre for evaluation), flip, normalise.

    Args:
        image_size: side S of the square output frames.
        mean: per-channel mean. std: per-channel std.
        train: random resized crop and horizontal flip when True; centre crop when False.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                 std: Sequence[float] = OPENAI_DATASET_STD, train: bool = False):
        self.clip = ClipTransform(image_size, tuple(mean), tuple(std), train=train)

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    @property
    def train(self) -> bool:
        return self.clip.train

    def __call__(self, video: Tensor) -> Tensor:
        if not isinstance(video, Tensor) or video.dim() != 4:
            raise ValueError(f"video must be a tensor [T,H,W,3] or [T,3,H,W], got {getattr(video, 'shape', type(video))}")
        if video.shape[-1] != 3 and video.shape[1] == 3:
            video = video.permute(0, 2, 3, 1)
        if video.shape[-1] != 3:
            raise ValueError(f"video must have 3 colour channels, got shape {tuple(video.shape)}")
        return self.clip(video)[0]

    def __repr__(self) -> str:
        return f"VideoTransform(image_size={self.image_size}, train={self.train})"
