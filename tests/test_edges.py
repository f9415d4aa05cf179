"""The edges users hit: inference mode, random maps under recomputation, pickling, odd strides,
numpy scalars, warm starts, maps without forward-mode derivatives, vectorized Jacobians, and the
private torch mechanisms deqkit relies on (pinned here so a torch upgrade that moves them fails
loudly)."""

from __future__ import annotations

import ast
import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import deqkit

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def contraction(dim=4, rho=0.5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=dtype)
    return rho * w / torch.linalg.matrix_norm(w, ord=2)


class Cell(torch.nn.Module):
    def __init__(self, dim=4, rho=0.5, seed=0, dropout=None):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(dim, dim).double()
        with torch.no_grad():
            self.lin.weight.mul_(rho / float(torch.linalg.matrix_norm(self.lin.weight, ord=2)))
        self.drop = dropout if dropout is not None else torch.nn.Identity()

    def forward(self, z, x):
        return torch.tanh(self.drop(self.lin(z)) + x)


def solvers():
    return {
        "fixed_point": deqkit.FixedPoint(),
        "anderson": deqkit.Anderson(m=3),
        "broyden": deqkit.Broyden(memory=6),
        "newton_krylov": deqkit.NewtonKrylov(),
        "compiled_anderson": deqkit.compiled(deqkit.Anderson(m=3), backend="eager"),
        "torchdeq_anderson": deqkit.TorchDEQSolver("anderson", m=3),
    }


# -- inference mode -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(solvers()))
@pytest.mark.parametrize("active_set,check_every", [(False, 1), (True, 1), (False, 3), (True, 2)])
def test_inference_mode_gives_the_no_grad_values(name, active_set, check_every):
    if name.startswith("torchdeq") and active_set:
        return  # refused in every mode (test_combinations)
    solver = solvers()[name]
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(1)) * torch.tensor([[0.1], [1], [3], [0.5], [2]], dtype=F64)
    cell = Cell()
    kw = dict(inputs=(x,), solver=solver, tol=1e-9, max_steps=60, active_set=active_set, check_every=check_every, trajectory=2)
    with torch.no_grad():
        plain = deqkit.fixed_point(cell, torch.zeros(5, 4, dtype=F64), **kw)
    with torch.inference_mode():
        served = deqkit.fixed_point(cell, torch.zeros(5, 4, dtype=F64), **kw)
        assert served.value.is_inference()
    assert torch.equal(served.value, plain.value)
    assert all(torch.equal(a, b) for a, b in zip(served.trajectory, plain.trajectory))
    assert torch.equal(served.stats.steps, plain.stats.steps) and served.stats.nfev == plain.stats.nfev


def test_inference_mode_through_a_deq_model_and_every_backward_mode():
    x = torch.randn(3, 4, dtype=F64)
    for backward in (deqkit.Implicit(), deqkit.Phantom(), deqkit.Unrolled(checkpoint=True), deqkit.OneStep()):
        deq = deqkit.DEQ(Cell(), backward=backward, tol=1e-9)
        with torch.no_grad():
            plain = deq(x)
        with torch.inference_mode():
            served = deq(x)
            again = deq(x, z0=served)  # a warm start from an inference solution
        assert torch.equal(served.value, plain.value), backward
        assert again.success and int(again.stats.steps.max()) <= 2


def test_inference_mode_still_catches_an_in_place_change_of_a_tensor_made_outside_it():
    x = torch.randn(3, 4, dtype=F64)

    def f(z, x):
        x.add_(0.0)  # changes x's version: in place
        return 0.5 * z + x

    with torch.inference_mode(), pytest.raises(ValueError, match=r"changed its argument\(s\) \['inputs\[0\]'\] in place"):
        deqkit.fixed_point(f, torch.zeros(3, 4, dtype=F64), inputs=(x,))


