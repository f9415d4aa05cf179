"""The composition contract, one test (or a few) per defect it once had.

Each test here failed on deqkit before the solve/backward seam was redesigned; the numbers in
the comments are what the old code returned.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import deqkit

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tanh_map(dim=16, batch=4, rho=0.9, seed=0, dtype=F64):
    w = torch.randn(dim, dim, generator=gen(seed), dtype=dtype)
    w = (rho * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_(True)
    x = torch.randn(batch, dim, generator=gen(seed + 1), dtype=dtype).requires_grad_(True)

    def f(z, x):
        return torch.tanh(z @ w.T + x)

    return f, x, w


ALL_MODES = [
    deqkit.Implicit(tol=1e-10, max_steps=200),
    deqkit.Phantom(steps=3, tau=0.5),
    deqkit.Phantom(steps=2, tau=1.0),
    deqkit.Unrolled(),
    deqkit.Unrolled(checkpoint=True),
    deqkit.OneStep(),
]


# -- 1. the value never depends on grad mode ---------------------------------------------------

@pytest.mark.parametrize("backward", ALL_MODES, ids=repr)
def test_value_is_the_same_with_and_without_autograd(backward):
    f, x, w = tanh_map()
    kw = dict(inputs=(x,), solver=deqkit.Anderson(m=3), backward=backward, tol=1e-12, max_steps=5, trajectory=3, throw=False)
    z0 = torch.zeros(4, 16, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        live = deqkit.fixed_point(f, z0, **kw)
        with torch.no_grad():
            plain = deqkit.fixed_point(f, z0, **kw)
    assert live.value.requires_grad
    assert torch.equal(live.value.detach(), plain.value)  # Phantom(3) once differed by 0.015 here
    assert len(live.trajectory) == 3
    assert all(torch.equal(a.detach(), b) for a, b in zip(live.trajectory, plain.trajectory))


# -- 2. every trajectory tensor carries the gradient ------------------------------------------

class MLPCell(torch.nn.Module):
    def __init__(self, dim=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(dim, dim).double()
        self.b = torch.nn.Linear(dim, dim).double()
        with torch.no_grad():
            self.a.weight.mul_(0.3)
            self.b.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.b(torch.tanh(self.a(z))) + x)


@pytest.mark.parametrize("backward", [deqkit.Implicit(), deqkit.OneStep(), deqkit.Phantom(steps=2)], ids=repr)
def test_fixed_point_correction_trains_every_parameter_under_every_mode(backward):
    cell = MLPCell()
    x = torch.randn(3, 6, dtype=F64, generator=gen(4))
    sol = deqkit.fixed_point(cell, torch.zeros(3, 6, dtype=F64), inputs=(x,), solver=deqkit.FixedPoint(),
                             backward=backward, tol=1e-8, max_steps=100, trajectory=4)
    assert len(sol.trajectory) == 4 and all(t.requires_grad for t in sol.trajectory)
    # a loss on the early iterates only: before, they had no graph and nothing trained
    loss = deqkit.fp_correction(lambda z: z.square().mean(), sol.trajectory[:2])
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in cell.parameters())


# -- 3. Unrolled(checkpoint=True) with normalised weights ----------------------------------------

@pytest.mark.parametrize("kind", ["weight", "spectral"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_checkpointed_unrolling_through_normalised_weights_equals_plain_unrolling(kind, train):
    torch.manual_seed(0)
    cell = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()).double().train(train)
    deqkit.nn.apply_norm(cell, kind)
    x = torch.randn(3, 6, dtype=F64)

    def f(z, x):
        return 0.5 * cell(z) + x

    state = {k: v.clone() for k, v in cell.state_dict().items()}
    results = []
    for checkpoint in (False, True):
        cell.load_state_dict(state)  # the same power-iteration vectors for spectral norm
        sol = deqkit.fixed_point(f, torch.zeros(3, 6, dtype=F64), inputs=(x,), solver=deqkit.Anderson(m=3),
                                 backward=deqkit.Unrolled(checkpoint=checkpoint), tol=None, max_steps=5)
        grads = torch.autograd.grad(sol.value.square().sum(), list(cell.parameters()))  # used to raise CheckpointError
        results.append((sol.value.detach(), grads))
    (v0, g0), (v1, g1) = results
    assert torch.equal(v0, v1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_checkpointing_recomputes_f_in_backward():
    calls = []
    f0, x, w = tanh_map(dim=4, batch=2)

    def f(z, x):
        calls.append(torch.is_grad_enabled())
        return f0(z, x)

    for checkpoint, extra in ((False, 0), (True, 4)):  # five calls; all but the first are recomputed
        calls.clear()
        sol = deqkit.fixed_point(f, torch.zeros(2, 4, dtype=F64), inputs=(x,), solver=deqkit.FixedPoint(),
                                 backward=deqkit.Unrolled(checkpoint=checkpoint), tol=None, max_steps=5)
        forward_calls = len(calls)
        sol.value.sum().backward()
        assert forward_calls == 5 and len(calls) - forward_calls == extra


# -- 4. TorchDEQSolver is faithful or refuses ----------------------------------------------------

torchdeq = pytest.importorskip("torchdeq")


@pytest.mark.parametrize("name", ["anderson", "broyden", "fixed_point_iter"])
def test_torchdeq_adapter_returns_torchdeqs_own_iterate(name):
    f, x, w = tanh_map(dim=8, batch=3, rho=0.8)
    z0 = torch.zeros(3, 8, dtype=F64)
    with torch.no_grad():
        ref, _, info = torchdeq.solver.get_solver(name)(lambda z: f(z, x), z0, max_iter=30, tol=1e-6, stop_mode="rel")
        sol = deqkit.fixed_point(f, z0, inputs=(x,), solver=deqkit.TorchDEQSolver(name), tol=1e-6, max_steps=30)
    assert torch.equal(sol.value, ref.reshape(z0.shape))  # not one map application more
    assert torch.equal(sol.stats.residual, info["rel_lowest"].reshape(-1).to(sol.stats.residual.dtype))


def test_torchdeq_adapter_gradients_and_trajectory_follow_the_backward_mode():
    f, x, w = tanh_map(dim=8, batch=3, rho=0.8)
    z0 = torch.zeros(3, 8, dtype=F64)
    native = deqkit.fixed_point(f, z0, inputs=(x,), solver=deqkit.Anderson(), tol=1e-10, max_steps=100,
                                backward=deqkit.Implicit(tol=1e-10))
    (g_native,) = torch.autograd.grad(native.value.sum(), w)
    adapted = deqkit.fixed_point(f, z0, inputs=(x,), solver=deqkit.TorchDEQSolver("anderson"), tol=1e-10, max_steps=100,
                                 backward=deqkit.Implicit(solver=deqkit.TorchDEQSolver("broyden"), tol=1e-10), trajectory=2)
    assert len(adapted.trajectory) == 2 and all(t.requires_grad for t in adapted.trajectory)
    (g_adapted,) = torch.autograd.grad(adapted.value.sum(), w)
    torch.testing.assert_close(g_adapted, g_native, rtol=1e-6, atol=1e-9)
    assert adapted.stats.backward[0].result == deqkit.Result.SUCCESS


def test_torchdeq_adapter_refuses_what_it_cannot_honour():
    f, x, _ = tanh_map(dim=4, batch=2)
    z0 = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"Unrolled\(\) cannot differentiate through TorchDEQSolver"):
        deqkit.fixed_point(f, z0, inputs=(x,), solver=deqkit.TorchDEQSolver("anderson"), backward=deqkit.Unrolled())
    with pytest.raises(ValueError, match="cannot run with active_set=True"):
        deqkit.fixed_point(f, z0, inputs=(x,), solver=deqkit.TorchDEQSolver("anderson"), active_set=True)


# -- 5. NewtonKrylov keeps samples apart ---------------------------------------------------------

def test_newton_krylov_sample_is_the_same_alone_and_in_a_batch():
    # GMRES used to iterate every sample until all met krylov_rtol: an easy sample batched with a
    # hard one took more exact Newton steps (7 instead of 10 iterations, another trace)
    torch.manual_seed(0)
    w = 0.9 * torch.linalg.qr(torch.randn(8, 8, dtype=F64))[0]
    b = torch.randn(2, 8, dtype=F64)
    s = torch.tensor([[0.3], [2.0]], dtype=F64)  # sample 0 mild, sample 1 needs many Krylov vectors

    def f(z, b, s):
        return torch.tanh(s * (z @ w.T) + b)

    kw = dict(solver=deqkit.NewtonKrylov(krylov_rtol=0.3), tol=1e-8, max_steps=50, throw=False)
    both = deqkit.fixed_point(f, torch.zeros(2, 8, dtype=F64), inputs=(b, s), **kw)
    for i in range(2):
        alone = deqkit.fixed_point(f, torch.zeros(1, 8, dtype=F64), inputs=(b[i:i + 1], s[i:i + 1]), **kw)
        assert alone.result == deqkit.Result.SUCCESS and int(both.stats.status[i]) == int(deqkit.Result.SUCCESS)
        assert int(both.stats.steps[i]) == int(alone.stats.steps[0])
        n = int(alone.stats.steps[0])
        torch.testing.assert_close(both.stats.trace[i, :n], alone.stats.trace[0, :n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(both.value[i:i + 1], alone.value, rtol=1e-12, atol=1e-14)


def test_newton_krylov_breakdown_of_one_sample_leaves_it_finite():
    # sample 0's Krylov space is invariant after one vector (a multiple of the identity): its later
    # basis vectors would be round-off divided by round-off
    a = 0.5 * torch.eye(6, dtype=F64)
    w = 0.9 * torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=gen(2)))[0]
    b = torch.randn(2, 6, dtype=F64, generator=gen(3))
    c = torch.tensor([[1.0], [0.0]], dtype=F64)

    def f(z, b, c):
        return c * (z @ a.T + b) + (1 - c) * torch.tanh(2.0 * z @ w.T + b)

    sol = deqkit.fixed_point(f, torch.zeros(2, 6, dtype=F64), inputs=(b, c), solver=deqkit.NewtonKrylov(krylov_rtol=1e-12),
                             tol=1e-10, max_steps=30)
    assert sol.success and int(sol.stats.steps[0]) == 2  # one exact Newton step, then the check
    torch.testing.assert_close(sol.value[0], 2 * b[0], rtol=1e-12, atol=1e-12)


# -- 6. overflow is not convergence --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_overflowing_map_never_reports_success(dtype):
    sol = deqkit.fixed_point(lambda z: 2 * z + 1e16, torch.zeros(2, 4, dtype=dtype), solver=deqkit.FixedPoint(), throw=False)
    assert sol.result == deqkit.Result.DIVERGED  # was SUCCESS with residual 0 and value 1e19
    sol = deqkit.fixed_point(lambda z: 2 * z + 1, torch.zeros(2, 4, dtype=dtype), solver=deqkit.FixedPoint(),
                             divergence=None, max_steps=64, throw=False)
    assert sol.result == deqkit.Result.MAX_STEPS and bool((sol.stats.residual > 0.4).all())  # was SUCCESS
    if dtype == torch.float32:  # runs into float32's range: Inf is NONFINITE, never a zero residual
        sol = deqkit.fixed_point(lambda z: 2 * z + 1, torch.zeros(2, 4, dtype=dtype), solver=deqkit.FixedPoint(),
                                 divergence=None, max_steps=300, throw=False)
        assert sol.result == deqkit.Result.NONFINITE and bool(torch.isfinite(sol.value).all())


def test_large_but_finite_residuals_are_measured_not_overflowed():
    z0 = torch.zeros(1, 4)
    sol = deqkit.fixed_point(lambda z: 0.5 * z + 3e30, z0, solver=deqkit.FixedPoint(), tol=1e-6, max_steps=200, stop_mode="rel")
    assert sol.success
    torch.testing.assert_close(sol.value, torch.full((1, 4), 6e30), rtol=1e-5, atol=0)
    assert math.isfinite(float(deqkit._numerics.scaled_norm(torch.full((1, 4), 3e38)).item()))
    assert math.isnan(float(deqkit._numerics.scaled_norm(torch.tensor([[1.0, float("inf")]])).item()))
    # and no underflow either: entries far below 1 are scaled up before they are squared
    tiny = deqkit._numerics.scaled_norm(torch.full((1, 4), 1e-200, dtype=torch.float64))
    assert float(tiny.item()) == pytest.approx(2e-200, rel=1e-12)


# -- 7. second derivatives: exact or refused ------------------------------------------------------

def _closed_form(x):
    """z = tanh(0.5 z + x): z, dz/dx, d2z/dx2 (by implicit differentiation)."""
    z = torch.zeros_like(x)
    for _ in range(200):
        z = torch.tanh(0.5 * z + x)
    s = 1 - z ** 2
    d1 = s / (1 - 0.5 * s)
    d2 = -2 * z * d1 / (1 - 0.5 * s) ** 2
    return z, d1, d2


@pytest.mark.parametrize("backward", [deqkit.Unrolled(), deqkit.Unrolled(checkpoint=True)], ids=repr)
def test_second_derivative_through_unrolling_matches_the_closed_form(backward):
    x = torch.linspace(-1, 1, 5, dtype=F64).reshape(5, 1).requires_grad_(True)
    sol = deqkit.fixed_point(lambda z, x: torch.tanh(0.5 * z + x), torch.zeros(5, 1, dtype=F64), inputs=(x,),
                             solver=deqkit.FixedPoint(), backward=backward, tol=None, max_steps=80)
    (d1,) = torch.autograd.grad(sol.value.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    _, ref1, ref2 = _closed_form(x.detach())
    torch.testing.assert_close(d1.detach(), ref1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d2, ref2, rtol=1e-8, atol=1e-10)


def test_second_derivative_through_implicit_is_refused():
    x = torch.linspace(-1, 1, 5, dtype=F64).reshape(5, 1).requires_grad_(True)
    sol = deqkit.fixed_point(lambda z, x: torch.tanh(0.5 * z + x), torch.zeros(5, 1, dtype=F64), inputs=(x,),
                             backward=deqkit.Implicit(), tol=1e-12, max_steps=100)
    with pytest.raises(RuntimeError, match=r"second derivatives through backward=Implicit\(\) are not supported"):
        torch.autograd.grad(sol.value.sum(), x, create_graph=True)  # was 30-55% off, silently


# -- 8. the active set slices only per-sample tensors ---------------------------------------------

def test_active_set_refuses_an_input_that_could_be_shared():
    batch = dim = 4
    per_feature = torch.linspace(0.1, 0.4, dim, dtype=F64)  # shared weights; dim == batch by chance
    x = torch.randn(batch, dim, dtype=F64, generator=gen(1))
    f = lambda z, x, s: torch.tanh(s * z + x)  # noqa: E731
    with pytest.raises(ValueError, match=r"inputs\[1\] of shape \(4,\) is ambiguous"):  # was sliced: 5% off, SUCCESS
        deqkit.fixed_point(f, torch.zeros(batch, dim, dtype=F64), inputs=(x, per_feature), active_set=True)
    with pytest.raises(ValueError, match=r"first dim must be the batch size 4; inputs\[1\] has shape \(3, 4\)"):
        deqkit.fixed_point(f, torch.zeros(batch, dim, dtype=F64), inputs=(x, torch.ones(3, 4, dtype=F64)), active_set=True)
    closure = deqkit.fixed_point(lambda z, x: f(z, x, per_feature), torch.zeros(batch, dim, dtype=F64), inputs=(x,),
                                 active_set=True, tol=1e-10, max_steps=100)
    whole = deqkit.fixed_point(lambda z, x: f(z, x, per_feature), torch.zeros(batch, dim, dtype=F64), inputs=(x,),
                               tol=1e-10, max_steps=100)
    torch.testing.assert_close(closure.value, whole.value, rtol=1e-9, atol=1e-10)


# -- 9. f's exceptions keep their type -------------------------------------------------------------

class FakeOutOfMemory(RuntimeError):
    pass


def test_fs_exception_reaches_the_caller_with_its_type_under_the_active_set():
    rates = torch.tensor([[0.1], [0.99]], dtype=F64)

    def f(z, r):
        if z.shape[0] < 2:  # only when called on a subset
            raise FakeOutOfMemory("out of memory")
        return r * z + 1

    with pytest.raises(FakeOutOfMemory, match="out of memory") as info:  # was ValueError
        deqkit.fixed_point(f, torch.zeros(2, 3, dtype=F64), inputs=(rates,), active_set=True, solver=deqkit.FixedPoint())
    assert any("active_set=True" in note for note in info.value.__notes__)


# -- 10. an in-place f is refused ------------------------------------------------------------------

def test_in_place_f_is_refused():
    def f(z):
        z.mul_(0.5)
        return z + 1

    with torch.no_grad(), pytest.raises(ValueError, match=r"f changed its argument\(s\) \['z'\] in place"):  # was 1.0, MAX_STEPS
        deqkit.fixed_point(f, torch.zeros(2, 3))

    def g(z, x):
        x.add_(1.0)
        return 0.5 * z + x

    with torch.no_grad(), pytest.raises(ValueError, match=r"\['inputs\[0\]'\] in place"):
        deqkit.fixed_point(g, torch.zeros(2, 3), inputs=(torch.zeros(2, 3),))


# -- 11. a fixed number of iterations ---------------------------------------------------------------

def test_tol_none_runs_exactly_max_steps_and_returns_the_last_iterate():
    f, x, w = tanh_map(dim=4, batch=2, rho=0.5)
    calls = []

    def counted(z, x):
        calls.append(1)
        return f(z, x)

    sol = deqkit.fixed_point(counted, torch.zeros(2, 4, dtype=F64), inputs=(x,), solver=deqkit.FixedPoint(),
                             backward=deqkit.Unrolled(), tol=None, max_steps=6, trajectory=6)
    assert len(calls) == 6 and sol.stats.nfev == 6 and sol.result == deqkit.Result.SUCCESS
    assert sol.stats.steps.tolist() == [6, 6] and not bool(sol.stats.converged.any()) and sol.stats.tol is None
    z = torch.zeros(2, 4, dtype=F64)
    for k in range(6):  # GET's recipe: six plain iterations, each supervised, the last returned
        z = f(z, x)
        torch.testing.assert_close(sol.trajectory[k], z, rtol=0, atol=0)
    assert torch.equal(sol.value, z)
    (g_sol,) = torch.autograd.grad(sol.value.sum(), w)
    (g_ref,) = torch.autograd.grad(z.sum(), w)
    torch.testing.assert_close(g_sol, g_ref, rtol=1e-12, atol=0)


def test_tol_none_keeps_the_last_iterate_not_the_lowest_residual():
    # an oscillating map whose residual is lowest early: a tolerance keeps the best, tol=None the last
    f = lambda z: -1.5 * z + 1  # noqa: E731
    fixed = deqkit.fixed_point(f, torch.zeros(1, 1, dtype=F64), solver=deqkit.FixedPoint(), tol=None, max_steps=4, divergence=None)
    best = deqkit.fixed_point(f, torch.zeros(1, 1, dtype=F64), solver=deqkit.FixedPoint(), tol=1e-9, max_steps=4,
                              divergence=None, throw=False)
    z = torch.zeros(1, 1, dtype=F64)
    for _ in range(4):
        z = f(z)
    assert torch.equal(fixed.value, z) and not torch.equal(best.value, z)


def test_zero_steps_is_refused_with_the_spelling_of_gets_recipe():
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1, got 0\. .*backward=deqkit.Unrolled\(\), max_steps=k, tol=None"):
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), max_steps=0)


# -- 12. readable results and clear errors --------------------------------------------------------

def test_result_prints_its_name():
    assert str(deqkit.Result.SUCCESS) == "SUCCESS" and f"{deqkit.Result.MAX_STEPS}" == "MAX_STEPS"
    assert f"{deqkit.Result.NONFINITE:>10}" == " NONFINITE" and f"{deqkit.Result.DIVERGED:d}" == "3" and f"{deqkit.Result.ESCAPED:d}" == "2"


def test_torch_func_transforms_are_refused_clearly():
    with pytest.raises(RuntimeError, match="cannot run inside torch.func transforms"):
        torch.func.vmap(lambda z: deqkit.fixed_point(torch.cos, z.unsqueeze(0)).value)(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="cannot run inside torch.func transforms"):
        torch.func.grad(lambda z: deqkit.fixed_point(torch.cos, z).value.sum())(torch.zeros(3, 2))


@pytest.mark.parametrize("tol", [float("inf"), -float("inf")])
def test_infinite_tol_is_refused(tol):
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), tol=tol)


@pytest.mark.parametrize("fn", [deqkit.jacobian_reg, deqkit.spectral_radius], ids=lambda fn: fn.__name__)
@pytest.mark.parametrize("f", [lambda z: torch.ones_like(z), lambda z: 2 * z.detach()], ids=["constant", "detached"])
def test_jacobian_tools_name_an_f_that_ignores_z(fn, f):
    with pytest.raises(ValueError, match=f"{fn.__name__}: f\\(z\\) does not depend on z"):
        fn(f, torch.randn(2, 3))


def test_jacobian_reg_through_fused_cpu_attention():
    z = torch.randn(2, 2, 16, 8, requires_grad=True)  # (B, heads, tokens, dim): the fused CPU kernel's shape
    reg = deqkit.jacobian_reg(lambda z: 0.5 * F.scaled_dot_product_attention(z, z, z), z)
    reg.mean.backward()  # the fused CPU kernel has no double backward; the math kernel is selected
    assert torch.isfinite(z.grad).all() and bool(z.grad.abs().sum() > 0)


def test_deq_names_the_start_shape_when_the_cell_fails_on_it():
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.inj = torch.nn.Linear(4, 4), torch.nn.Linear(6, 4)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + self.inj(x))

    with pytest.raises(RuntimeError) as info:
        deqkit.DEQ(Cell())(torch.randn(2, 6))
    assert any("shaped like the first input, (2, 6)" in note and "z0=" in note for note in info.value.__notes__)
    sol = deqkit.DEQ(Cell(), init=lambda x: torch.zeros(x.shape[0], 4))(torch.randn(2, 6))
    assert sol.value.shape == (2, 4)


def test_stats_print_a_summary():
    sol = deqkit.fixed_point(torch.cos, torch.zeros(3, 2), tol=1e-5)
    text = repr(sol.stats)
    assert text.startswith("Stats(batch_size=3, nfev=") and "converged=3/3" and "tensor(" not in text
    assert "backward_passes=0" in text


# -- gaps found by mutation testing -------------------------------------------------------------

def test_solve_options_are_declared_once():
    # fixed_point and DEQ take SolveOptions' fields as keyword overrides: one declaration, so
    # the defaults cannot drift; the typed overrides list exactly the fields
    import dataclasses
    import typing

    from deqkit._options import OptionOverrides

    fields = [f.name for f in dataclasses.fields(deqkit.SolveOptions)]
    assert list(typing.get_type_hints(OptionOverrides)) == fields
    sol = deqkit.fixed_point(lambda z: 0.5 * z, torch.ones(2, 2))
    assert sol.stats.tol == deqkit.SolveOptions().tol and sol.stats.stop_mode == deqkit.SolveOptions().stop_mode
    assert deqkit.DEQ(lambda z, x: 0.5 * z + x).options == deqkit.SolveOptions()
    assert deqkit.DEQ(lambda z, x: 0.5 * z + x, throw_on_max_steps=True).options.throw_on_max_steps


@pytest.mark.parametrize("obj", [deqkit.FixedPoint(), deqkit.Anderson(), deqkit.Broyden(), deqkit.NewtonKrylov(),
                                 deqkit.Implicit(), deqkit.Phantom(), deqkit.Unrolled(), deqkit.OneStep(),
                                 deqkit.SolveOptions()], ids=lambda o: type(o).__name__)
def test_solvers_modes_and_options_are_immutable_and_hashable(obj):
    import dataclasses

    field = dataclasses.fields(obj)[0].name if dataclasses.fields(obj) else "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, None)
    assert hash(obj) == hash(type(obj)(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}))


def test_a_one_dimensional_state_is_a_batch_of_scalars():
    sol = deqkit.fixed_point(torch.cos, torch.zeros(3, dtype=F64), tol=1e-12, max_steps=100)
    assert sol.value.shape == (3,) and sol.stats.steps.shape == (3,)
    torch.testing.assert_close(sol.value, torch.full((3,), 0.7390851332151607, dtype=F64))


def test_active_set_note_is_deqkits():
    rates = torch.tensor([[0.1], [0.95]], dtype=F64)
    b = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError) as info:
        deqkit.fixed_point(lambda z: rates * z + b, torch.zeros(2, 3, dtype=F64), solver=deqkit.FixedPoint(),
                           tol=1e-10, max_steps=1000, active_set=True)
    assert str(info.value) == "f must return a tensor of the same shape as z: f(z) has shape (2, 3), z has shape (1, 3)"
    (note,) = info.value.__notes__
    assert note == ("deqkit: raised by f called on 1 of 2 samples (active_set=True); f must treat samples "
                    "independently, with per-sample inputs passed through inputs=.")


@pytest.mark.parametrize("jvp", ["forward", "finite_difference", "auto"])
def test_newton_krylov_jacobian_vector_products(jvp):
    f, x, _ = tanh_map(dim=6, batch=3, rho=0.9)
    sol = deqkit.fixed_point(f, torch.zeros(3, 6, dtype=F64), inputs=(x,), solver=deqkit.NewtonKrylov(jvp=jvp, krylov_rtol=1e-10),
                             tol=1e-9 if jvp == "finite_difference" else 1e-12, max_steps=30)
    ref = deqkit.fixed_point(f, torch.zeros(3, 6, dtype=F64), inputs=(x,), solver=deqkit.Anderson(), tol=1e-13, max_steps=200)
    torch.testing.assert_close(sol.value, ref.value, rtol=1e-7, atol=1e-8)
    assert sol.stats.sample_evals == 3 * sol.stats.nfev  # every call and JVP on the whole batch
    assert int(sol.stats.steps.max()) <= 8  # Newton: a few steps, each with its Krylov JVPs
    assert sol.stats.nfev > int(sol.stats.steps.max())


def test_newton_krylov_falls_back_to_finite_differences_only_for_missing_forward_ad():
    # CPU's fused attention kernel has no forward-mode derivative
    f = lambda z: 0.5 * F.scaled_dot_product_attention(z, z, z) + 0.1  # noqa: E731
    z0 = torch.zeros(1, 2, 16, 8)
    sol = deqkit.fixed_point(f, z0, solver=deqkit.NewtonKrylov(jvp="auto"), tol=1e-5, max_steps=30)
    assert sol.success
    with pytest.raises(RuntimeError):  # forward mode asked for explicitly: no silent fallback
        deqkit.fixed_point(f, z0, solver=deqkit.NewtonKrylov(jvp="forward"), tol=1e-5, max_steps=30)

    def broken(z):
        if torch._C._functorch.maybe_current_level() is not None:  # inside the JVP only
            raise RuntimeError("boom")
        return 0.5 * torch.tanh(z) + 0.3

    with pytest.raises(RuntimeError, match="boom"):  # f's own error inside the JVP is not swallowed
        deqkit.fixed_point(broken, torch.zeros(2, 4, dtype=F64), solver=deqkit.NewtonKrylov(jvp="auto"), tol=1e-9, max_steps=30)


def test_messages_are_exact():
    with pytest.raises(ValueError) as info:
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), max_steps=-5)
    assert str(info.value) == "max_steps must be an integer >= 1, got -5"
    with pytest.raises(TypeError) as info:
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), inputs=5)
    assert str(info.value) == "inputs must be a tuple of f's extra arguments, e.g. inputs=(x,), got int"
    with pytest.raises(ValueError) as info:
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), solver=deqkit.NewtonKrylov(), backward=deqkit.Unrolled())
    assert str(info.value) == (
        "backward=Unrolled() cannot differentiate through NewtonKrylov(krylov_dim=20, krylov_rtol=0.001, damping=1.0, "
        "jvp='auto'): GMRES's orthogonalisation and least squares have no usable derivative once a sample's residual "
        "reaches round-off (the gradient becomes NaN). Use Implicit(), Phantom() or OneStep() with it, or Unrolled() "
        "with FixedPoint, Anderson or Broyden.")

    class Opaque(deqkit.FixedPoint):
        differentiable = False

    with pytest.raises(ValueError, match=r": its iterations are not recorded by autograd\. Use Implicit\(\)"):
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), solver=Opaque(), backward=deqkit.Unrolled())
    with pytest.raises(ValueError) as info:
        deqkit.TorchDEQSolver("newton")
    assert str(info.value) == "unknown torchdeq solver 'newton'; available: anderson, broyden, fixed_point_iter, simple_fixed_point_iter"


def test_backward_mode_defaults_are_the_documented_ones():
    assert deqkit.Implicit() == deqkit.Implicit(solver=None, tol=1e-6, max_steps=100, stop_mode="rel")
    assert deqkit.Phantom() == deqkit.Phantom(steps=5, tau=0.5)
    assert deqkit.Unrolled() == deqkit.Unrolled(checkpoint=False)


def test_vmap_is_refused_even_when_the_start_is_made_inside():
    with pytest.raises(RuntimeError, match="cannot run inside torch.func transforms"):
        torch.func.vmap(lambda x: deqkit.fixed_point(lambda z: 0.5 * z + x, torch.zeros(1, 2)).value)(torch.zeros(3, 2))


def test_active_set_checks_every_input_after_a_non_tensor():
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape \(3, 4\)"):
        deqkit.fixed_point(lambda z, a, b: 0.5 * z, torch.zeros(4, 4), inputs=(None, torch.ones(3, 4)), active_set=True)


def test_finite_difference_fallback_is_decided_once_and_counted_right():
    calls = {"forward_ad": 0, "plain": 0}

    def f(z):
        key = "forward_ad" if torch._C._functorch.maybe_current_level() is not None else "plain"
        calls[key] += 1
        return 0.5 * F.scaled_dot_product_attention(z, z, z) + 0.1  # no forward-mode derivative on CPU

    sol = deqkit.fixed_point(f, torch.zeros(1, 2, 16, 8), solver=deqkit.NewtonKrylov(jvp="auto"), tol=1e-5, max_steps=30)
    assert sol.success
    assert calls["forward_ad"] == 1  # tried once, then finite differences for good
    assert sol.stats.nfev == calls["plain"]  # the failed attempt is not counted


def test_a_diverged_sample_rests_at_its_best_iterate_while_others_iterate():
    rates = torch.tensor([[3.0], [0.99]], dtype=F64)  # sample 0 diverges, sample 1 converges slowly
    sol = deqkit.fixed_point(lambda z, r: r * z + 1, torch.zeros(2, 3, dtype=F64), inputs=(rates,), solver=deqkit.FixedPoint(),
                             tol=1e-8, max_steps=100, divergence=10.0, trajectory=2, throw=False, stop_mode="abs")
    torch.testing.assert_close(sol.value[0], torch.ones(3, dtype=F64))  # f(z0): the lowest absolute residual
    assert sol.stats.status.tolist() == [int(deqkit.Result.DIVERGED), int(deqkit.Result.MAX_STEPS)]
    assert torch.equal(sol.trajectory[-1][0], sol.value[0]) and torch.equal(sol.trajectory[0][0], sol.value[0])


def test_gmres_meets_its_relative_tolerance_and_no_more():
    # on an affine map one Newton step's new residual is GMRES's linear residual: at most
    # krylov_rtol times the old one, reached in fewer Krylov vectors than the dimension
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(12, 12, dtype=F64))[0]
    a = q @ torch.diag(torch.linspace(-0.9, 0.9, 12, dtype=F64)) @ q.T
    b = 1e-3 * torch.randn(2, 12, dtype=F64)
    f = lambda z: z @ a.T + b  # noqa: E731
    z0 = torch.zeros(2, 12, dtype=F64)
    for rtol in (0.5, 1e-2):
        sol = deqkit.fixed_point(f, z0, solver=deqkit.NewtonKrylov(krylov_rtol=rtol), tol=None, max_steps=2, stop_mode="abs")
        first, second = sol.stats.trace[:, 0], sol.stats.trace[:, 1]
        assert bool((second <= rtol * first * (1 + 1e-9)).all())
        assert bool((second > 1e-6 * rtol * first).all())  # stopped at the tolerance, not at convergence
        assert sol.stats.nfev < 2 + 12


def test_torchdeq_adapter_with_a_fixed_number_of_iterations_returns_the_last():
    g = lambda z: -1.5 * z + 1  # noqa: E731  an oscillation whose residual is lowest first
    z0 = torch.zeros(2, 4, dtype=F64)
    sol = deqkit.fixed_point(g, z0, solver=deqkit.TorchDEQSolver("fixed_point_iter"), tol=None, max_steps=5, divergence=None)
    z = z0
    for _ in range(5):
        z = g(z)
    assert torch.equal(sol.value.detach(), z) and sol.stats.steps.tolist() == [5, 5] and sol.result == deqkit.Result.SUCCESS
    assert sol.stats.tol is None and not bool(sol.stats.converged.any())
    rates = torch.tensor([[0.1], [0.9]], dtype=F64)  # batch-wide stopping: sample 0 is below tol long before
    tight = deqkit.fixed_point(lambda z: rates * z + 1, z0, solver=deqkit.TorchDEQSolver("fixed_point_iter"), tol=1e-3, max_steps=200)
    assert tight.success and int(tight.stats.steps[0]) < int(tight.stats.steps[1]) <= tight.stats.nfev
