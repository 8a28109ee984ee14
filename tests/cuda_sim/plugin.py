"""pytest plugin: the ``cuda`` backend runs the csrc/*.cu kernels emulated on CPU tensors.

    PYTHONPATH=tests/cuda_sim python -m pytest -p plugin tests/test_prompt_attention.py -k cuda

(README.md in this folder says what the emulation checks and what it cannot.)
"""


def _load():
    from build import build

    from mpfast.ops import _registry

    module = build()
    return {name: _registry.OpImpl(getattr(module, f"{name}_fwd"), getattr(module, f"{name}_bwd"))
            for name in _registry.op_specs() if hasattr(module, f"{name}_fwd")}


def pytest_configure(config):
    from mpfast.ops import _registry

    _registry.register_backend(_registry.Backend("cuda", ("cpu",), _load))
