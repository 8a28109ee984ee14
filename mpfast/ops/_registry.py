"""Backend registry: which implementation of an op runs for a given call.

Every op has up to four implementations. The reference (plain PyTorch) always runs; the
others are registered here by name with a lazy loader, so importing mpfast never imports
Triton, never compiles C++ and never initialises CUDA.

A backend is chosen once per call (the backward runs with the backend of its forward):

* ``auto`` (the default): a CUDA tensor gets ``triton``, else ``cuda``, else
  ``reference``; a CPU tensor gets ``cpp``, else ``reference``. A backend that cannot
  run is skipped quietly (logged once per reason).
* a name (``reference``, ``triton``, ``cpp``, ``cuda``), from ``MPFAST_BACKEND`` or the
  :func:`backend` context manager (which wins over the environment): that backend runs
  or the call raises :class:`BackendUnavailableError` listing every reason.

Asking is not doing: :func:`available_backends` (and ``python -m mpfast.info``) never
compile anything; a compiled backend that is not built yet reports so (its ``probe``),
and is built on its first real use or by ``mpfast build``.

What a backend accepts is data: the device types it runs on (:class:`Backend`) and,
per op, the dtypes and largest sizes (:class:`Limits`); a refusal names the inputs it saw.

Adding a backend means writing a loader that imports the implementation and returns
``{op_name: OpImpl(forward, backward, limits)}`` (the contract is on :class:`OpImpl`);
raising :class:`BackendUnavailableError` (or ``ImportError``) from the loader marks the
whole backend unavailable with that reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

logger = logging.getLogger("mpfast.ops")

BACKEND_NAMES = ("reference", "triton", "cpp", "cuda")
ENV_VAR = "MPFAST_BACKEND"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Order tried by ``auto`` for each device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run these inputs; the message says why."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one backend's implementation of one op accepts beyond the op's own checks.

    Attributes:
        dtypes: dtypes of the op's (floating) inputs it takes.
        max_sizes: largest value of each named size the op's spec defines
            (``OpSpec.sizes``), e.g. ``{"head_dim": 256}``.
        max_sizes_by_dtype: tighter limits for some dtypes, e.g.
            ``{torch.float64: {"head_dim": 128}}``.
    """

    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    max_sizes_by_dtype: Mapping[torch.dtype, Mapping[str, int]] = dataclasses.field(default_factory=dict)

    def refusals(self, sizes: Mapping[str, Callable[..., int]], args: Sequence, dtype: torch.dtype) -> list[str]:
        """Why these forward arguments exceed the limits (empty list: they do not)."""
        bounds = self._bounds.get(dtype)
        if bounds is not None and all(sizes[name](*args) <= largest for name, largest in bounds):
            return []  # the common case, checked once per call: no message to build
        reasons = []
        if dtype not in self.dtypes:
            reasons.append(f"takes {', '.join(_dtype_name(d) for d in self.dtypes)}, not {_dtype_name(dtype)}")
        by_dtype = self.max_sizes_by_dtype.get(dtype, {})
        for limits, where in ((self.max_sizes, ""), (by_dtype, f" for {_dtype_name(dtype)}")):
            for name, largest in limits.items():
                value = sizes[name](*args)
                if value > largest:
                    reasons.append(f"takes {name} up to {largest}{where}, got {name}={value}")
        return reasons

    @functools.cached_property
    def _bounds(self) -> dict[torch.dtype, tuple[tuple[str, int], ...]]:
        """Per dtype taken: the tightest largest value of each limited size (computed once)."""
        bounds = {}
        for dtype in self.dtypes:
            merged = dict(self.max_sizes)
            for name, largest in self.max_sizes_by_dtype.get(dtype, {}).items():
                merged[name] = min(largest, merged.get(name, largest))
            bounds[dtype] = tuple(merged.items())
        return bounds


