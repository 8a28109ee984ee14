"""The four backends and how each is loaded (lazily, on first use)."""

from __future__ import annotations

import os

from ._registry import Backend, OpImpl, register_backend


def _load_reference():
    from .motion_mix import motion_mix_backward_ref, motion_mix_ref
    from .prompt_attention import prompt_attention_backward_ref, prompt_attention_ref
    from .temporal_diff import temporal_diff_backward_ref, temporal_diff_ref

    return {
        "temporal_diff": OpImpl(temporal_diff_ref, temporal_diff_backward_ref),
        "motion_mix": OpImpl(motion_mix_ref, motion_mix_backward_ref),
        "prompt_attention": OpImpl(prompt_attention_ref, prompt_attention_backward_ref),
    }


def _load_triton():
    import triton  # noqa: F401  (ImportError says why the backend is missing)

    from mpfast import kernels

    return kernels.load_ops()


def _triton_device_check(device_type: str) -> str | None:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CPU tensors only in interpreter mode (set TRITON_INTERPRET=1 before importing triton)"
    return None


def _load_extension(kind: str):
    # Compiles csrc/ on first use (cached); BackendUnavailableError says why it cannot.
    from . import extension

    return extension.load_ops(kind)


register_backend(Backend("reference", ("cpu", "cuda", "meta"), _load_reference))
register_backend(Backend("triton", ("cuda", "cpu"), _load_triton, _triton_device_check))
register_backend(Backend("cpp", ("cpu",), lambda: _load_extension("cpp")))
register_backend(Backend("cuda", ("cuda",), lambda: _load_extension("cuda")))
