"""Multimodal Communication Block: text and video attend to each other before matching."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import prompt_attention


class MultimodalCommunicationBlock(nn.Module):
    """Two cross-attentions with zero-initialised residual scales.

    * text <- video: ``t'_{b,c} = t_c + alpha_t * W_o Attn(q=t_c, kv=[P_b; u_b])``
    * video <- text: ``v'_b = v_b + alpha_v * W_o' Attn(q=v_b, kv={t_c})``

    Args:
        dim: embedding width D.
        num_heads: attention heads H; must divide D.
    """

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads must divide the embedding width {dim}, got {num_heads}")
        self.num_heads = num_heads
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

    def forward(self, text: Tensor, video: Tensor, frames: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Exchanges information between the modalities.

        Args:
            text: ``[C, D]`` class embeddings (shared by the batch).
            video: ``[B, D]`` video embeddings.
            frames: ``[B, T, D]`` mixed frame embeddings.
            prompts: ``[B, K, D]`` motion-aware prompts.

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
        text_out = text + self.text_scale * self.text_out(attended)

        # video <- text: one query per video over the classes (keys broadcast, not copied).
        query = self.video_query(self.video_norm(video)).view(batch, 1, heads, head_dim)
        key, value = self.text_key_value(text_normed).view(num_classes, 2, heads, head_dim).unbind(1)
        shape = (batch, num_classes, heads, head_dim)
        attended = prompt_attention(query, key.expand(shape), value.expand(shape)).reshape(batch, dim)
        video_out = video + self.video_scale * self.video_out(attended)
        return text_out, video_out