NO_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op: it fills the outputs it is given.

    Attributes:
        forward: ``forward(*args, *outputs)``: the op's arguments (as in its schema),
            then its results preallocated (contiguous, shapes and dtypes from the spec),
            which it fills; returns nothing.
        backward: ``backward(*grads, *saved, *grad_inputs)``: one incoming gradient per
            result, the values the spec saves, then the input gradients preallocated, which
            it fills.
        limits: dtypes and sizes it accepts.
        fills: ``False`` only for the reference backend: its functions are the
            specification and return their results (``forward(*args)``,
            ``backward(*grads, *saved)``); copying them into outputs would cost a pass
            over memory and nothing else.

    Neither is called when there is nothing to compute (every result, or every incoming
    gradient, empty) unless ``fills`` is ``False``.
    """

    forward: Callable[..., Any]
    backward: Callable[..., Any]
    limits: Limits = NO_LIMITS
    fills: bool = True


@dataclasses.dataclass
class Backend:
    """A named set of op implementations, loaded on first use.

    Attributes:
        name: registry name.
        devices: device types (``"cpu"``, ``"cuda"``) whose tensors it accepts.
        loader: returns ``{op_name: OpImpl}``; raises ``BackendUnavailableError`` or
            ``ImportError`` when the backend cannot run on this machine. May compile.
        device_check: optional extra check per device type (for example Triton on CPU
            only in interpreter mode); returns a reason string or ``None``.
        probe: optional check that never compiles: ``None`` when the loader would not
            need to, else the reason (``"not built - run `mpfast build`"``).
    """

    name: str
    devices: tuple[str, ...]
    loader: Callable[[], Mapping[str, OpImpl]]
    device_check: Callable[[str], str | None] | None = None
    probe: Callable[[], str | None] | None = None
    _impls: Mapping[str, OpImpl] | None = None
    _error: str | None = None

    def load(self) -> Mapping[str, OpImpl] | None:
        """Imports (or builds) the backend once; returns its ops, or ``None`` after a failure."""
        if self._impls is None and self._error is None:
            try:
                impls = dict(self.loader())
                if not impls:
                    raise BackendUnavailableError(f"{self.name} implements no ops yet")
                self._impls = impls
            except (BackendUnavailableError, ImportError, OSError, RuntimeError) as exc:
                self._error = f"{type(exc).__name__}: {exc}".strip()
        return self._impls

    def unavailable_reason(self, device_type: str, load: bool = True) -> str | None:
        """Why this backend cannot run on ``device_type`` tensors at all (``None``: it can).

        Args:
            load: load the backend to find out, compiling it if it is not built yet (a
                real use); ``False`` only asks, and reports what is not built.
        """
        if device_type not in self.devices:
            return f"{self.name} does not run on {device_type} tensors (it runs on {', '.join(self.devices)})"
        if device_type == "cuda" and not torch.cuda.is_available():  # before loading (compiling) anything
            return "no CUDA device here (torch.cuda.is_available() is False)"
        if self.device_check is not None:
            reason = self.device_check(device_type)
            if reason:
                return reason
        if not load and self._impls is None and self._error is None and self.probe is not None:
            reason = self.probe()
            if reason:
                return reason
        if self.load() is None:
            return f"{self.name} is not available: {self._error}"
        return None


_BACKENDS: dict[str, Backend] = {}
_OPS: dict[str, Any] = {}  # op name -> its OpSpec (mpfast.ops._spec)
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("mpfast_backend", default=None)
_logged: set[tuple] = set()
# (op, requested, device type) -> candidates in order: (name, OpImpl or None, why not).
_plans: dict[tuple[str, str, str], tuple[tuple[str, OpImpl | None, str | None], ...]] = {}


def register_backend(backend: Backend) -> None:
    """Adds (or replaces) a backend in the registry."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend.name!r}")
    _BACKENDS[backend.name] = backend
    _plans.clear()


def register_op(spec) -> None:
    """Makes an op known to the registry (called by :func:`mpfast.ops._spec.register`)."""
    _OPS[spec.name] = spec
    _plans.clear()


