"""Configuration of the MotionCLIP head."""

from __future__ import annotations

import dataclasses
from typing import Sequence

DEFAULT_TEMPLATES = ("a video of a person {}.",)

# Options of earlier designs of the head, and what replaced them.
RETIRED_OPTIONS = {"norm_eps": "the epsilon of the RMSNorm of the motion differences, replaced by motion_floor"}


@dataclasses.dataclass
class HeadConfig:
    """Options of the trainable head that MotionCLIP puts on a frozen CLIP.

    Every field can be passed to :func:`mpfast.create_model_and_transforms` as a keyword.
    """

    num_frames: int = 8  # frames per video; length of the temporal position embedding
    strides: tuple[int, ...] | None = None  # temporal-difference strides; None: powers of two below num_frames
    motion_ratio: int = 4  # motion bottleneck width is max(D // motion_ratio, 128)
    motion_floor: float = 0.01  # floor of the motion scales, relative to the RMS of the frame embeddings
    num_prompts: int = 8  # K motion-aware prompt vectors per video; 0: the text attends to the frames only
    prompt_hidden: int = 64  # hidden width of the dynamic prompts learner
    num_heads: int = 8  # attention heads of the multimodal communication block
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # class-name prompt templates, "{}" is the name

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("num_frames", "motion_ratio", "prompt_hidden", "num_heads"):
            positive(name)
        if isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int) or self.num_prompts < 0:
            raise ValueError(f"num_prompts must be an int >= 0, got {self.num_prompts!r}")
        floor = self.motion_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < float("inf"):
            raise ValueError(f"motion_floor must be a finite number >= 0, got {floor!r}")
        self.motion_floor = float(floor)
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
        retired = sorted(set(options) & set(RETIRED_OPTIONS))
        if retired:
            raise ValueError(f"head option(s) {retired} belong to an earlier design of the head "
                             f"({RETIRED_OPTIONS[retired[0]]}); a head saved with them cannot be loaded: retrain it")
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown head option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)
