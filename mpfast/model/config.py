"""Configuration of the MotionCLIP head."""

from __future__ import annotations

import dataclasses
from typing import Sequence

DEFAULT_TEMPLATES = ("a video of a person {}.",)


@dataclasses.dataclass
class HeadConfig:
    """Options of the trainable head that MotionCLIP puts on a frozen CLIP.

    Every field can be passed to :func:`mpfast.create_model_and_transforms` as a keyword.
    """

    num_frames: int = 8  # frames per video; length of the temporal position embedding
    strides: tuple[int, ...] | None = None  # temporal-difference strides; None: (1, max(2, T // 2))
    motion_ratio: int = 4  # motion bottleneck width is D // motion_ratio
    num_prompts: int = 8  # K motion-aware prompt vectors per video
    prompt_hidden: int = 64  # hidden width of the dynamic prompts learner
    num_heads: int = 8  # attention heads of the multimodal communication block
    norm_eps: float = 1e-6  # epsilon of the scale-only motion norm
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # class-name prompt templates, "{}" is the name

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("num_frames", "motion_ratio", "num_prompts", "prompt_hidden", "num_heads"):
            positive(name)
        if self.strides is not None:
            if isinstance(self.strides, (str, int)) or not isinstance(self.strides, Sequence) or not self.strides:
                raise ValueError(f"strides must be None or a non-empty sequence of ints >= 1, got {self.strides!r}")
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.strides):
                raise ValueError(f"strides must be ints >= 1, got {self.strides!r}")
            self.strides = tuple(self.strides)
        if isinstance(self.templates, str) or not self.templates:
            raise ValueError(f"templates must be a non-empty sequence of strings with '{{}}', got {self.templates!r}")
        for template in self.templates:
            if not isinstance(template, str) or "{}" not in template:
                raise ValueError(f"each template must be a string containing '{{}}', got {template!r}")
        self.templates = tuple(self.templates)

    @classmethod
    def from_options(cls, **options) -> "HeadConfig":
        """Builds a config from keyword options, naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown head option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)
