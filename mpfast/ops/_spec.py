"""One spec per op: :func:`register` turns an :class:`OpSpec` into a ``torch.library`` op.

An op's facts are stated once, in ``SPEC`` in ``mpfast/ops/<op>.py``: its schema, the
shapes and dtypes of its results and of its input gradients, what the backward needs,
its FLOP count and its reference. From the spec, :func:`register` makes:

* ``torch.ops.mpfast.<op>`` and ``torch.ops.mpfast.<op>_backward``, custom ops whose
  fake (meta) implementations allocate what the spec says, so ``torch.compile`` and
  ``torch.library.opcheck`` see them;
* autograd: the forward saves what the spec names, and the backward op runs with the
  backend the forward resolved to (resolved once per call, remembered for the backward);
* FLOP formulas for ``torch.utils.flop_counter`` (forward and backward);
* the ``reference`` backend's implementation (the spec's reference functions).

Every fast backend implements one contract (:class:`mpfast.ops._registry.OpImpl`): it
gets the arguments followed by preallocated outputs and fills them. Outputs are
allocated here only, once per call (NaN-filled under :func:`poison_outputs`, as the tests
run); when every result (every incoming gradient) is empty no backend is called, and the
input gradients are zeros. The reference backend alone returns what the reference
functions compute (they are the specification; copying their results would only cost).

Adding an op
------------
1. ``mpfast/ops/<op>.py``: the reference ``<op>_ref(*args)`` (plain PyTorch, the
   specification) and ``<op>_backward_ref(*grads, *saved)`` returning one gradient per
   differentiable argument; a ``flops`` function; ``SPEC = OpSpec(...)``;
   ``_op = register(SPEC)``; and the public function, which validates its arguments
   (:mod:`mpfast.ops._common`, raising ``TypeError``/``ValueError`` that name them) and
   calls ``_op``. Export it in ``mpfast/ops/__init__.py``. ``temporal_diff.py`` is the
   smallest example. A value only the backward needs (a log-sum-exp, a norm) is one more
   named result, listed in ``saved`` and dropped by the public function.
2. Fast backends, each with the signatures of the contract: Triton launchers
   ``<op>_fwd(*args, *outputs)`` and ``<op>_bwd(*grads, *saved, *grad_inputs)`` in
   ``kernels/<op>.py``, decorated with ``@on_tensor_device`` (``kernels/_utils.py``), with
   ``LIMITS`` when they take less than every float dtype and size; C++/CUDA operators
   ``<op>_fwd``/``<op>_bwd`` defined in ``csrc/bindings.cpp`` and implemented in
   ``csrc/<op>.cpp``/``.cu`` (listed in ``mpfast/ops/extension/toolchain.py``). The
   backends find them by these names.
3. Tests: ``tests/test_<op>.py`` with the ``backend`` fixture (every backend, outputs
   poisoned) comparing with the reference in float64, and an ``opcheck``.
Nothing else changes: registration, fake, autograd, FLOP counting, backend choice and
the reference backend all come from the spec.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import re
import threading
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _registry

Shape = Sequence[int]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """The facts of one op, stated once.

    Attributes:
        name: ``torch.ops.mpfast.<name>`` (and ``<name>_backward``).
        schema: the forward's arguments and named results, e.g.
            ``"(Tensor x, SymInt[] strides) -> Tensor out"``. The first argument is a
            tensor: results are allocated on its device.
        outputs: ``outputs(*args)``: ``(shape, dtype)`` of each result, in order.
        differentiable: the arguments that get gradients, in schema order.
        saved: the arguments (or results, by name) the backward needs, in order. The
            backward gets one gradient per result followed by these.
        reference: the specification, ``reference(*args)``: the result (a tuple for
            several), differentiable by autograd.
        reference_backward: ``reference_backward(*grads, *saved)``: the input gradient(s).
        flops: ``flops(*args)`` with tensors given as shapes: FLOPs of the forward.
        grads: ``grads(*grads, *saved)``: ``(shape, dtype)`` of each input gradient;
            by default like the saved argument of the same name.
        backward_flops: as ``flops``, for the backward; by default twice ``flops``.
        sizes: named sizes a backend may limit (:class:`~mpfast.ops._registry.Limits`),
            each computed from the forward arguments, e.g. ``{"head_dim": lambda q, k, *_: k.shape[-1]}``.
    """

    name: str
    schema: str
    outputs: Callable[..., Sequence[tuple[Shape, torch.dtype]]]
    differentiable: tuple[str, ...]
    saved: tuple[str, ...]
    reference: Callable[..., Any]
    reference_backward: Callable[..., Any]
    flops: Callable[..., int]
    grads: Callable[..., Sequence[tuple[Shape, torch.dtype]]] | None = None
    backward_flops: Callable[..., int] | None = None
    sizes: Mapping[str, Callable[..., int]] = dataclasses.field(default_factory=dict)
    signature: Signature = dataclasses.field(init=False, repr=False, compare=False)
    _grad_like: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        sig = Signature.parse(self.name, self.schema)
        object.__setattr__(self, "signature", sig)
        names = [name for _, name in sig.args]
        unknown = [n for n in (*self.differentiable, *self.saved) if n not in names and n not in sig.returns]
        if unknown or any(n not in names for n in self.differentiable):
            raise ValueError(f"{self.name}: differentiable and saved must name arguments (or results), got {unknown}")
        if self.grads is None and any(n not in self.saved for n in self.differentiable):
            raise ValueError(f"{self.name}: without grads=..., every differentiable argument must be saved")
        # Default input gradients: like the saved argument, at its position among the backward's arguments.
        grad_like = () if self.grads else tuple(len(sig.returns) + self.saved.index(n) for n in self.differentiable)
        object.__setattr__(self, "_grad_like", grad_like)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.signature.args)

    def grad_outputs(self, *args) -> Sequence[tuple[Shape, torch.dtype]]:
        """``(shape, dtype)`` of each input gradient, from the backward's arguments (grads, then saved)."""
        if self.grads is not None:
            return self.grads(*args)
        return [(args[i].shape, args[i].dtype) for i in self._grad_like]


