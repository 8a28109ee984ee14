"""Checkpoints of the trainable head, in safetensors, written atomically.

A checkpoint holds the head's tensors (``model.*``: everything outside the frozen CLIP)
and its config as JSON metadata; a training checkpoint adds the optimiser state
(``optimizer.*``), the RNG states (``rng.*``) and, as JSON, the scheduler, the step and
the optimiser's hyper-parameters. Loading reads tensors and JSON only: nothing is
unpickled. Files are written to a temporary name in the same folder, flushed, and
renamed over the target, so a crash never leaves a half-written checkpoint. A head or
optimiser state with non-finite values (a diverged run) is neither written nor loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..model import HeadConfig, MotionCLIP
from .files import set_default_mode

FORMAT = "mpfast-checkpoint-1"


class NonFiniteError(FloatingPointError):
    """A non-finite (inf or NaN) loss, gradient, logit or checkpoint tensor."""


def non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold an inf or NaN."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _describe_names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def head_state_dict(model: MotionCLIP) -> dict[str, torch.Tensor]:
    """The head's tensors (parameters and buffers outside ``clip.``)."""
    return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("clip.")}


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Saves a safetensors file through a temporary file and an atomic rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(handle)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary, metadata=metadata)
        set_default_mode(temporary)  # mkstemp and save_file make 0600 files
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def _config_json(config: HeadConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def save_checkpoint(path: str | os.PathLike, model: MotionCLIP, *, model_info: dict[str, Any] | None = None,
                    class_names: list[str] | None = None, train_state: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Writes a checkpoint.

    Args:
        path: target file (``.safetensors``).
        model: the MotionCLIP whose head is saved.
        model_info: JSON-able description of the CLIP (``{"model": name, "pretrained": ...}``).
        class_names: the training classes (for ``mpfast classify``/``eval`` defaults).
        train_state: JSON-able training state (step, scheduler, ...); with ``optimizer``
            it makes a resumable checkpoint, and the RNG states are added.
        optimizer: the optimiser whose state is saved (tensors by parameter position).
    """
    tensors = {f"model.{name}": tensor for name, tensor in head_state_dict(model).items()}
    metadata = {"format": FORMAT, "head_config": _config_json(model.config),
                "model_info": json.dumps(model_info or {}), "class_names": json.dumps(class_names or [])}
    if train_state is not None:
        state = dict(train_state)
        if optimizer is not None:
            optim_state = optimizer.state_dict()
            for index, values in optim_state["state"].items():
                for key, value in values.items():
                    if not isinstance(value, torch.Tensor):
                        raise TypeError(f"optimizer state {key!r} of parameter {index} is not a tensor ({type(value).__name__})")
                    tensors[f"optimizer.{index}.{key}"] = value
            state["optimizer_param_groups"] = optim_state["param_groups"]
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_initialized():
            for device, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{device}"] = rng
        numpy_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
        state["rng_numpy"] = [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]
        python_state = random.getstate()
        state["rng_python"] = [python_state[0], list(python_state[1]), python_state[2]]
        metadata["train_state"] = json.dumps(state)
    bad = non_finite_names({k: v for k, v in tensors.items() if not k.startswith("rng.")})
    if bad:
        raise NonFiniteError(f"not writing checkpoint {os.fspath(path)!r}: {len(bad)} tensor(s) hold inf or NaN "
                             f"({_describe_names(bad)})")
    atomic_save(tensors, path, metadata)


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint (tensors on CPU)."""

    head_config: HeadConfig
    model_info: dict[str, Any]
    class_names: list[str]
    head: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]
    rng: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint written by :func:`save_checkpoint` (tensors and JSON only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises SafetensorError for foreign or damaged files
        raise ValueError(f"{path!r} is not a safetensors checkpoint ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an mpfast checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    bad = non_finite_names({k: v for k, v in tensors.items() if not k.startswith("rng.")})
    if bad:
        raise ValueError(f"checkpoint {path!r} holds inf or NaN in {len(bad)} tensor(s) ({_describe_names(bad)}): "
                         "it comes from a diverged run and cannot be used; take an earlier checkpoint or train again")
    config = HeadConfig.from_options(**json.loads(metadata["head_config"]))
    head, optimizer, rng = {}, {}, {}
    for name, tensor in tensors.items():
        group, _, rest = name.partition(".")
        if group == "model":
            head[rest] = tensor
        elif group == "optimizer":
            index, _, key = rest.partition(".")
            optimizer.setdefault(int(index), {})[key] = tensor
        elif group == "rng":
            rng[rest] = tensor
    train_state = json.loads(metadata["train_state"]) if "train_state" in metadata else None
    return Checkpoint(config, json.loads(metadata.get("model_info", "{}")), json.loads(metadata.get("class_names", "[]")),
                      head, optimizer, rng, train_state)


def load_head(model: MotionCLIP, checkpoint: Checkpoint) -> None:
    """Copies the head tensors into ``model`` (strict: every head tensor must match)."""
    expected = head_state_dict(model)
    missing = sorted(set(expected) - set(checkpoint.head))
    unexpected = sorted(set(checkpoint.head) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit this model: missing {missing}, unexpected {unexpected}")
    for name, tensor in checkpoint.head.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)} (different CLIP model or head config?)")
    model.load_state_dict({**model.state_dict(), **checkpoint.head})


def load_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Restores the optimiser state saved with the checkpoint."""
    if checkpoint.train_state is None or "optimizer_param_groups" not in checkpoint.train_state:
        raise ValueError("checkpoint has no optimizer state (not a training checkpoint)")
    groups = checkpoint.train_state["optimizer_param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": checkpoint.optimizer, "param_groups": groups})


def restore_rng(checkpoint: Checkpoint) -> None:
    """Restores the torch, CUDA, numpy and Python RNG states saved with the checkpoint."""
    state = checkpoint.train_state or {}
    if "torch" in checkpoint.rng:
        torch.set_rng_state(checkpoint.rng["torch"])
    cuda_states = [checkpoint.rng[f"cuda.{i}"] for i in range(len(checkpoint.rng)) if f"cuda.{i}" in checkpoint.rng]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    if "numpy" in checkpoint.rng and "rng_numpy" in state:
        kind, position, has_gauss, cached = state["rng_numpy"]
        np.random.set_state((kind, checkpoint.rng["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    if "rng_python" in state:
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))


def trainable_module_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in :meth:`MotionCLIP.trainable_parameters` order."""
    return [name for name, p in model.named_parameters() if not name.startswith("clip.") and p.requires_grad]
