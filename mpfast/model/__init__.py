"""The MotionCLIP model and its parts."""

from .communication import MultimodalCommunicationBlock
from .config import HeadConfig
from .factory import PRECISIONS, add_model_config, create_model_and_transforms
from .motion import MotionModelingBlock
from .motion_clip import MotionCLIP
from .prompts import MotionAwarePrompts

__all__ = [
    "PRECISIONS",
    "HeadConfig",
    "MotionAwarePrompts",
    "MotionCLIP",
    "MotionModelingBlock",
    "MultimodalCommunicationBlock",
    "add_model_config",
    "create_model_and_transforms",
]
