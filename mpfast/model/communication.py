"""Multimodal Communication Block: text and video attend to each other before matching.

The math, which a fused kernel of this block must reproduce (``LN``: LayerNorm with
affine parameters; ``Attn``: multi-head attention, ``H`` heads of width ``D / H``, scale
``(D / H) ** -0.5``, computed by the ``prompt_attention`` op; ``t_c`` the class
embeddings ``[C, D]``, ``v_b`` the unit video embeddings ``[B, D]``, ``u_b`` the mixed
frames ``[B, T, D]``, ``P_b`` the motion-aware prompts ``[B, K, D]``):

1. Class side, once per call ``[C, D]``. Class-contrast features
   ``c_c = (t_c - mean_c t) / rms(t - mean_c t)`` (one RMS over all classes and
   channels; zero for a single class) and the adapted class embeddings
   ``t~_c = t_c + beta * W_a c_c``.
2. Text <- video ``[B, C, D]``: ``t'_{b,c} = t~_c + alpha_t * W_o Attn(q = W_q LN_t(t_c),
   k, v = W_kv LN_v([P_b; u_b]))`` (keys: the K prompts, then the T frames).
3. Video <- text ``[B, D]``: ``v'_b = v_b + alpha_v * W_o' Attn(q = W_q' LN_v(v_b),
   k, v = W_kv' LN_t(t_c))``.
4. Logits (in :class:`mpfast.model.MotionCLIP`): ``s * <normalize(v'_b), normalize(t'_{b,c})>``
   with CLIP's logit scale ``s`` (plus CLIP's logit bias where the model has one).

``beta``, ``alpha_t`` and ``alpha_v`` are per-channel and zero-initialised: the untrained
block returns its inputs unchanged, so an untrained MotionCLIP is CLIP zero-shot. The
class-contrast adapter is there because the cosine against raw class embeddings cannot
separate classes whose text embeddings are nearly parallel (names that differ in one
word: "moving left" and "moving right"): the adapter maps what distinguishes the classes
of the current list, at unit scale, into the embedding space. It is class-generic (no
weight per class), so a model trained on one class list scores any other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..ops import ClassFold, class_logits_folded, fold_classes, prompt_attention
from .motion import rms


class ClassSide(NamedTuple):
    """What the block computes from the class embeddings alone (cacheable per class list)."""

    base: Tensor  # [C, D] residual base of the text side
    query: Tensor  # [C, H, d] queries of the text <- video attention
    key: Tensor  # [C, H, d] keys of the video <- text attention
    value: Tensor  # [C, H, d] its values
    fold: ClassFold | None  # the text <- video side folded for the class_logits op (None: unfused path)


def class_contrast(text: Tensor) -> Tensor:
    """``[C, D]`` class embeddings centred over the classes, divided by one RMS (zeros for C = 1)."""
    centred = text - text.mean(dim=0, keepdim=True)
    return centred / rms(centred, (0, 1)).clamp_min(torch.finfo(text.dtype).tiny)


class MultimodalCommunicationBlock(nn.Module):
    """The class-contrast adapter and two cross-attentions, all with zero-initialised residual scales.

    See the module docstring for the math.

    Args:
        dim: embedding width D.
        num_heads: attention heads H; must divide D.
    """

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads must divide the embedding width {dim}, got {num_heads}")
        self.num_heads = num_heads
        self.adapter = nn.Linear(dim, dim, bias=False)
        self.adapter_scale = nn.Parameter(torch.zeros(dim))
        self.text_norm = nn.LayerNorm(dim)
        self.video_norm = nn.LayerNorm(dim)
        self.text_query = nn.Linear(dim, dim)
        self.video_key_value = nn.Linear(dim, 2 * dim)
        self.text_out = nn.Linear(dim, dim)
        self.video_query = nn.Linear(dim, dim)
        self.text_key_value = nn.Linear(dim, 2 * dim)
        self.video_out = nn.Linear(dim, dim)
        self.text_scale = nn.Parameter(torch.zeros(dim))
        self.video_scale = nn.Parameter(torch.zeros(dim))

    def adapt_classes(self, text: Tensor) -> Tensor:
        """Step 1: ``t~ [C, D]`` from the class embeddings ``t [C, D]``."""
        return text + self.adapter_scale * self.adapter(class_contrast(text))

    def forward(self, text: Tensor, video: Tensor, frames: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Exchanges information between the modalities (the unfused path: the reference
        of :meth:`logits`).

        Args:
            text: ``[C, D]`` class embeddings (shared by the batch).
            video: ``[B, D]`` video embeddings.
            frames: ``[B, T, D]`` mixed frame embeddings.
            prompts: ``[B, K, D]`` motion-aware prompts (K may be 0).

        Returns:
            ``text' [B, C, D]`` and ``video' [B, D]``.
        """
        num_classes, dim = text.shape
        batch = video.shape[0]
        side = self.class_side(text, fused=False)

        # text <- video: class queries (shared, not copied) over prompts and frames.
        key, value = self.video_keys_values(frames, prompts)
        attended = prompt_attention(side.query, key, value).reshape(batch, num_classes, dim)
        text_out = side.base + self.text_scale * self.text_out(attended)
        return text_out, self.video_side(side, video)

    def class_side(self, text: Tensor, fused: bool = True) -> ClassSide:
        """The work that depends only on the class embeddings ``text [C, D]`` and the weights.

        With ``fused``, also the class side of the ``class_logits`` op (:meth:`logits`).
        """
        num_classes, dim = text.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        text_normed = self.text_norm(text)
        query = self.text_query(text_normed).view(num_classes, heads, head_dim)
        key, value = self.text_key_value(text_normed).view(num_classes, 2, heads, head_dim).unbind(1)
        base = self.adapt_classes(text)
        fold = fold_classes(query, base, self.text_out.weight, self.text_out.bias, self.text_scale) if fused else None
        return ClassSide(base, query, key, value, fold)

    def video_keys_values(self, frames: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, L, H, d]`` of the text <- video attention: the prompts, then the frames."""
        batch, dim = frames.shape[0], frames.shape[-1]
        tokens = self.video_norm(torch.cat([prompts, frames], dim=1))
        key, value = self.video_key_value(tokens).view(batch, -1, 2, self.num_heads, dim // self.num_heads).unbind(2)
        return key, value

    def video_side(self, side: ClassSide, video: Tensor) -> Tensor:
        """video <- text: one query per video over the classes. Returns ``v' [B, D]``.

        Every video attends over the same class keys, so the batch is one attention of
        ``B`` queries over ``C`` keys: no ``[B, C, H, d]`` expansion, whose gradient
        would be one.
        """
        batch, dim = video.shape
        _, heads, head_dim = side.key.shape
        query = self.video_query(self.video_norm(video)).view(1, batch, heads, head_dim)
        attended = prompt_attention(query, side.key[None], side.value[None]).reshape(batch, dim)
        return video + self.video_scale * self.video_out(attended)

    def logits(self, side: ClassSide, video: Tensor, frames: Tensor, prompts: Tensor,
               logit_scale: Tensor | float = 1.0, logit_bias: Tensor | float | None = None) -> Tensor:
        """Logits ``[B, C]``: ``logit_scale * <normalize(v'), normalize(t')> + logit_bias`` from
        the outputs of :meth:`forward`, computed by the ``class_logits`` op without ``[B, C, D]``
        tensors.

        Args:
            side: :meth:`class_side` of the class embeddings (``fused=True``).
            video, frames, prompts: as :meth:`forward`.
        """
        if side.fold is None:
            raise ValueError("logits needs class_side(text, fused=True)")
        key, value = self.video_keys_values(frames, prompts)
        return class_logits_folded(side.fold, key, value, self.text_out.weight, self.text_scale,
                                   self.video_side(side, video), logit_scale=logit_scale, logit_bias=logit_bias)
