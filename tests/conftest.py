"""Shared fixtures: device, backend (every op suite runs once per backend), tiny CLIP.

Without a GPU the Triton kernels run in interpreter mode on CPU tensors: the variable
must be set before triton is first imported, hence at the very top.
"""

import os

if os.environ.get("MPFAST_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mpfast  # noqa: E402
from mpfast.ops import _registry, _spec  # noqa: E402

TINY_CONFIG = Path(__file__).parent / "configs" / "mpfast-tiny.json"
open_clip.add_model_config(TINY_CONFIG)

# Backends every op suite is run against. A backend named in MPFAST_REQUIRE_BACKENDS
# (comma-separated; CI sets it) that cannot run fails its tests instead of skipping.
OP_BACKENDS = ("reference", "triton", "cpp", "cuda")


def required_backends() -> set[str]:
    return {b.strip() for b in os.environ.get("MPFAST_REQUIRE_BACKENDS", "reference").split(",") if b.strip()}


def runnable(name: str, device: torch.device) -> str:
    """Skips (or fails, when required) unless backend ``name`` runs on ``device``: loaded as
    a real use does, so a compiled backend not built yet is built here."""
    reason = _registry.get_backend(name).unavailable_reason(device.type)
    if reason is not None:
        if name in required_backends():
            pytest.fail(f"required backend {name} cannot run: {reason}")
        pytest.skip(reason)
    return name


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Device of the op tests: ``MPFAST_TEST_DEVICE`` (``cpu`` by default, ``cuda`` in gpu_check.sh)."""
    return torch.device(os.environ.get("MPFAST_TEST_DEVICE", "cpu"))


@pytest.fixture(params=OP_BACKENDS)
def backend(request, device):
    """Runs the test body with one backend selected, outputs poisoned with NaN."""
    name = runnable(request.param, device)
    with mpfast.ops.backend(name), _spec.poison_outputs():
        yield name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_name() -> str:
    return "mpfast-tiny"
