"""The hot ops of the MotionCLIP head, each a ``torch.library`` custom op.

``temporal_diff``, ``motion_mix``, ``prompt_attention`` and ``class_logits`` dispatch to a backend
(reference, triton, cpp, cuda) chosen per call; see :mod:`mpfast.ops._registry`.
The ``*_ref`` functions are the plain-PyTorch specifications; each op's ``SPEC`` states
its facts once and :mod:`mpfast.ops._spec` registers it (and says how to add an op).
"""

from . import _backends  # noqa: F401  (registers the backends)
from ._registry import BackendUnavailableError, available_backends, backend, requested_backend
from .class_logits import ClassFold, class_logits, class_logits_folded, class_logits_ref, fold_classes
from .motion_mix import motion_mix, motion_mix_ref
from .prompt_attention import prompt_attention, prompt_attention_ref
from .temporal_diff import default_strides, temporal_diff, temporal_diff_ref

__all__ = [
    "BackendUnavailableError",
    "ClassFold",
    "available_backends",
    "backend",
    "class_logits",
    "class_logits_folded",
    "class_logits_ref",
    "default_strides",
    "fold_classes",
    "motion_mix",
    "motion_mix_ref",
    "prompt_attention",
    "prompt_attention_ref",
    "requested_backend",
    "temporal_diff",
    "temporal_diff_ref",
]
