"""The four backends and how each is loaded (lazily, on first use).

Each loader returns ``{op_name: OpImpl}`` for every registered op it implements, found
by name: the spec's reference functions, the Triton launchers ``<op>_fwd``/``<op>_bwd``
of ``kernels/<op>.py``, the operators ``<op>_fwd``/``<op>_bwd`` of the compiled libraries.
"""

from __future__ import annotations

import os

from ._registry import Backend, OpImpl, op_specs, register_backend


def _load_reference():
    from ._spec import reference_impl

    return {name: reference_impl(spec) for name, spec in op_specs().items()}


def _load_triton():
    import triton  # noqa: F401  (ImportError says why the backend is missing)

    from mpfast import kernels

    return kernels.load_ops(op_specs())


def _triton_device_check(device_type: str) -> str | None:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CPU tensors only in interpreter mode (set TRITON_INTERPRET=1 before importing triton)"
    return None


def _load_extension(kind: str):
    # Compiles csrc/ on first use (cached); BackendUnavailableError says why it cannot.
    from . import extension

    namespace = extension.load_namespace(kind)
    impls = {}
    for name in op_specs():
        if hasattr(namespace, f"{name}_fwd") and hasattr(namespace, f"{name}_bwd"):
            # OpOverloads: calling them skips the overload resolution of torch.ops packets.
            impls[name] = OpImpl(getattr(namespace, f"{name}_fwd").default, getattr(namespace, f"{name}_bwd").default)
    return impls


def _extension_probe(kind: str) -> str | None:
    from . import extension

    return extension.not_built_reason(kind)


register_backend(Backend("reference", ("cpu", "cuda", "meta"), _load_reference))
register_backend(Backend("triton", ("cuda", "cpu"), _load_triton, _triton_device_check))
register_backend(Backend("cpp", ("cpu",), lambda: _load_extension("cpp"), probe=lambda: _extension_probe("cpp")))
register_backend(Backend("cuda", ("cuda",), lambda: _load_extension("cuda"), probe=lambda: _extension_probe("cuda")))
