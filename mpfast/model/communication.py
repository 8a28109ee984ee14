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

import torch
from torch import Tensor, nn

from ..ops import prompt_attention


def class_contrast(text: Tensor) -> Tensor:
    """``[C, D]`` class embeddings centred over the classes, divided by one RMS (zeros for C = 1)."""
    centred = text - text.mean(dim=0, keepdim=True)
    rms = centred.pow(2).mean().sqrt()
    return centred / rms.clamp_min(torch.finfo(text.dtype).tiny)


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
        """Exchanges information between the modalities.

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
        heads, head_dim = self.num_heads, dim // self.num_heads
        text_normed = self.text_norm(text)

        # text <- video: class queries (shared, not copied) over prompts and frames.
        query = self.text_query(text_normed).view(num_classes, heads, head_dim)
        tokens = self.video_norm(torch.cat([prompts, frames], dim=1))
        key, value = self.video_key_value(tokens).view(batch, -1, 2, heads, head_dim).unbind(2)
        attended = prompt_attention(query, key, value).reshape(batch, num_classes, dim)
        text_out = self.adapt_classes(text) + self.text_scale * self.text_out(attended)

        # video <- text: one query per video over the classes (keys broadcast, not copied).
        query = self.video_query(self.video_norm(video)).view(batch, 1, heads, head_dim)
        key, value = self.text_key_value(text_normed).view(num_classes, 2, heads, head_dim).unbind(1)
        shape = (batch, num_classes, heads, head_dim)
        attended = prompt_attention(query, key.expand(shape), value.expand(shape)).reshape(batch, dim)
        video_out = video + self.video_scale * self.video_out(attended)
        return text_out, video_out