def op_specs() -> Mapping[str, Any]:
    """``{op name: OpSpec}`` of every registered op."""
    return _OPS


def get_backend(name: str) -> Backend:
    return _BACKENDS[name]


def implementation(backend_name: str, op: str) -> OpImpl:
    """The implementation of ``op`` in a backend that already ran it (for the backward)."""
    return _BACKENDS[backend_name].load()[op]


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the context manager's, else ``MPFAST_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    return _check_name(env.strip().lower(), ENV_VAR) if env and env.strip() else "auto"


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


def _plan(op: str, requested: str, device_type: str) -> tuple[tuple[str, OpImpl | None, str | None], ...]:
    """The candidates for ``op`` on ``device_type``, each loaded (a real use: may compile) or with its reason."""
    names = (requested,) if requested != "auto" else _AUTO_ORDER.get(device_type, ("reference",))
    plan = []
    for name in names:
        backend_ = _BACKENDS[name]
        reason = backend_.unavailable_reason(device_type)
        impl = None if reason else backend_.load().get(op)
        if impl is None and not reason:
            reason = f"{name} has no implementation of {op}"
        plan.append((name, impl, reason))
    _plans[(op, requested, device_type)] = plan = tuple(plan)
    return plan


def resolve(op: str, args: Sequence, device_type: str) -> tuple[str, OpImpl]:
    """Picks the backend that runs ``op`` on these forward arguments now.

    Returns:
        The backend's name and its implementation of ``op``.

    Raises:
        BackendUnavailableError: a backend asked for by name cannot run these inputs, or
            (``auto``) none can.
    """
    requested = requested_backend()
    plan = _plans.get((op, requested, device_type)) or _plan(op, requested, device_type)
    skipped = []
    for name, impl, reason in plan:
        if impl is not None:
            refusals = () if impl.limits is NO_LIMITS else impl.limits.refusals(_OPS[op].sizes, args, args[0].dtype)
            if not refusals:
                if skipped:
                    _log_fallback(op, device_type, name, skipped)
                return name, impl
            reason = f"{name} {op} " + "; ".join(refusals)
            if requested != "auto":
                reason += f" (inputs: {describe(op, args)})"
        if requested != "auto":
            raise BackendUnavailableError(f"mpfast backend {requested!r} cannot run {op} here: {reason}")
        skipped.append(f"{name}: {reason}")
    raise BackendUnavailableError(f"no mpfast backend can run {op} on {device_type}: " + " | ".join(skipped)
                                  + f" (inputs: {describe(op, args)})")


def _log_fallback(op: str, device_type: str, name: str, skipped: list[str]) -> None:
    key = (op, device_type, tuple(skipped))
    if key not in _logged:
        _logged.add(key)
        logger.info("mpfast %s on %s uses %s (%s)", op, device_type, name, "; ".join(skipped))


def describe(op: str, args: Sequence) -> str:
    """The arguments of a call as a refusal names them: ``q [5, 2, 4] float32, scale=0.5, ...``."""
    parts = []
    for name, value in zip(_OPS[op].arg_names, args):
        if isinstance(value, torch.Tensor):
            parts.append(f"{name} {list(value.shape)} {_dtype_name(value.dtype)} on {value.device}")
        else:
            parts.append(f"{name}={value!r}")
    return ", ".join(parts)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_backends(device_type: str | None = None) -> dict[str, str | None]:
    """Every backend, mapped to ``None`` if it can run on ``device_type``, else why not.

    Nothing is compiled to find out: a compiled backend that is not built yet says
    ``"not built - run `mpfast build`"`` (it is built on first use otherwise).

    Args:
        device_type: ``"cpu"`` or ``"cuda"``; by default ``"cuda"`` if
            ``torch.cuda.is_available()`` else ``"cpu"``.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: _BACKENDS[name].unavailable_reason(device_type, load=False) for name in BACKEND_NAMES}
