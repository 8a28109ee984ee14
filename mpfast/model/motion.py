"""Motion Modelling Block: a spatial stream and a motion stream of frame differences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import default_strides, motion_mix, temporal_diff


class MotionModelingBlock(nn.Module):
    """Two-stream temporal model over frozen CLIP frame embeddings.

    Motion stream: ``m_s = W_up GELU(W_down norm(f[t + k_s] - f[t]))`` for each stride,
    weights shared across strides, no biases and a scale-only norm, so a static video
    has exactly zero motion. Spatial stream: ``h = f + P`` (zero-initialised temporal
    position embedding). The two are mixed through zero-initialised ``tanh`` gates.

    Args:
        dim: CLIP embedding width D.
        num_frames: frames the position embedding is sized for (others interpolate).
        strides: temporal-difference strides; ``None``: ``(1, max(2, T // 2))``.
        ratio: bottleneck width is ``dim // ratio``.
        eps: epsilon of the motion norm.
    """

    def __init__(self, dim: int, num_frames: int = 8, strides: tuple[int, ...] | None = None, ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.strides = strides
        num_streams = len(strides) if strides is not None else 2
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.down = nn.Linear(dim, max(1, dim // ratio), bias=False)
        self.up = nn.Linear(max(1, dim // ratio), dim, bias=False)
        self.position = nn.Parameter(torch.zeros(num_frames, dim))
        self.gate = nn.Parameter(torch.zeros(num_streams, dim))

    def position_embedding(self, num_frames: int) -> Tensor:
        """``[T, D]`` position embedding, linearly interpolated when T differs from the configured length."""
        if num_frames == self.position.shape[0]:
            return self.position
        resized = F.interpolate(self.position.T[None], size=num_frames, mode="linear", align_corners=False)
        return resized[0].T

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mixes the two streams.

        Args:
            frames: ``[B, T, D]`` frame embeddings.

        Returns:
            ``(u, v, mu)``: mixed frames ``[B, T, D]``, unit video embedding ``[B, D]``
            and motion descriptor ``[B, D]``.
        """
        strides = self.strides if self.strides is not None else default_strides(frames.shape[1])
        delta = temporal_diff(frames, strides)
        motion = self.up(F.gelu(self.down(self.norm(delta))))
        spatial = frames + self.position_embedding(frames.shape[1])
        return motion_mix(spatial, motion, self.gate)
