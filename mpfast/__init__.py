"""mpfast: motion-prompted CLIP video recognition, fast."""

from . import ops
from .model import MotionCLIP, create_model_and_transforms

__version__ = "0.1.0"

__all__ = ["MotionCLIP", "create_model_and_transforms", "ops", "__version__"]
