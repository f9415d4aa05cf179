"""``compiled``: a solver whose step runs through ``torch.compile``, with a fallback to eager.

The shared loop stays in Python (its stopping rule reads residual norms on the host); only the
solver's arithmetic between two calls of f is compiled, as one graph per solver. A step that
needs the map itself (``problem.f`` or ``problem.jvp``, as ``NewtonKrylov``'s GMRES does), or
that torch cannot compile, runs eagerly from then on, after one warning that says why.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._numerics import work_dtype
from .solvers._base import AbstractSolver, as_solver


class _MapCalled(Exception):
    """Raised inside a compiled step that calls the map: the step must run eagerly."""


class _StepView:
    """What a compiled step sees of the problem: the loop's residual and the active mask.

    ``residual(z, fz)`` returns the loop's own ``(f(z) - z, ||f(z) - z||)`` when it had them
    (the tensors the eager step would have read), else computes them; ``f`` and ``jvp`` are not
    available inside a compiled step and raise, which sends the step back to eager.
    """

    def __init__(self, active: Optional[Tensor], g: Optional[Tensor], norm: Optional[Tensor]):
        self.active = active
        self._g = g
        self._norm = norm

    def residual(self, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
        if self._g is not None and self._norm is not None:
            return self._g, self._norm
        b, dt = z.shape[0], work_dtype(z.dtype)
        g = fz.reshape(b, -1).to(dt) - z.reshape(b, -1).to(dt)
        return g, torch.linalg.vector_norm(g, dim=1)

    def f(self, z: Tensor) -> Tensor:
        raise _MapCalled("the step calls problem.f (the map itself), which a compiled step cannot")

    def jvp(self, *args: Any, **kwargs: Any) -> Tensor:
        raise _MapCalled("the step calls problem.jvp (a product with the map's Jacobian), which a compiled step cannot")


class _Runtime:
    """The compiled step of one (solver, compile options) pair, and whether it fell back to eager.

    torch keeps compiled graphs, and counts recompilations against its limit, per code object:
    each runtime compiles a function with a code object of its own, so one solver's graphs never
    evict another's, and its cache entries are its compilations.
    """

    def __init__(self, solver: AbstractSolver, compile_kwargs: dict[str, Any]):
        self.solver = solver
        self.why_eager: Optional[str] = None
        self.graphs_seen = -1  # torch's count of graphs compiled (all functions) at the last check
        step = _step_of(solver)
        name = f"deqkit_compiled_{type(solver).__name__}_step"
        names: dict[str, Any] = {"co_name": name}
        if sys.version_info >= (3, 11):
            names["co_qualname"] = name
        self.code = step.__code__.replace(**names)  # a new code object: a cache of its own
        step.__code__ = self.code
        with warnings.catch_warnings():  # the first torch.compile imports the compiler
            _quiet_compiler()
            self.fn: Callable[..., tuple[Tensor, Any]] = torch.compile(step, **compile_kwargs)

    def compilations(self) -> int:
        """How many graphs torch holds for this step (its cache entries)."""
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self.code))

    def fall_back(self, why: str) -> None:
        self.why_eager = why
        warnings.warn(f"deqkit.compiled({self.solver!r}): the step runs eagerly from now on: {why}",
                      RuntimeWarning, stacklevel=4)


def _step_of(solver: AbstractSolver) -> Callable[..., tuple[Tensor, Any]]:
    """The step as a function of tensors (and the state's own python values), ``solver`` fixed."""

    def step(z: Tensor, fz: Tensor, state: Any, g: Optional[Tensor], norm: Optional[Tensor],
             active: Optional[Tensor]) -> tuple[Tensor, Any]:
        return solver.step(z, fz, state, _StepView(active, g, norm))

    return step


@dataclasses.dataclass(frozen=True)
class Compiled(AbstractSolver):
    """A solver whose step runs compiled: what ``deqkit.compiled(solver, **options)`` returns.

    A frozen record like every solver (``solver`` and the ``torch.compile`` options), which
    owns its runtime: the compiled step, and whether it has fallen back to eager. Records compare
    equal by their fields, but each keeps its own runtime (one falling back never switches
    another); a copy (``copy.deepcopy``, a pickle round trip, ``torch.save`` of a model holding
    it) is a new record that compiles anew. ``init`` and ``select`` are the solver's own, eager.
    ``compilations`` counts the graphs compiled for the step so far; ``eager`` tells whether it
    has fallen back, and ``why_eager`` why.
    """

    solver: Any
    options: tuple[tuple[str, Any], ...] = ()
    _rt: _Runtime = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rt", _Runtime(as_solver(self.solver), dict(self.options)))

    def __reduce__(self) -> tuple[Any, ...]:  # the record, not its compiled runtime
        return (Compiled, (self.solver, self.options))

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        """The solver's own: whether ``Unrolled`` can differentiate through its steps."""
        return self._rt.solver.differentiable

    @property
    def why_not_differentiable(self) -> str:  # type: ignore[override]
        """The solver's own reason, when ``Unrolled`` cannot differentiate through its steps."""
        return self._rt.solver.why_not_differentiable

    @property
    def eager(self) -> bool:
        """True once the step has fallen back to eager (``why_eager`` says why)."""
        return self._rt.why_eager is not None

    @property
    def why_eager(self) -> Optional[str]:
        """Why the step runs eagerly (None while it runs compiled)."""
        return self._rt.why_eager

    @property
    def compilations(self) -> int:
        """Graphs compiled so far for this step (recompilations included)."""
        return self._rt.compilations()

    def init(self, z: Tensor, fz: Tensor, problem: Any) -> Any:
        return self._rt.solver.init(z, fz, problem)

    def select(self, state: Any, rows: Tensor) -> Any:
        return self._rt.solver.select(state, rows)

    @property
    def selects_rows(self) -> bool:
        """The solver's own: whether the active set can compact its state."""
        return self._rt.solver.selects_rows

    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:
        rt = self._rt
        if rt.why_eager is not None or torch.compiler.is_compiling():
            return self._rt.solver.step(z, fz, state, problem)
        g, norm = problem.residual(z, fz)
        graph = torch.is_grad_enabled() and _records(z, fz, state)
        try:
            with warnings.catch_warnings():
                _quiet_compiler()
                if graph:  # the backward compiled now, inside these filters, not at the first backward
                    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                        out = rt.fn(z, fz, state, g, norm, problem.active)
                    out = (_FirstOrderOnly.apply(out[0], self), out[1])  # type: ignore[no-untyped-call]
                else:
                    out = rt.fn(z, fz, state, g, norm, problem.active)
        except _MapCalled as err:
            rt.fall_back(str(err))
        except torch._dynamo.exc.TorchDynamoException as err:
            rt.fall_back(f"torch.compile failed ({_describe(err)})")
        else:
            seen = _graphs_compiled()
            if seen == rt.graphs_seen:  # nothing compiled since the last check: no cache to count
                return out
            rt.graphs_seen = seen
            graphs = rt.compilations()
            if 0 < graphs < _recompile_limit():
                return out
            if graphs == 0:  # torch found no tensor operation: calling it only adds its overhead
                rt.fall_back("the step has no tensor operations for torch.compile to compile "
                             "(it returns its inputs as they are, as FixedPoint() does)")
            else:
                rt.fall_back(f"it was compiled {graphs} times, torch's limit for one function "
                             f"(torch._dynamo.config.recompile_limit = {_recompile_limit()}): each new shape, dtype "
                             "or python value in the state it specialises on compiles it anew (pass dynamic=True "
                             "to deqkit.compiled for symbolic shapes and ints)")
            return out
        return self._rt.solver.step(z, fz, state, problem)


def _records(z: Tensor, fz: Tensor, state: Any) -> bool:
    """True when autograd records the step: z, f(z) or a tensor of the state requires grad."""
    if z.requires_grad or fz.requires_grad:
        return True
    leaves = state if isinstance(state, (tuple, list)) else (state,)
    return any(isinstance(t, Tensor) and t.requires_grad for t in leaves)


def _quiet_compiler() -> None:
    """Inside ``warnings.catch_warnings()``: ignore what the compiler says while it compiles.

    Compiling imports and runs torch's own code, which warns about itself (deprecations,
    internal notices): nothing the user can act on, and with warnings turned into errors it
    would fail every compilation. Warnings from code outside torch still reach the caller.
    """
    warnings.filterwarnings("ignore", module=r"torch(\.|$)")


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a compiled step's output. Its backward refuses, with a message naming the
    fix, what a compiled graph cannot do: second derivatives (``create_graph=True``) and, while
    torch donates the step's saved buffers, a second backward pass (``retain_graph=True``)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, solver: Any) -> Tensor:
        ctx.solver = solver
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"second derivatives through {ctx.solver!r} are not supported (a backward pass with "
                "create_graph=True reached a compiled solver step): torch.compile's graphs give first "
                f"derivatives only. Use the plain solver, {ctx.solver.solver!r}, where higher-order gradients "
                "are needed (backward=Unrolled() is exact through its steps)."
            )
        if torch._functorch.config.donated_buffer and torch._C._autograd._get_current_graph_task_keep_graph():
            raise RuntimeError(
                f"backward(retain_graph=True) through {ctx.solver!r}: torch.compile frees the compiled step's "
                "saved buffers in the first backward pass (donated buffers). Set "
                "torch._functorch.config.donated_buffer = False before the first compiled step to keep them, "
                f"or use the plain solver, {ctx.solver.solver!r}."
            )
        return grad, None