def test_inference_mode_with_torch_compile_of_a_model():
    deq = deqkit.DEQ(Cell(), solver=deqkit.Anderson(m=3), tol=1e-9)
    model = torch.compile(deq, backend="eager")
    x = torch.randn(3, 4, dtype=F64)
    with torch.no_grad():
        plain = deq(x)
    with torch.inference_mode():
        served = model(x)
    torch.testing.assert_close(served.value, plain.value, rtol=0, atol=1e-12)


# -- random maps under recomputation ------------------------------------------------------------


def _grads(cell, x, backward, seed, **kw):
    torch.manual_seed(seed)
    sol = deqkit.fixed_point(cell, torch.zeros_like(x), inputs=(x,), backward=backward, solver=deqkit.FixedPoint(), **kw)
    loss = (sol.value * torch.linspace(-1, 1, x.numel(), dtype=F64).reshape(x.shape)).sum()
    return sol.value.detach(), torch.autograd.grad(loss, [x, *cell.parameters()])


class RandCell(Cell):
    """torch.rand inside f: a fresh draw at every call."""

    def forward(self, z, x):
        return torch.tanh(self.lin(z) * (0.5 + torch.rand_like(z)) + x)


@pytest.mark.parametrize("kind", ["dropout", "variational", "rand"])
@pytest.mark.parametrize("active_set", [False, True])
def test_checkpointed_recomputation_replays_the_forwards_randomness(kind, active_set):
    if kind == "rand":
        cell = RandCell().train()
    else:
        drop = torch.nn.Dropout(0.3) if kind == "dropout" else deqkit.nn.VariationalDropout(0.3)
        cell = Cell(dropout=drop).train()
    x = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    # a fixed number of steps (nn.Dropout and torch.rand change the map at every call), or a
    # tolerance with the active set (samples stop at different steps, f sees fewer rows)
    kw = dict(tol=None, max_steps=5) if not active_set or kind != "variational" else dict(tol=1e-10, max_steps=80)
    kw["active_set"] = active_set and kind == "variational"  # other kinds draw per call: no fixed point to stop at
    value, reference = _grads(cell, x, deqkit.Unrolled(), seed=7, **kw)
    again, got = _grads(cell, x, deqkit.Unrolled(checkpoint=True), seed=7, **kw)
    assert torch.equal(value, again)
    for r, g in zip(reference, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_a_solve_between_forward_and_backward_does_not_change_the_mask_a_recomputation_sees():
    cell = Cell(dropout=deqkit.nn.VariationalDropout(0.4)).train()
    x = torch.randn(3, 4, dtype=F64).requires_grad_(True)
    torch.manual_seed(0)
    plain = deqkit.fixed_point(cell, torch.zeros_like(x), inputs=(x,), backward=deqkit.Unrolled(), tol=None, max_steps=4)
    torch.manual_seed(0)
    ckpt = deqkit.fixed_point(cell, torch.zeros_like(x), inputs=(x,), backward=deqkit.Unrolled(checkpoint=True), tol=None, max_steps=4)
    deqkit.fixed_point(cell, torch.zeros_like(x), inputs=(x,), tol=None, max_steps=4)  # another solve, another mask
    (g_plain,) = torch.autograd.grad(plain.value.sum(), x)
    (g_ckpt,) = torch.autograd.grad(ckpt.value.sum(), x)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backward", [deqkit.Implicit(tol=1e-12, max_steps=200), deqkit.Phantom(steps=4, tau=0.7), deqkit.OneStep()])
def test_modes_that_call_f_after_the_loop_use_the_solves_mask(backward):
    cell = Cell(dropout=deqkit.nn.VariationalDropout(0.4)).train()
    x = torch.randn(3, 4, dtype=F64).requires_grad_(True)
    torch.manual_seed(3)
    sol = deqkit.fixed_point(cell, torch.zeros_like(x), inputs=(x,), backward=backward, tol=1e-12, max_steps=200)
    (got,) = torch.autograd.grad(sol.value.sum(), x)
    # the reference: the same map with the solve's mask fixed, as a plain deterministic cell
    torch.manual_seed(3)
    mask = torch.empty(3, 4, dtype=F64).bernoulli_(0.6) / 0.6
    fixed = lambda z, x: torch.tanh(cell.lin(z) * mask + x)  # noqa: E731
    ref = deqkit.fixed_point(fixed, torch.zeros_like(x), inputs=(x,), backward=backward, tol=1e-12, max_steps=200)
    (expected,) = torch.autograd.grad(ref.value.sum(), x)
    assert torch.equal(sol.value.detach(), ref.value.detach())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpointed_recomputation_replays_the_cuda_generator():
    cell = Cell(dropout=torch.nn.Dropout(0.3)).cuda().train()
    x = torch.randn(4, 4, dtype=F64, device="cuda").requires_grad_(True)
    _, reference = _grads(cell, x, deqkit.Unrolled(), seed=7, tol=None, max_steps=5)
    _, got = _grads(cell, x, deqkit.Unrolled(checkpoint=True), seed=7, tol=None, max_steps=5)
    for r, g in zip(reference, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


# -- pickling -----------------------------------------------------------------------------------


def _round_trip(obj):
    return pickle.loads(pickle.dumps(obj))


def test_every_public_record_survives_pickling():
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    sol = deqkit.fixed_point(Cell(), torch.zeros(3, 4, dtype=F64), inputs=(x,), tol=1e-9)
    sol.value.sum().backward()  # fills the BackwardLog
    assert len(sol.stats.backward) == 1
    detached = deqkit.Solution(sol.value.detach(), sol.result, sol.stats, sol.trajectory)
    back = _round_trip(detached)
    assert torch.equal(back.value, detached.value) and back.result == sol.result
    for field in ("steps", "residual", "converged", "status", "trace"):
        assert torch.equal(getattr(back.stats, field), getattr(sol.stats, field)), field
    assert (back.stats.nfev, back.stats.tol, back.stats.stop_mode) == (sol.stats.nfev, sol.stats.tol, sol.stats.stop_mode)
    assert isinstance(back.stats.backward, deqkit.BackwardLog) and back.stats.backward[0].result == sol.stats.backward[0].result
    assert _round_trip(deqkit.SolveOptions(tol=None, max_steps=3)) == deqkit.SolveOptions(tol=None, max_steps=3)
    for result in deqkit.Result:
        assert _round_trip(result) is result


def test_a_solve_error_survives_pickling_with_its_solution():
    with pytest.raises(deqkit.SolveError) as info:
        deqkit.fixed_point(lambda z: 2 * z + 1, torch.ones(2, 3), solver=deqkit.FixedPoint(), max_steps=40)
    back = _round_trip(info.value)
    assert type(back) is deqkit.SolveError and str(back) == str(info.value)
    assert back.solution.result == deqkit.Result.DIVERGED and torch.equal(back.solution.value, info.value.solution.value)


@pytest.mark.parametrize("name", list(solvers()))
def test_solvers_and_deq_models_survive_pickling(name):
    solver = solvers()[name]
    back = _round_trip(solver)
    assert back == solver and repr(back) == repr(solver)
    x = torch.randn(3, 4, dtype=F64)
    deq = deqkit.DEQ(Cell(), solver=solver, backward=deqkit.Phantom(steps=2), tol=1e-9)
    with torch.no_grad():
        before = deq(x)
        clone = _round_trip(deq)
        after = clone(x)
        copied = copy.deepcopy(deq)(x)
    assert torch.equal(after.value, before.value) and torch.equal(copied.value, before.value)
    assert clone.solver == solver and clone.backward == deq.backward and clone.options == deq.options


def test_a_pickled_compiled_solver_compiles_anew():
    solver = deqkit.compiled(deqkit.Anderson(m=3), backend="eager")
    deqkit.fixed_point(Cell(), torch.zeros(3, 4, dtype=F64), inputs=(torch.randn(3, 4, dtype=F64),), solver=solver)
    assert solver.compilations > 0
    back = _round_trip(solver)
    assert back == solver and back.compilations == 0 and not back.eager


# -- strides, numbers, warm starts --------------------------------------------------------------


def test_newton_krylov_takes_an_expanded_start_and_an_expanded_incoming_gradient():
    w = contraction()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    f = lambda z, x: torch.tanh(z @ w.T + x)  # noqa: E731
    z0 = torch.zeros(1, 4, dtype=F64).expand(3, 4)  # stride 0 in the batch dim
    sol = deqkit.fixed_point(f, z0, inputs=(x,), solver=deqkit.NewtonKrylov(), tol=1e-12)
    ref = deqkit.fixed_point(f, z0.contiguous(), inputs=(x,), solver=deqkit.NewtonKrylov(), tol=1e-12)
    assert sol.success and torch.equal(sol.value, ref.value)
    grads = []
    for solver in (deqkit.NewtonKrylov(), deqkit.Anderson()):
        x.grad = None
        sol = deqkit.fixed_point(f, torch.zeros(3, 4, dtype=F64), inputs=(x,), tol=1e-12,
                                 backward=deqkit.Implicit(solver=solver, tol=1e-12))
        sol.value.sum().backward()  # the incoming gradient is ones, expanded
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_numpy_scalars_are_numbers_everywhere():
    w = contraction()
    f = lambda z: torch.tanh(z @ w.T + 1)  # noqa: E731
    sol = deqkit.fixed_point(f, torch.zeros(2, 4, dtype=F64), tol=np.float32(1e-6), max_steps=np.int64(40),
                             divergence=np.float64(1e3), trajectory=np.int32(2), check_every=np.int64(2))
    assert sol.success and isinstance(sol.stats.tol, float) and len(sol.trajectory) == 2
    opts = deqkit.SolveOptions(tol=np.float64(1e-5), max_steps=np.int16(7))
    assert type(opts.tol) is float and type(opts.max_steps) is int and opts == deqkit.SolveOptions(tol=1e-5, max_steps=7)
    assert deqkit.Anderson(m=np.int64(3), beta=np.float32(0.5), lam=np.float64(0), restart=np.int8(5)) == deqkit.Anderson(m=3, beta=0.5, lam=0.0, restart=5.0)
    assert repr(deqkit.Broyden(memory=np.int64(4))) == "Broyden(memory=4)"
    assert deqkit.NewtonKrylov(krylov_dim=np.int64(3), krylov_rtol=np.float32(0.25)).krylov_rtol == 0.25
    assert deqkit.Phantom(steps=np.int64(2), tau=np.float64(0.5)) == deqkit.Phantom(steps=2, tau=0.5)
    assert deqkit.Implicit(tol=np.float32(1e-3), max_steps=np.int64(9)) == deqkit.Implicit(tol=float(np.float32(1e-3)), max_steps=9)
    assert deqkit.DEQ(lambda z, x: z, tol=np.float32(0.5)).options.tol == 0.5
    for bad in (True, np.bool_(True), "1e-4", torch.tensor(1e-4), float("inf")):
        with pytest.raises(ValueError, match="tol must be a finite number > 0"):
            deqkit.SolveOptions(tol=bad)
    with pytest.raises(TypeError, match="throw must be True or False, got 'false'"):
        deqkit.SolveOptions(throw="false")


def test_a_warm_start_from_another_batch_is_refused_by_name():
    deq = deqkit.DEQ(Cell(), tol=1e-9)
    sol = deq(torch.randn(3, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"warm start from a Solution of batch 3, but inputs\[0\] has batch 5"):
        deq(torch.randn(5, 4, dtype=F64), z0=sol)
    assert deq(torch.randn(3, 4, dtype=F64), z0=sol).success  # the same batch is fine


def test_unknown_option_names_the_closest_field():
    with pytest.raises(TypeError, match=r"unknown solve option 'max_step' \(did you mean 'max_steps'\?\)"):
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), max_step=3)
    with pytest.raises(TypeError, match=r"unknown solve option 'tolerance'"):
        deqkit.DEQ(lambda z, x: z, tolerance=1e-3)
    deq = deqkit.DEQ(Cell(), tol=1e-9)
    with pytest.raises(TypeError, match=r"unknown solve option 'stopmode' \(did you mean 'stop_mode'\?\)"):
        deq(torch.randn(2, 4, dtype=F64), stopmode="abs")
    with pytest.raises(TypeError, match="options must be a deqkit.SolveOptions, got dict"):
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), options={"tol": 1e-3})


