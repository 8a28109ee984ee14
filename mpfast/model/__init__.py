"""The MotionCLIP model and its parts."""

from .communication import MultimodalCommunicationBlock
from .config import HeadConfig
from .factory import create_model_and_transforms
from .motion import MotionModelingBlock
from .motion_clip import MotionCLIP
from .prompts import MotionAwarePrompts

__all__ = [
    "HeadConfig",
    "MotionAwarePrompts",
    "MotionCLIP",
    "MotionModelingBlock",
    "MultimodalCommunicationBlock",
    "create_model_and_transforms",
]
