"""MotionCLIP: a frozen open_clip CLIP with the motion-prompt head."""

from __future__ import annotations

import collections
import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .communication import ClassSide, MultimodalCommunicationBlock
from .config import HeadConfig
from .motion import MotionModelingBlock
from .prompts import MotionAwarePrompts

logger = logging.getLogger("mpfast.model")

_CLASS_CACHE_SIZE = 8


def embedding_dim(clip: nn.Module) -> int:
    """Width D of the joint image/text embedding of an open_clip model."""
    visual = getattr(clip, "visual", None)
    width = getattr(visual, "output_dim", None)
    if isinstance(width, int):
        return width
    projection = getattr(clip, "text_projection", None)
    if isinstance(projection, nn.Linear):
        return projection.out_features
    if isinstance(projection, Tensor):
        return projection.shape[1]
    raise ValueError("cannot tell the embedding width of this CLIP model: no visual.output_dim or text_projection")


class MotionCLIP(nn.Module):
    """Video classifier: frozen CLIP encoders plus a small trainable motion-prompt head.

    Args:
        clip: an open_clip model with ``encode_image`` and ``encode_text`` (frozen here).
        config: head options; default :class:`HeadConfig`.
        tokenizer: callable turning a list of strings into token ids for
            ``clip.encode_text``; needed by :meth:`encode_classes`.

    With the zero-initialised gates and residual scales, an untrained MotionCLIP gives
    exactly the logits of CLIP zero-shot on mean-pooled frame embeddings.

    The logits come from the fused ``class_logits`` op (:meth:`MultimodalCommunicationBlock.logits`),
    which never forms the ``[B, C, D]`` text features; the block's unfused ``forward`` is
    its reference. :attr:`fused_logits` chooses: ``None`` (the default) uses the op
    while ``H * L < D`` (heads times keys, ``L = K + T``: where it does fewer
    multiply-adds than the unfused projection), ``True``/``False`` always/never.

    Without gradients (``torch.no_grad()``, ``torch.inference_mode()``) the class side of
    the head (``text_norm``, queries, text keys and values, the op's class fold) is cached
    per class-embedding tensor, so a batch of one video pays only its own work. An entry
    is used only while the class embeddings hold the same values and every parameter of
    the communication block is the same tensor at the same version: an optimizer step,
    ``load_state_dict`` or any other in-place change makes it stale, and ``.to()``,
    ``.half()`` and the like clear the cache.
    """

    fused_logits: bool | None = None
    cache_class_side: bool = True  # False: compute the class side on every call (FLOP counting does)

    def __init__(self, clip: nn.Module, config: HeadConfig | None = None, tokenizer: Callable | None = None):
        super().__init__()
        for method in ("encode_image", "encode_text"):
            if not callable(getattr(clip, method, None)):
                raise TypeError(f"clip must have an {method} method (an open_clip CLIP model), got {type(clip).__name__}")
        self.config = config = config or HeadConfig()
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        dim = embedding_dim(clip)
        self.motion = MotionModelingBlock(dim, config.num_frames, config.strides, config.motion_ratio,
                                          config.motion_floor)
        self.prompts = MotionAwarePrompts(dim, config.num_prompts, config.prompt_hidden) if config.num_prompts else None
        self.communication = MultimodalCommunicationBlock(dim, config.num_heads)
        self._class_cache: collections.OrderedDict = collections.OrderedDict()
        self._class_side_cache: collections.OrderedDict = collections.OrderedDict()
        self._class_side_weights: tuple = ((), [])  # the weights the cached class sides were made with

    @property
    def dim(self) -> int:
        return self.motion.position.shape[1]

    def train(self, mode: bool = True) -> "MotionCLIP":
        """Sets the head's mode; the frozen CLIP always stays in eval mode.

        Only the head's modules are visited (the trainer calls this every step; walking
        the CLIP's hundreds of modules each time cost as much as the head's forward).
        """
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {mode!r}")
        self.training = mode
        for child in self.children():
            if child is not self.clip:
                child.train(mode)
        if self.clip.training:
            self.clip.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda()...: cached class sides hold tensors of the old device and dtype.
        self._class_side_cache.clear()
        self._class_side_weights = ((), [])
        return super()._apply(fn, *args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The head's parameters (the CLIP encoders are frozen)."""
        return [p for name, p in self.named_parameters() if not name.startswith("clip.") and p.requires_grad]

    def _head_dtype(self) -> torch.dtype:
        return self.motion.gate.dtype

    def encode_frames(self, video: Tensor) -> Tensor:
        """Frozen CLIP frame embeddings: ``video [B, T, 3, H, W] -> [B, T, D]`` (no gradients)."""
        if not isinstance(video, Tensor):
            raise TypeError(f"video must be a torch.Tensor [B,T,3,H,W], got {type(video).__name__}")
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must have shape [B,T,3,H,W], got {tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"video must be a float tensor (transformed frames), got {video.dtype}")
        batch, frames = video.shape[:2]
        # A CLIP created with precision bf16/fp16 has its convolutions and linear layers in that dtype
        # (open_clip keeps embeddings and norms in float32): cast the frames to match the first layer.
        layers = (m for m in self.clip.visual.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        dtype = next((m.weight.dtype for m in layers), video.dtype)
        with torch.no_grad():
            features = self.clip.encode_image(video.flatten(0, 1).to(dtype))
        return features.view(batch, frames, -1).to(self._head_dtype())

    def encode_video(self, video: Tensor) -> Tensor:
        """Motion-aware video embedding ``[B, D]`` (unit norm), before the communication block."""
        _, v, _ = self.motion(self.encode_frames(video))
        return v

    def encode_classes(self, class_names: Sequence[str]) -> Tensor:
        """Class embeddings ``[C, D]`` from the prompt templates, cached per class list.

        Each class embedding is the mean of the unit-norm text embeddings of its
        templates. The frozen text encoder runs once per class list, device and dtype.
        If the text side has been made trainable (some text-encoder parameter requires
        grad) and the model is training, the embeddings are recomputed with gradients.
        """
        if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names:
            raise ValueError(f"class_names must be a non-empty list of strings, got {class_names!r}")
        if not all(isinstance(name, str) and name for name in class_names):
            raise TypeError("class_names must contain non-empty strings")
        if self.tokenizer is None:
            raise RuntimeError("encode_classes needs a tokenizer: pass tokenizer= to MotionCLIP (open_clip.get_tokenizer)")
        if self.training and self._text_trainable():
            return self._encode_classes(class_names)
        key = (tuple(class_names), self.config.templates, self.motion.gate.device, self._head_dtype())
        cached = self._class_cache.get(key)
        if cached is not None:
            self._class_cache.move_to_end(key)
            return cached
        with torch.no_grad():
            features = self._encode_classes(class_names)
        self._class_cache[key] = features
        if len(self._class_cache) > _CLASS_CACHE_SIZE:
            self._class_cache.popitem(last=False)
        return features

    def _text_trainable(self) -> bool:
        return any(p.requires_grad for name, p in self.clip.named_parameters()
                   if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"))

    def _encode_classes(self, class_names: Sequence[str]) -> Tensor:
        total = None
        for template in self.config.templates:
            tokens = self.tokenizer([template.format(name) for name in class_names]).to(self.motion.gate.device)
            embedded = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            total = embedded if total is None else total + embedded
        return (total / len(self.config.templates)).to(self._head_dtype())

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()

    def forward_features(self, frames: Tensor, class_features: Tensor) -> Tensor:
        """Logits ``[B, C]`` from frame embeddings ``[B, T, D]`` and class embeddings ``[C, D]``.

        Use this with precomputed (cached) CLIP features; :meth:`forward` calls it.
        """
        if frames.dim() != 3 or frames.shape[-1] != self.dim:
            raise ValueError(f"frames must have shape [B,T,D] with D={self.dim}, got {tuple(frames.shape)}")
        if class_features.dim() != 2 or class_features.shape[-1] != self.dim:
            raise ValueError(f"class_features must have shape [C,D] with D={self.dim}, got {tuple(class_features.shape)}")
        u, v, mu = self.motion(frames)
        prompts = self.prompts(mu) if self.prompts is not None else u.new_zeros(u.shape[0], 0, u.shape[2])
        bias = getattr(self.clip, "logit_bias", None)
        if self._fused(prompts.shape[1] + u.shape[1]):
            return self.communication.logits(self.class_side(class_features), v, u, prompts, self.logit_scale(), bias)
        text, video = self.communication(class_features, v, u, prompts)
        logits = self.logit_scale() * torch.einsum("bd,bcd->bc", F.normalize(video, dim=-1), F.normalize(text, dim=-1))
        return logits if bias is None else logits + bias

    def _fused(self, keys: int) -> bool:
        if self.fused_logits is not None:
            return bool(self.fused_logits)
        return self.communication.num_heads * keys < self.dim

    def class_side(self, class_features: Tensor) -> ClassSide:
        """The communication block's class side of ``class_features [C, D]`` (fused), cached
        when no gradient is recorded (see the class docstring)."""
        if not self.cache_class_side or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.communication.class_side(class_features)
        params = list(self.communication.parameters())
        if any(p.is_inference() for p in params):  # no version counter to tell a change by
            return self.communication.class_side(class_features)
        weights = tuple((p.data_ptr(), p._version) for p in params)
        if weights != self._class_side_weights[0]:  # other weights: every entry is stale
            self._class_side_cache.clear()
            # Kept alive with the cache, so that no other tensor takes their addresses meanwhile.
            self._class_side_weights = (weights, [p.detach() for p in params])
        key = (class_features.data_ptr(), class_features.device, class_features.dtype, tuple(class_features.shape))
        entry = self._class_side_cache.get(key)
        if entry is not None and torch.equal(entry[0], class_features):
            self._class_side_cache.move_to_end(key)
            return entry[1]
        side = self.communication.class_side(class_features)
        self._class_side_cache[key] = (class_features.clone(), side)
        if len(self._class_side_cache) > _CLASS_CACHE_SIZE:
            self._class_side_cache.popitem(last=False)
        return side

    def forward(self, video: Tensor, class_names: Sequence[str]) -> Tensor:
        """Classifies videos: ``video [B, T, 3, H, W]``, ``C`` class names -> logits ``[B, C]``."""
        return self.forward_features(self.encode_frames(video), self.encode_classes(class_names))