# ---- allocation -------------------------------------------------------------------------

def _empty(shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _poisoned(shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


_new_output = _empty


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Testing aid: inside the block, op outputs are allocated filled with NaN (``-1``
    for integers), so an element a backend fails to write shows up."""
    global _new_output
    previous, _new_output = _new_output, _poisoned
    try:
        yield
    finally:
        _new_output = previous


# ---- the schema, parsed once ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Signature:
    """An op schema as :func:`register` reads it."""

    args: tuple[tuple[str, str], ...]  # (type, name) of each argument, as written
    defaults: tuple[Any, ...]  # of each argument (None where it has none)
    returns: tuple[str, ...]  # names of the results

    @classmethod
    def parse(cls, op: str, schema: str) -> Signature:
        match = re.fullmatch(r"\((.*)\)\s*->\s*\(?(.*?)\)?", schema.strip())
        if match is None:
            raise ValueError(f"{op}: schema must look like '(Tensor x, ...) -> Tensor out', got {schema!r}")
        args, defaults = [], []
        for decl in _split(match.group(1)):
            decl, _, default = decl.partition("=")
            type_, name = decl.rsplit(None, 1)
            args.append((type_, name))
            defaults.append(ast.literal_eval(default.strip()) if default else None)  # None, 1.0, True, [1, 2]
        results = [decl.split() for decl in _split(match.group(2))]
        if not args or args[0][0] != "Tensor":
            raise ValueError(f"{op}: the first argument must be a Tensor, got {schema!r}")
        if any(len(r) != 2 or r[0] != "Tensor" for r in results):
            raise ValueError(f"{op}: results must be named tensors ('-> (Tensor u, Tensor v)'), got {schema!r}")
        return cls(tuple(args), tuple(defaults), tuple(name for _, name in results))


def _split(decls: str) -> list[str]:
    """``"Tensor x, int[] s"`` -> ``["Tensor x", "int[] s"]`` (no commas inside brackets in our schemas)."""
    return [d.strip() for d in decls.split(",") if d.strip()]


# The backend the last forward on this thread ran, for its setup_context (which autograd
# calls right after the forward): the output is kept weakly and compared by identity, so
# a stale entry can never match another call's output.
class _LastForward(threading.local):
    output: Callable[[], Any] = staticmethod(lambda: None)
    backend: str = ""


_last = _LastForward()


def register(spec: OpSpec):
    """Registers ``spec`` as ``torch.ops.mpfast.<name>`` (with backward, autograd, FLOPs).

    Returns:
        The forward ``OpOverload``: call it with the arguments of the schema.
    """
    sig = spec.signature
    arg_names = list(spec.arg_names)
    arg_types = dict((name, type_) for type_, name in sig.args)
    num_args, num_results = len(sig.args), len(sig.returns)
    defaults = sig.defaults
    single_result, single_grad = num_results == 1, len(spec.differentiable) == 1
    op_name, resolve, grad_outputs = spec.name, _registry.resolve, spec.grad_outputs
    # Saved values: positions among (*args, *results); tensors travel by save_for_backward,
    # the others (ints, floats) on ctx and go back in at their positions.
    sources = [arg_names.index(n) if n in arg_types else num_args + sig.returns.index(n) for n in spec.saved]
    is_tensor = [arg_types.get(n, "Tensor").startswith("Tensor") for n in spec.saved]
    tensor_sources = [src for src, t in zip(sources, is_tensor) if t]
    other_sources = [src for src, t in zip(sources, is_tensor) if not t]
    other_positions = [pos for pos, t in enumerate(is_tensor) if not t]
    saves_results = any(src >= num_args for src in sources)
    # Input gradients go back to the differentiable arguments' positions, None elsewhere.
    diff_positions = [arg_names.index(n) for n in spec.differentiable]
    grads_lead = diff_positions == list(range(len(diff_positions)))
    no_grads = (None,) * (num_args - len(diff_positions))

    def forward(*args):
        if len(args) != num_args:  # the dispatcher drops trailing arguments equal to their defaults
            args = (*args, *defaults[len(args):])
        device = args[0].device
        backend, impl = resolve(op_name, args, device.type)
        if impl.fills:
            outputs = [_new_output(shape, dtype, device) for shape, dtype in spec.outputs(*args)]
            for out in outputs:
                if out.numel():  # else no result has an element: nothing to compute
                    impl.forward(*args, *outputs)
                    break
        else:
            outputs = _contiguous(impl.forward(*args))
        _last.output, _last.backend = weakref.ref(outputs[0]), backend
        return outputs[0] if single_result else tuple(outputs)

    def forward_fake(*args):
        if len(args) != num_args:
            args = (*args, *defaults[len(args):])
        outputs = [args[0].new_empty(shape, dtype=dtype) for shape, dtype in spec.outputs(*args)]
        return outputs[0] if single_result else tuple(outputs)

    def backward(*args):
        backend, args = args[-1], args[:-1]
        impl = _registry.implementation(backend, op_name)
        if not impl.fills:
            grad_inputs = _contiguous(impl.backward(*args))
            return grad_inputs[0] if single_grad else tuple(grad_inputs)
        device = args[0].device
        grad_inputs = [_new_output(shape, dtype, device) for shape, dtype in grad_outputs(*args)]
        for grad in args[:num_results]:
            if grad.numel():
                impl.backward(*args, *grad_inputs)
                break
        else:  # no result has an element: nothing depends on the inputs
            for grad in grad_inputs:
                grad.zero_()
        return grad_inputs[0] if single_grad else tuple(grad_inputs)

    def backward_fake(*args):
        grad_inputs = [args[0].new_empty(shape, dtype=dtype) for shape, dtype in grad_outputs(*args[:-1])]
        return grad_inputs[0] if single_grad else tuple(grad_inputs)

    def setup_context(ctx, inputs, output):
        first = output if single_result else output[0]
        if _last.output() is first:
            ctx.backend = _last.backend
        else:  # traced with fake tensors (torch.compile): the forward above did not run
            ctx.backend = resolve(op_name, inputs, inputs[0].device.type)[0]
        values = (*inputs, *((output,) if single_result else output)) if saves_results else inputs
        if tensor_sources:
            ctx.save_for_backward(*[values[i] for i in tensor_sources])
        ctx.others = [values[i] for i in other_sources]

    def autograd_backward(ctx, *grads):
        saved = ctx.saved_tensors if tensor_sources else ()
        if other_positions:
            saved = list(saved)
            for position, value in zip(other_positions, ctx.others):
                saved.insert(position, value)
        grad_inputs = backward_op(*grads, *saved, ctx.backend)
        grad_inputs = (grad_inputs,) if single_grad else grad_inputs
        if grads_lead:
            return (*grad_inputs, *no_grads)
        result = [None] * num_args
        for position, grad in zip(diff_positions, grad_inputs):
            result[position] = grad
        return tuple(result)

    forward_def = torch.library.custom_op(f"mpfast::{op_name}", forward, mutates_args=(), schema=spec.schema)
    forward_def.register_fake(forward_fake)
    saved_decls = [f"{arg_types.get(n, 'Tensor')} {n}" for n in spec.saved]
    grad_decls = [f"Tensor grad_{n}" for n in sig.returns]
    results = ", ".join(f"Tensor grad_{n}" for n in spec.differentiable)
    backward_schema = f"({', '.join(grad_decls + saved_decls)}, str backend) -> " + (
        results if single_grad else f"({results})")
    backward_def = torch.library.custom_op(f"mpfast::{op_name}_backward", backward, mutates_args=(),
                                           schema=backward_schema)
    backward_def.register_fake(backward_fake)
    backward_op = getattr(torch.ops.mpfast, f"{op_name}_backward").default
    forward_def.register_autograd(autograd_backward, setup_context=setup_context)
    _register_flop_formulas(spec)
    _registry.register_op(spec)
    return getattr(torch.ops.mpfast, op_name).default


def _register_flop_formulas(spec: OpSpec) -> None:
    sig = spec.signature
    num_results = len(sig.returns)
    backward_flops = spec.backward_flops or (lambda *args: 2 * spec.flops(*args))

    @register_flop_formula(getattr(torch.ops.mpfast, spec.name))
    def _forward_flops(*args, out_shape=None, **kwargs) -> int:
        return spec.flops(*args, *sig.defaults[len(args):])

    @register_flop_formula(getattr(torch.ops.mpfast, f"{spec.name}_backward"))
    def _backward_flops(*args, out_shape=None, **kwargs) -> int:
        # The forward's arguments: saved ones as passed, the others' shapes from their gradients.
        saved = dict(zip(spec.saved, args[num_results:]))
        grads = spec.differentiable
        grad_shapes = dict(zip(grads, (out_shape,) if len(grads) == 1 else out_shape))
        forward_args = [saved[n] if n in saved else grad_shapes.get(n) for n in spec.arg_names]
        return backward_flops(*forward_args)


def reference_impl(spec: OpSpec) -> _registry.OpImpl:
    """The ``reference`` backend's implementation of ``spec``: its reference functions,
    which return their results (:attr:`~mpfast.ops._registry.OpImpl.fills` is ``False``)."""
    return _registry.OpImpl(spec.reference, spec.reference_backward, fills=False)


def _contiguous(results) -> list[torch.Tensor]:
    # The fake implementations promise contiguous results; a contiguous tensor costs nothing here.
    return [t.contiguous() for t in (results if isinstance(results, tuple) else (results,))]