@torch.no_grad()
def test_options_record_and_keyword_overrides_compose():
    opts = deqkit.SolveOptions(tol=1e-9, max_steps=7, throw=False)
    sol = deqkit.fixed_point(torch.cos, torch.zeros(2, 1, dtype=F64), solver=deqkit.FixedPoint(), options=opts)
    assert sol.result == deqkit.Result.MAX_STEPS and sol.stats.nfev == 7
    sol = deqkit.fixed_point(torch.cos, torch.zeros(2, 1, dtype=F64), solver=deqkit.FixedPoint(), options=opts, max_steps=9)
    assert sol.stats.nfev == 9 and opts.max_steps == 7
    deq = deqkit.DEQ(lambda z, x: torch.cos(z) + 0 * x, solver=deqkit.FixedPoint(), options=opts, max_steps=5)
    assert deq.options == opts.replace(max_steps=5)
    assert deq(torch.zeros(2, 1, dtype=F64), max_steps=3).stats.nfev == 3
    with pytest.raises(deqkit.SolveError):
        deqkit.DEQ(lambda z, x: torch.cos(z) + 0 * x, solver=deqkit.FixedPoint(), tol=1e-9, max_steps=3,
                   throw_on_max_steps=True)(torch.zeros(2, 1, dtype=F64))