def _graphs_compiled() -> int:
    """torch's running count of graphs compiled in this process, any function's (a dict lookup)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _describe(err: BaseException) -> str:
    """The error's type and first line, and those of the error it wraps (a backend's own)."""
    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"

    inner = getattr(err, "inner_exception", None) or err.__cause__
    return line(err) if inner is None else f"{line(err)} {line(inner)}"


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def compiled(solver: Any, **compile_kwargs: Any) -> Compiled:
    """``solver`` with its step compiled by ``torch.compile(**compile_kwargs)``, eager as a fallback.

    The shared loop, f and the backward mode are untouched: only the solver's own arithmetic
    between two calls of f (Anderson's least squares and mixing, Broyden's low-rank updates)
    runs as a compiled graph. It pays where that arithmetic is a large part of a solve: a
    cheap f, many steps, a GPU where the step's many small kernels fuse. Measure it
    (``benchmarks/compile.py``, docs/compile.md): on the CPU the gain is small or none, and
    every new graph costs seconds to compile.

    The values are the plain solver's to float tolerance (the compiler may reorder sums).
    Recompilation is bounded, not one per step: torch makes a python int of the state that
    changes (Anderson's step count, whose slot is ``n_steps % m``; Broyden's fill count)
    symbolic at its first change, so Anderson compiles 2 or 3 graphs and Broyden 4 or 5 per
    input shape; a second shape (a new batch size, or the active set shrinking the batch)
    compiles them once more with symbolic shapes. ``dynamic=True`` makes shapes and ints
    symbolic from the start (Anderson 1 graph, Broyden 4, whatever the shapes), at the cost of
    slower kernels (measured in docs/compile.md).

    It falls back to the plain step, for good and after one ``RuntimeWarning`` that says why,
    when torch cannot compile the step, when the step calls the map (``problem.f`` or
    ``problem.jvp``, as ``NewtonKrylov`` does: refused inside a compiled graph), when the step
    has nothing to compile (``FixedPoint()`` returns f(z) as it is), or when torch's limit on
    recompilations is reached. Inside a model compiled whole (``torch.compile(model)``) the
    step is left to the outer compilation.

    Under autograd (``backward=Unrolled()``) the compiled step records its graph: first
    derivatives equal the plain solver's; second derivatives (``create_graph=True``), and a
    second backward pass (``retain_graph=True``) while torch donates saved buffers, are
    refused with an error naming the fix.

    Args:
        solver: a solver with ``init``/``step`` (not one with its own loop, such as
            ``TorchDEQSolver``: refused).
        **compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``,
            ``fullgraph``, ``options``).

    Example:
        >>> import torch, deqkit
        >>> solver = deqkit.compiled(deqkit.Anderson(m=5), backend="eager")  # default: inductor
        >>> f = lambda z: 0.5 * torch.tanh(z) + 1
        >>> sol = deqkit.fixed_point(f, torch.zeros(4, 3), solver=solver, tol=1e-6)
        >>> plain = deqkit.fixed_point(f, torch.zeros(4, 3), solver=deqkit.Anderson(m=5), tol=1e-6)
        >>> torch.allclose(sol.value, plain.value), solver.compilations > 0, solver.eager
        (True, True, False)
    """
    if as_solver(solver).own_loop:
        raise ValueError(f"deqkit.compiled cannot compile {solver!r}: it runs a loop of its own (a run() hook), not steps")
    if isinstance(solver, Compiled):
        raise ValueError(f"{solver!r} is compiled already")
    return Compiled(solver, tuple(sorted(compile_kwargs.items())))
