"""``create_model_and_transforms``: open_clip's factory, for videos.

Model names are open_clip's (``open_clip.list_models()``), plus the configs shipped in
``mpfast/model_configs/`` (``mpfast-tiny``, a random-weight model small enough for tests
and the CPU walk-through), registered with open_clip the first time they are asked for.
:func:`add_model_config` registers any other open_clip config, from a file or a dict
(as a checkpoint stores it).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from ..data.transforms import VideoTransform, preprocess_config
from .config import HeadConfig
from .motion_clip import MotionCLIP

logger = logging.getLogger("mpfast.model")

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
PRECISIONS = ("fp32", "bf16", "fp16")  # open_clip precisions of the frozen CLIP: weights cast to that dtype
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"  # installed package data
_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # open_clip ignores a config without them
_config_dir: str | None = None  # this process's folder of configs registered from dicts


def shipped_model_names() -> list[str]:
    """Names of the open_clip configs that ship with mpfast (``mpfast-tiny``)."""
    return sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.json"))


def _check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict) or not all(key in config for key in _REQUIRED_CONFIG_KEYS):
        raise ValueError(f"{where} is not an open_clip model config: it needs the keys {list(_REQUIRED_CONFIG_KEYS)}")


def add_model_config(config: str | os.PathLike | dict, name: str | None = None) -> str:
    """Registers an open_clip model config; returns the model name it is known by.

    Args:
        config: a JSON file (its name without ``.json`` is the model name) or a config
            dict (as :func:`open_clip.get_model_config` returns it; needs ``name``).
        name: the model name of a dict config.

    A name already registered with the same config is left alone; with another config,
    the new one replaces it in this process.
    """
    if isinstance(config, dict):
        if not name:
            raise ValueError("a config given as a dict needs a model name")
        _check_config(config, f"the config of {name!r}")
        if open_clip.get_model_config(name) == config:
            return name
        global _config_dir
        if _config_dir is None:
            _config_dir = tempfile.mkdtemp(prefix="mpfast-model-configs-")
            atexit.register(shutil.rmtree, _config_dir, True)
        folder = Path(tempfile.mkdtemp(dir=_config_dir))  # one folder per registration: later ones win
        path = folder / f"{name}.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        open_clip.add_model_config(path)
        return name
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"model config {os.fspath(path)!r} does not exist")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise ValueError(f"model config {os.fspath(path)!r} is not valid JSON ({exc})") from None
    _check_config(loaded, f"model config {os.fspath(path)!r}")
    if name is not None and name != path.stem:
        raise ValueError(f"model config {os.fspath(path)!r} registers {path.stem!r}, not {name!r}")
    if open_clip.get_model_config(path.stem) != loaded:
        open_clip.add_model_config(path)
    return path.stem


def known_model(model_name: str) -> bool:
    """Whether open_clip can build ``model_name`` (mpfast's shipped configs are registered on demand)."""
    if model_name.startswith(("hf-hub:", "local-dir:")) or model_name in open_clip.list_models():
        return True
    if model_name in shipped_model_names():
        add_model_config(SHIPPED_CONFIGS / f"{model_name}.json")
        return True
    return False


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

    ``precision`` is one of :data:`PRECISIONS`; with ``bf16``/``fp16`` the weights are cast
    (open_clip keeps its LayerNorms in float32) and :meth:`MotionCLIP.encode_frames` casts
    the frames to match. Image size, mean and std: :func:`mpfast.data.preprocess_config`.
    """
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name must be an open_clip model name, got {model_name!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not known_model(model_name):
        raise ValueError(f"unknown model_name {model_name!r}; open_clip.list_models() lists the known ones, "
                         f"mpfast ships {shipped_model_names()}; register others with --model-config FILE "
                         f"(mpfast.model.add_model_config)")
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
    return clip


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
        precision: precision of the frozen CLIP, one of :data:`PRECISIONS` (``"fp32"``,
            ``"bf16"``, ``"fp16"``); the head stays float32.
        cache_dir: where open_clip caches downloads.
        **head_options: fields of :class:`mpfast.model.HeadConfig` (``strides``,
            ``num_prompts``, ``num_heads``, ``templates``, ...).

    Returns:
        ``(model, train_transform, eval_transform, tokenizer)``.
    """
    config = HeadConfig.from_options(num_frames=num_frames, **head_options)
    clip = create_clip(model_name, pretrained, device, precision, cache_dir)
    image_size, mean, std = preprocess_config(clip)
    tokenizer = open_clip.get_tokenizer(model_name)
    model = MotionCLIP(clip, config, tokenizer)
    if device is not None:
        model.to(device)
    logger.info("created MotionCLIP on %s (pretrained=%s, %d frames)", model_name, pretrained, num_frames)
    return model, VideoTransform(image_size, mean, std, train=True), VideoTransform(image_size, mean, std), tokenizer