# -- maps without forward-mode derivatives ------------------------------------------------------


class OldStyleTanh(torch.autograd.Function):  # forward(ctx, x): torch.func refuses it
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NewStyleTanh(torch.autograd.Function):  # setup_context but no jvp: NotImplementedError
    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


@pytest.mark.parametrize("fn", [OldStyleTanh, NewStyleTanh])
def test_newton_krylov_auto_falls_back_for_custom_functions_without_a_jvp(fn):
    w = contraction(rho=0.8)
    x = torch.randn(3, 4, dtype=F64)
    sol = deqkit.fixed_point(lambda z, x: fn.apply(z @ w.T + x), torch.zeros(3, 4, dtype=F64), inputs=(x,),
                             solver=deqkit.NewtonKrylov(jvp="auto"), tol=1e-7, max_steps=30)
    ref = deqkit.fixed_point(lambda z, x: torch.tanh(z @ w.T + x), torch.zeros(3, 4, dtype=F64), inputs=(x,),
                             solver=deqkit.Anderson(), tol=1e-12, max_steps=100)
    assert sol.success
    torch.testing.assert_close(sol.value, ref.value, rtol=1e-6, atol=1e-7)
    with pytest.raises((RuntimeError, NotImplementedError)):
        deqkit.fixed_point(lambda z, x: fn.apply(z @ w.T + x), torch.zeros(3, 4, dtype=F64), inputs=(x,),
                           solver=deqkit.NewtonKrylov(jvp="forward"), tol=1e-7, max_steps=30)


