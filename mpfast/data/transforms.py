"""Video transforms matching open_clip's preprocessing.

:class:`ClipTransform` is the data pipeline's multi-view transform: evaluation resizes
the short side to ``S`` and takes one centre crop or three ``S x S`` crops along the
long side (start, centre, end); resizing is bicubic, as in open_clip. Training takes one
random resized crop and, optionally, a horizontal flip (turn it off when left/right is
part of the label). :class:`VideoTransform` is its one-view form, returned by
:func:`mpfast.create_model_and_transforms`. :func:`preprocess_config` reads an open_clip
model's image size, mean and std: the one place they come from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

BICUBIC = v2.InterpolationMode.BICUBIC  # as open_clip's preprocessing


def preprocess_config(clip: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(S, mean, std)``: the square input side and normalisation of an open_clip model's image tower.

    Read from ``clip.visual`` (``image_size``, and ``image_mean``/``image_std`` that open_clip
    sets from the pretrained tag), with OpenAI's mean and std when the model has none.
    """
    visual = getattr(clip, "visual", None)
    size = getattr(visual, "image_size", None)
    if size is None:
        raise ValueError(f"cannot tell the input size of {type(clip).__name__}: "
                         "no visual.image_size (an open_clip model?)")
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std)


@dataclasses.dataclass(frozen=True)
class ClipTransform:
    """``[T, H, W, 3]`` frames (uint8, or float in [0, 1]) -> float32 ``[crops, T, 3, S, S]`` normalised.

    Args:
        image_size: S. mean, std: per-channel normalisation (the model's).
        train: one random resized crop (+ flip) when True; else ``crops`` fixed crops.
        crops: 1 (centre) or 3 (start/centre/end of the long side); evaluation only.
        flip: random horizontal flip when training.
        scale: area range of the random resized crop.
    """

    image_size: int
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN
    std: tuple[float, ...] = OPENAI_DATASET_STD
    train: bool = False
    crops: int = 1
    flip: bool = True
    scale: tuple[float, float] = (0.9, 1.0)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.crops not in (1, 3):
            raise ValueError(f"crops must be 1 or 3, got {self.crops!r}")
        if self.train and self.crops != 1:
            raise ValueError("crops must be 1 when train=True (one random crop per clip)")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))

    @classmethod
    def for_clip(cls, clip: nn.Module, *, train: bool = False, crops: int = 1, flip: bool = True) -> "ClipTransform":
        """The transform an open_clip model's frames need (see :func:`preprocess_config`)."""
        size, mean, std = preprocess_config(clip)
        return cls(size, mean, std, train=train, crops=1 if train else crops, flip=flip)

    @property
    def num_views(self) -> int:
        return 1 if self.train else self.crops

    def describe(self) -> dict:
        """Everything that changes the output, as plain JSON values (used in cache keys)."""
        return dataclasses.asdict(self)

    def __call__(self, frames: Tensor | Sequence) -> Tensor:
        if not isinstance(frames, Tensor):
            frames = torch.as_tensor(frames)
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be a tensor [T,H,W,3], got shape {tuple(frames.shape)}")
        if frames.dtype != torch.uint8 and not frames.is_floating_point():
            raise TypeError(f"frames must be uint8 (decoded video) or float in [0, 1], got {frames.dtype}")
        video = frames.permute(0, 3, 1, 2)  # [T,3,H,W], a view
        size = self.image_size
        if self.train:
            top, left, height, width = v2.RandomResizedCrop.get_params(video, scale=list(self.scale), ratio=[3 / 4, 4 / 3])
            views = [TF.resized_crop(video, top, left, height, width, [size, size], interpolation=BICUBIC,
                                     antialias=True)]
            if self.flip and torch.rand(()) < 0.5:
                views[0] = views[0].flip(-1)
        else:
            resized = TF.resize(video, size, interpolation=BICUBIC, antialias=True)
            height, width = resized.shape[-2:]
            if self.crops == 1:
                views = [TF.center_crop(resized, [size, size])]
            else:
                views = []
                for fraction in (0.0, 0.5, 1.0):
                    top = int(round((height - size) * fraction)) if height > width else (height - size) // 2
                    left = int(round((width - size) * fraction)) if width >= height else (width - size) // 2
                    views.append(TF.crop(resized, top, left, size, size))
        out = torch.stack(views).to(torch.float32)
        if frames.dtype == torch.uint8:
            out = out.div_(255.0)
        else:  # bicubic overshoot clipped, as uint8 (and PIL in open_clip) clip it
            out = out.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean).view(1, 1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 1, 3, 1, 1)
        return out.sub_(mean).div_(std)


class VideoTransform:
    """One video, one view: resize the short side, crop (random for training, centre for evaluation), flip, normalise.

    Takes ``uint8 [T, H, W, 3]`` (as decoders return it) or ``[T, 3, H, W]`` (uint8, or
    float in [0, 1]) and returns ``float32 [T, 3, S, S]``, exactly as open_clip
    preprocesses an image. Random choices (crop, flip) are drawn once per video, so every
    frame gets the same crop.

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
            got = getattr(video, "shape", type(video))
            raise ValueError(f"video must be a tensor [T,H,W,3] or [T,3,H,W], got {got}")
        if video.shape[-1] != 3 and video.shape[1] == 3:
            video = video.permute(0, 2, 3, 1)
        if video.shape[-1] != 3:
            raise ValueError(f"video must have 3 colour channels, got shape {tuple(video.shape)}")
        return self.clip(video)[0]

    def __repr__(self) -> str:
        return f"VideoTransform(image_size={self.image_size}, train={self.train})"
