"""``create_model_and_transforms``: open_clip's factory, for videos."""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from typing import Callable

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ..transforms import VideoTransform
from .config import HeadConfig
from .motion_clip import MotionCLIP

logger = logging.getLogger("mpfast.model")

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _offline_message(model_name: str, pretrained: str, cause: str) -> str:
    return (
        f"could not download the pretrained weights {pretrained!r} of {model_name} ({cause}). "
        f"If this machine is offline, download the checkpoint elsewhere and pass its path: "
        f"create_model_and_transforms({model_name!r}, pretrained='/path/to/open_clip_model.safetensors'), "
        f"or --pretrained /path/to/open_clip_model.safetensors on the mpfast command line "
        f"(or set HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache)"
    )


def _hub_unreachable() -> str | None:
    """Why the model hub cannot be reached, if its host name does not even resolve."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None  # open_clip then reads the local cache only and fails fast by itself
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    return None


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(value)


def create_clip(model_name: str, pretrained: str | None = None, device: str | torch.device | None = None,
                precision: str = "fp32", cache_dir: str | None = None):
    """Creates the open_clip model (random weights when ``pretrained`` is None).

    Returns:
        ``(clip, image_size, mean, std)``.
    """
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name must be an open_clip model name, got {model_name!r}")
    if not model_name.startswith("hf-hub:") and model_name not in open_clip.list_models():
        raise ValueError(f"unknown model_name {model_name!r}; open_clip.list_models() lists the known ones")
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained must be an open_clip tag or a checkpoint path, got {type(pretrained).__name__}")
        pretrained = os.fspath(pretrained)
        if _looks_like_path(pretrained) and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} does not exist")
        if not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise ValueError(f"pretrained {pretrained!r} is neither a file nor a tag of {model_name}; tags: {tags}")
            # Without this check the hub client retries for about a minute before failing.
            reason = _hub_unreachable()
            if reason:
                raise RuntimeError(_offline_message(model_name, pretrained, reason))
    try:
        clip = open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device=device,
                                      cache_dir=cache_dir)
    except Exception as exc:  # open_clip/huggingface_hub raise many types when offline
        if pretrained is None or os.path.isfile(pretrained):
            raise
        raise RuntimeError(_offline_message(model_name, pretrained, f"{type(exc).__name__}: {exc}")) from exc
    visual = clip.visual
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return clip, int(size), tuple(mean), tuple(std)


def create_model_and_transforms(
    model_name: str,
    pretrained: str | None = None,
    num_frames: int = 8,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cache_dir: str | None = None,
    **head_options,
) -> tuple[MotionCLIP, VideoTransform, VideoTransform, Callable]:
    """Creates a MotionCLIP on an open_clip model, with its video transforms and tokenizer.

    Args:
        model_name: open_clip model name (``"ViT-B-16"``, ``"ViT-B-32"``, ...; see
            ``open_clip.list_models()``) or an ``hf-hub:`` id.
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``;
            downloaded) or the path of a local checkpoint file; ``None``: random weights.
        num_frames: frames per video the head is sized for.
        device: where to put the model.
        precision: open_clip precision of the frozen CLIP (``"fp32"``, ``"bf16"``, ...);
            the head stays float32.
        cache_dir: where open_clip caches downloads.
        **head_options: fields of :class:`mpfast.model.HeadConfig` (``strides``,
            ``num_prompts``, ``num_heads``, ``templates``, ...).

    Returns:
        ``(model, train_transform, eval_transform, tokenizer)``.
    """
    config = HeadConfig.from_options(num_frames=num_frames, **head_options)
    clip, image_size, mean, std = create_clip(model_name, pretrained, device, precision, cache_dir)
    tokenizer = open_clip.get_tokenizer(model_name)
    model = MotionCLIP(clip, config, tokenizer)
    if device is not None:
        model.to(device)
    logger.info("created MotionCLIP on %s (pretrained=%s, %d frames)", model_name, pretrained, num_frames)
    return model, VideoTransform(image_size, mean, std, train=True), VideoTransform(image_size, mean, std), tokenizer