# -- vectorized Jacobians -----------------------------------------------------------------------


def test_vectorized_jacobian_through_implicit_names_vectorize_false():
    w = contraction()
    x = torch.randn(2, 3, dtype=F64)

    def g(x, backward):
        f = lambda z, x: torch.tanh(z @ w[:3, :3].T + x)  # noqa: E731
        return deqkit.fixed_point(f, torch.zeros(2, 3, dtype=F64), inputs=(x,), backward=backward, tol=1e-12).value

    with pytest.raises(RuntimeError, match=r"vectorize=False"):
        torch.autograd.functional.jacobian(lambda x: g(x, deqkit.Implicit(tol=1e-12)), x, vectorize=True)
    exact = torch.autograd.functional.jacobian(lambda x: g(x, deqkit.Implicit(tol=1e-12)), x, vectorize=False)
    unrolled = torch.autograd.functional.jacobian(
        lambda x: deqkit.fixed_point(lambda z, x: torch.tanh(z @ w[:3, :3].T + x), torch.zeros(2, 3, dtype=F64),
                                     inputs=(x,), backward=deqkit.Unrolled(), tol=None, max_steps=80).value, x, vectorize=True)
    torch.testing.assert_close(unrolled, exact, rtol=1e-9, atol=1e-11)


# -- the private torch mechanisms deqkit relies on ----------------------------------------------


