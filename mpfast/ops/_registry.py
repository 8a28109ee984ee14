"""Backend registry: which implementation of an op runs for a given call.

Every op (``temporal_diff``, ``motion_mix``, ``prompt_attention``) has up to four
implementations. The reference (plain PyTorch) always runs; the others are registered
here by name with a lazy loader, so importing mpfast never imports Triton, never
compiles C++ and never initialises CUDA.

A backend is chosen per call:

* ``auto`` (the default): a CUDA tensor gets ``triton``, else ``cuda``, else
  ``reference``; a CPU tensor gets ``cpp``, else ``reference``. A backend that cannot
  run is skipped quietly (logged once per reason).
* a name (``reference``, ``triton``, ``cpp``, ``cuda``), from ``MPFAST_BACKEND`` or the
  :func:`backend` context manager (which wins over the environment): that backend runs
  or the call raises :class:`BackendUnavailableError` listing every reason.

Adding a backend means writing a loader that imports the implementation module and
returns ``{op_name: OpImpl(forward, backward)}``; raising
:class:`BackendUnavailableError` (or ``ImportError``) from the loader marks the whole
backend unavailable with that reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from typing import Callable, Iterator, Mapping, Sequence

import torch

logger = logging.getLogger("mpfast.ops")

BACKEND_NAMES = ("reference", "triton", "cpp", "cuda")
ENV_VAR = "MPFAST_BACKEND"

# Order tried by ``auto`` for each device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run these inputs; the message says why."""


@dataclasses.dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op.

    Attributes:
        forward: same arguments and results as the op's reference forward.
        backward: same arguments and results as the op's reference backward.
        supports: optional check returning reasons (strings) why these forward
            arguments cannot run here; empty when they can.
    """

    forward: Callable
    backward: Callable
    supports: Callable[..., list[str]] | None = None


@dataclasses.dataclass
class Backend:
    """A named set of op implementations, loaded on first use.

    Attributes:
        name: registry name.
        devices: device types (``"cpu"``, ``"cuda"``) whose tensors it accepts.
        loader: returns ``{op_name: OpImpl}``; raises ``BackendUnavailableError`` or
            ``ImportError`` when the backend cannot run on this machine.
        device_check: optional extra check per device type (for example Triton on CPU
            only in interpreter mode); returns a reason string or ``None``.
    """

    name: str
    devices: tuple[str, ...]
    loader: Callable[[], Mapping[str, OpImpl]]
    device_check: Callable[[str], str | None] | None = None
    _impls: Mapping[str, OpImpl] | None = None
    _error: str | None = None

    def load(self) -> Mapping[str, OpImpl] | None:
        """Imports the backend once; returns its ops or ``None`` (see :attr:`error`)."""
        if self._impls is None and self._error is None:
            try:
                impls = dict(self.loader())
                if not impls:
                    raise BackendUnavailableError(f"{self.name} implements no ops yet")
                self._impls = impls
            except (BackendUnavailableError, ImportError, OSError, RuntimeError) as exc:
                self._error = f"{type(exc).__name__}: {exc}".strip()
        return self._impls

    @property
    def error(self) -> str | None:
        self.load()
        return self._error

    def unavailable_reason(self, device_type: str) -> str | None:
        """Why this backend cannot run on ``device_type`` tensors at all (``None``: it can)."""
        if device_type not in self.devices:
            return f"{self.name} does not run on {device_type} tensors (it runs on {', '.join(self.devices)})"
        if device_type == "cuda" and not torch.cuda.is_available():  # before loading (compiling) anything
            return "no CUDA device here (torch.cuda.is_available() is False)"
        if self.device_check is not None:
            reason = self.device_check(device_type)
            if reason:
                return reason
        if self.load() is None:
            return f"{self.name} is not available: {self._error}"
        return None

    def not_supported_reasons(self, op: str, device_type: str, args: Sequence) -> list[str]:
        """Why this backend cannot run ``op`` on ``args`` (empty list: it can)."""
        reason = self.unavailable_reason(device_type)
        if reason:
            return [reason]
        impl = self._impls.get(op)
        if impl is None:
            return [f"{self.name} has no implementation of {op}"]
        if impl.supports is not None:
            return list(impl.supports(*args))
        return []


_BACKENDS: dict[str, Backend] = {}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("mpfast_backend", default=None)
_logged: set[tuple] = set()


def register_backend(backend: Backend) -> None:
    """Adds (or replaces) a backend in the registry."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend.name!r}")
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    return _BACKENDS[name]


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the context manager's, else ``MPFAST_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_name(env, ENV_VAR) if env else "auto"


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Runs the mpfast ops inside the block with backend ``name``.

    Args:
        name: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"``.

    The choice also applies to the backward pass of ops called inside the block, even
    when ``backward()`` runs after the block ends.
    """
    token = _override.set(_check_name(name, "backend name"))
    try:
        yield
    finally:
        _override.reset(token)


def resolve(op: str, requested: str, device_type: str, args: Sequence) -> tuple[str, OpImpl]:
    """Picks the implementation of ``op`` for ``args`` on ``device_type``.

    Raises:
        BackendUnavailableError: a backend asked for by name cannot run these inputs.
    """
    if requested != "auto":
        backend_ = _BACKENDS[requested]
        reasons = backend_.not_supported_reasons(op, device_type, args)
        if reasons:
            raise BackendUnavailableError(
                f"mpfast backend {requested!r} cannot run {op} here: " + "; ".join(reasons)
            )
        return requested, backend_.load()[op]
    skipped = []
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        backend_ = _BACKENDS[name]
        reasons = backend_.not_supported_reasons(op, device_type, args)
        if not reasons:
            if skipped:
                key = (op, device_type, tuple(skipped))
                if key not in _logged:
                    _logged.add(key)
                    logger.info("mpfast %s on %s uses %s (%s)", op, device_type, name, "; ".join(skipped))
            return name, backend_.load()[op]
        skipped.append(f"{name}: {'; '.join(reasons)}")
    raise BackendUnavailableError(f"no mpfast backend can run {op} on {device_type}: " + " | ".join(skipped))


def available_backends(device_type: str | None = None) -> dict[str, str | None]:
    """Every backend, mapped to ``None`` if it can run on ``device_type``, else why not.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``; by default ``"cuda"`` if
            ``torch.cuda.is_available()`` else ``"cpu"``.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: _BACKENDS[name].unavailable_reason(device_type) for name in BACKEND_NAMES}