def test_the_private_torch_apis_deqkit_uses_are_where_it_expects_them():
    from torch.nn.utils import parametrize

    from deqkit import _parametrize
    from deqkit._context import under_functorch

    lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 3))
    assert _parametrize.live_cache() is None
    with _parametrize.solve_cache():
        cache = _parametrize.live_cache()
        w = lin.weight
        assert isinstance(cache, dict) and len(cache) == 1 and lin.weight is w
    assert _parametrize.live_cache() is None and parametrize._cache_enabled == 0
    with _parametrize.Reuse(cache):  # a recomputation reads the very tensor the solve cached
        assert lin.weight is w
        with _parametrize.Reuse(cache):
            assert lin.weight is w
    assert parametrize._cache_enabled == 0 and lin.weight is not w
    # the two kinds of vmap the adjoint must recognise
    from torch._vmap_internals import _vmap

    seen = []
    _vmap(lambda t: seen.append(under_functorch(t)) or t, 0, 0)(torch.ones(2, 2))
    torch.func.vmap(lambda t: seen.append(under_functorch(t)) or t)(torch.ones(2, 2))
    assert seen == [True, True] and not under_functorch(torch.ones(2))


# -- structure ----------------------------------------------------------------------------------


def _module_imports(path: Path, package: str) -> set[str]:
    """deqkit modules ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            found.update(names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deqkit"):
            found.add(node.module)
    return found


def test_the_core_imports_in_no_cycle():
    core = ROOT / "deqkit"
    modules = {}
    for path in core.rglob("*.py"):
        if "compat" in path.parts:
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        name = name.removesuffix(".__init__")
        modules[name] = _module_imports(path, package)
    graph = {m: {d for d in deps if d in modules and d != m and not m.startswith(d + ".")} for m, deps in modules.items()}
    for m in graph:  # package __init__ files re-export their modules: not edges back into the package
        graph[m] = {d for d in graph[m] if not (m.startswith(d) or d in ("deqkit", "deqkit.solvers") and m.startswith(d + "."))}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, d])}")
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "deqkit._options" in graph and "deqkit._backward" not in graph["deqkit._options"]


def test_solver_hooks_have_defaults_on_the_base_class():
    class Plain(deqkit.AbstractSolver):
        def step(self, z, fz, state, problem):
            return fz, state

    plain = Plain()
    assert plain.differentiable and not plain.selects_rows and not plain.own_loop and plain.init(None, None, None) is None
    with pytest.raises(NotImplementedError, match="Plain cannot select rows"):
        plain.select(None, torch.tensor([0]))
    assert deqkit.Anderson().selects_rows and not deqkit.Anderson().own_loop
    assert deqkit.TorchDEQSolver("anderson").own_loop and not deqkit.NewtonKrylov().differentiable
    sol = deqkit.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(3, 2), solver=plain, active_set=True, tol=1e-6)
    assert sol.success


# -- properties no test checked before ----------------------------------------------------------


@pytest.mark.parametrize("solver", [deqkit.FixedPoint(), deqkit.Anderson(m=3), deqkit.Broyden(memory=4)], ids=repr)
@pytest.mark.parametrize("failure", ["nonfinite", "diverged"])
@pytest.mark.parametrize("active_set", [False, True])
def test_with_tol_none_a_failing_neighbour_changes_nothing_for_the_others(solver, failure, active_set):
    w = contraction(rho=0.7)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    bad = torch.tensor([[0.0], [1.0], [0.0]], dtype=F64)  # the middle sample fails at its third call

    def f(z, x, bad, calls=[0]):  # noqa: B006
        calls[0] += 1
        out = torch.tanh(z @ w.T + x)
        if failure == "nonfinite":
            return torch.where((bad > 0) & (z.abs().sum(dim=1, keepdim=True) > 0.5), torch.nan, out)
        return out + bad * 1e3 * z.abs().sum(dim=1, keepdim=True) ** 3  # grows without bound

    kw = dict(solver=solver, tol=None, max_steps=8, throw=False, active_set=active_set, trajectory=2)
    failing = deqkit.fixed_point(f, torch.zeros(3, 4, dtype=F64), inputs=(x, bad), **kw)
    healthy = deqkit.fixed_point(f, torch.zeros(3, 4, dtype=F64), inputs=(x, 0 * bad), **kw)  # same batch, no failure
    assert failing.stats.status[1] == (deqkit.Result.NONFINITE if failure == "nonfinite" else deqkit.Result.DIVERGED)
    assert healthy.success
    for i in (0, 2):  # the others: the same iterates, bit for bit
        assert torch.equal(failing.value[i], healthy.value[i]), i
        assert int(failing.stats.steps[i]) == int(healthy.stats.steps[i]) == 8
        assert torch.equal(failing.stats.trace[i], healthy.stats.trace[i])
        assert all(torch.equal(a[i], b[i]) for a, b in zip(failing.trajectory, healthy.trajectory))


@pytest.mark.parametrize("backward,calls", [(deqkit.OneStep(), 1), (deqkit.Phantom(steps=3), 3), (deqkit.Implicit(), 1)],
                         ids=["one_step", "phantom", "implicit"])
def test_attach_bookkeeping(backward, calls):
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    cell = Cell()
    sol = deqkit.fixed_point(cell, torch.zeros(3, 4, dtype=F64), inputs=(x,), backward=backward, tol=None,
                             max_steps=6, trajectory=3)
    # the value is the last kept iterate: one tensor, one graph
    assert sol.value is sol.trajectory[-1]
    # each call of f counted once: 6 forward, then the mode's calls for 3 distinct iterates
    assert sol.stats.nfev == 6 + 3 * calls and sol.stats.sample_evals == 3 * sol.stats.nfev
    # one backward record per backward pass through an implicit solve, however many outputs
    (sol.value.sum() + sol.trajectory[-1].sum()).backward()
    assert len(sol.stats.backward) == (1 if isinstance(backward, deqkit.Implicit) else 0)
    sol.trajectory[0].sum().backward()
    assert len(sol.stats.backward) == (2 if isinstance(backward, deqkit.Implicit) else 0)


def test_a_compiled_step_at_the_recompile_limit_falls_back_once_with_a_warning():
    import warnings

    solver = deqkit.compiled(deqkit.Anderson(m=2), backend="eager", dynamic=False)
    w = contraction(dim=3)
    plain = deqkit.Anderson(m=2)
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
        with pytest.warns(RuntimeWarning, match=r"compiled 2 times, torch's limit") as record:
            for batch in (2, 3, 4, 5, 6):  # a new shape each solve: a new graph each
                z0 = torch.zeros(batch, 3, dtype=F64)
                got = deqkit.fixed_point(lambda z: torch.tanh(z @ w.T + 1), z0, solver=solver, tol=None, max_steps=4)
                want = deqkit.fixed_point(lambda z: torch.tanh(z @ w.T + 1), z0, solver=plain, tol=None, max_steps=4)
                torch.testing.assert_close(got.value, want.value, rtol=0, atol=1e-12)
    assert solver.eager and "torch's limit" in solver.why_eager
    assert sum("runs eagerly" in str(r.message) for r in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning once eager
        deqkit.fixed_point(lambda z: torch.tanh(z @ w.T + 1), torch.zeros(7, 3, dtype=F64), solver=solver, tol=None, max_steps=4)


def test_two_variational_dropouts_in_one_map_keep_a_mask_each():
    torch.manual_seed(0)
    a, b = deqkit.nn.VariationalDropout(0.5).train(), deqkit.nn.VariationalDropout(0.5).train()
    x = torch.randn(3, 8, dtype=F64)
    sol = deqkit.fixed_point(lambda z, x: 0.3 * a(torch.tanh(z)) + 0.2 * b(torch.tanh(z)) + x, torch.zeros(3, 8, dtype=F64),
                             inputs=(x,), solver=deqkit.FixedPoint(), tol=1e-10, max_steps=200)
    assert sol.success  # one mask each for the whole solve: the map stays fixed


def test_divergence_is_judged_after_a_compaction_too():
    # four samples stop early (compaction), one diverges later: DIVERGED against its own first residual
    x = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0]], dtype=F64) * torch.ones(5, 3, dtype=F64)
    grow = torch.tensor([[0.0], [0.0], [0.0], [0.0], [1.0]], dtype=F64)
    f = lambda z, x, g: torch.where(g > 0, 3.0 * z + 1.0, 0.1 * z + x)  # noqa: E731
    steps = []
    for active_set in (False, True):
        sol = deqkit.fixed_point(f, torch.zeros(5, 3, dtype=F64), inputs=(x, grow), solver=deqkit.FixedPoint(), tol=1e-8,
                                 max_steps=60, active_set=active_set, throw=False)
        assert sol.stats.status.tolist() == [0, 0, 0, 0, int(deqkit.Result.DIVERGED)], active_set
        steps.append(int(sol.stats.steps[4]))
    assert steps[0] == steps[1] < 20  # the compaction keeps the diverging sample's first residual as its reference


def test_a_duck_typed_solver_gets_its_arguments_and_may_run_a_loop_of_its_own():
    """A solver object that does not derive from AbstractSolver: ``init`` gets the start, its
    image and the problem; a ``run`` of its own is called with the problem, the start and the
    options, and its record is the solve's."""
    def f(z):
        return 0.5 * torch.cos(z)

    class Stepping:
        def __init__(self):
            self.first = None

        def init(self, z, fz, problem):
            self.first = (z.clone(), fz.clone(), problem.f(z))
            return None

        def step(self, z, fz, state, problem):
            return fz, state

    class Delegating(Stepping):
        def __init__(self):
            super().__init__()
            self.seen = []

        def run(self, problem, z0, options):
            self.seen.append((problem.f(z0), z0, options))
            return deqkit.Anderson(m=3).run(problem, z0, options)

    z0 = torch.full((2, 3), 0.25, dtype=torch.float64)
    stepping = Stepping()
    deqkit.fixed_point(f, z0, solver=stepping, tol=1e-8, max_steps=60)
    z, fz, again = stepping.first
    assert torch.equal(z, z0) and torch.equal(fz, f(z0)) and torch.equal(again, f(z0))
    delegating = Delegating()
    sol = deqkit.fixed_point(f, z0, solver=delegating, tol=1e-10, max_steps=40)
    ref = deqkit.fixed_point(f, z0, solver=deqkit.Anderson(m=3), tol=1e-10, max_steps=40)
    assert torch.equal(sol.value, ref.value) and sol.stats.nfev == ref.stats.nfev + 1  # its own call counts too
    ((image, start, options),) = delegating.seen
    assert torch.equal(start, z0) and torch.equal(image, f(z0)) and (options.tol, options.max_steps) == (1e-10, 40)
