"""Generic solver tests: every solver of the table against every problem of the zoo."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deqkit
from _zoo import (
    COS_FIXED_POINT,
    NanAfter,
    affine,
    cos,
    heterogeneous,
    ill_conditioned,
    mlp_cell,
    residual,
    solve,
)
from conftest import PER_SAMPLE_SOLVERS, SOLVERS

F64 = torch.float64


def rel_error(value, exact):
    return (torch.linalg.vector_norm(value - exact, dim=1) / torch.linalg.vector_norm(exact, dim=1)).max()


@pytest.mark.parametrize("solver", SOLVERS)
@settings(max_examples=15, deadline=None)
@given(
    dim=st.integers(1, 12),
    batch=st.integers(1, 4),
    contraction=st.floats(0.1, 0.95),
    seed=st.integers(0, 2**16),
)
def test_affine_matches_linalg_solve(solver, dim, batch, contraction, seed):
    case = affine(dim=dim, batch=batch, contraction=contraction, seed=seed)
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=1e-10, max_steps=2000)
    assert sol.result == deqkit.Result.SUCCESS
    assert sol.value.shape == case.z0.shape and sol.value.dtype == F64
    assert rel_error(sol.value, case.z_star) <= 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_cos_reaches_the_dottie_number(solver):
    case = cos(batch=3, dim=2)
    sol = solve(case.f, case.z0, solver=solver, tol=1e-10, max_steps=500)
    assert sol.success and bool(sol.stats.converged.all())
    # |cos'(z*)| = 0.67, so a relative residual of 1e-10 puts z within ~3e-10 of z*
    assert (sol.value - COS_FIXED_POINT).abs().max() <= 1e-8


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_mlp_cell_residual_below_tol_per_sample(solver, stop_mode):
    case = mlp_cell(dim=8, batch=4, norm=0.8)
    tol = 1e-6
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=tol, stop_mode=stop_mode, max_steps=200)
    assert sol.success
    assert bool((sol.stats.residual <= tol).all())
    # The value is f(z_k) for the best iterate z_k. f is 0.8-Lipschitz (tanh is 1-Lipschitz,
    # ||W|| = 0.8), so ||f(value) - value|| <= 0.8 ||f(z_k) - z_k||: recompute it here.
    recomputed_abs = residual(case.f, sol.value, case.inputs, stop_mode="abs")
    if stop_mode == "abs":
        assert bool((recomputed_abs <= 0.8 * sol.stats.residual + 1e-14).all())
    assert bool((residual(case.f, sol.value, case.inputs, stop_mode=stop_mode) <= tol).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_heterogeneous_batch_converges_per_sample(solver):
    case = heterogeneous()
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=1e-10, max_steps=2000)
    assert sol.success
    assert sol.stats.converged.tolist() == [True] * 4
    assert rel_error(sol.value, case.z_star) <= 1e-8


@pytest.mark.parametrize("solver", SOLVERS)
def test_ill_conditioned_ends_in_max_steps_with_the_best_iterate(solver):
    case = ill_conditioned()  # contraction 0.999: no solver gets to 1e-12 in 4 steps
    max_steps, tol = 4, 1e-12
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=tol, max_steps=max_steps, throw=False)
    s = sol.stats
    assert sol.result == deqkit.Result.MAX_STEPS
    assert s.status.tolist() == [int(deqkit.Result.MAX_STEPS)] * 2
    assert not bool(s.converged.any())
    assert s.steps.tolist() == [max_steps] * 2
    # the best iterate is returned: the reported residual is the lowest one in the history
    assert torch.equal(s.residual, s.trace.min(dim=1).values)
    # ... and it is the residual of the iterate z_k behind the value f(z_k) = A z_k + b
    b, a = case.inputs
    z_k = (sol.value - b) / a
    torch.testing.assert_close(residual(case.f, z_k, case.inputs), s.residual, rtol=1e-8, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_max_steps_raises_only_when_asked(solver):
    case = ill_conditioned()
    kwargs = dict(inputs=case.inputs, solver=solver, tol=1e-12, max_steps=3)
    assert solve(case.f, case.z0, **kwargs).result == deqkit.Result.MAX_STEPS  # throw=True by default
    with pytest.raises(deqkit.SolveError, match="MAX_STEPS") as info:
        solve(case.f, case.z0, throw_on_max_steps=True, **kwargs)
    assert info.value.solution.result == deqkit.Result.MAX_STEPS
    assert bool(torch.isfinite(info.value.solution.value).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_gives_nonfinite_and_keeps_the_best_finite_iterate(solver):
    f = NanAfter(bad=[1], after=4)  # sample 1 turns NaN at the 4th call of f
    z0 = torch.zeros(3, 2, dtype=F64)
    sol = solve(f, z0, solver=solver, tol=1e-10, max_steps=200, throw=False)
    s = sol.stats
    assert sol.result == deqkit.Result.NONFINITE
    assert s.status.tolist() == [int(deqkit.Result.SUCCESS), int(deqkit.Result.NONFINITE), int(deqkit.Result.SUCCESS)]
    assert bool(torch.isfinite(sol.value).all()) and bool(torch.isfinite(s.residual).all())
    # the NaN did not spread: the other samples still reach the fixed point
    assert (sol.value[[0, 2]] - COS_FIXED_POINT).abs().max() <= 1e-8
    # sample 1 ends at its best finite iterate: its residual is the lowest finite one it had...
    history = s.trace[1][torch.isfinite(s.trace[1])]
    assert float(s.residual[1]) == float(history.min())
    # ... and the value is cos(z_k) for that iterate (z_k in [0, 1], so z_k = arccos(value))
    z_k = torch.arccos(sol.value[1:2])
    torch.testing.assert_close(residual(torch.cos, z_k), s.residual[1:2], rtol=1e-6, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_raises_solve_error_by_default(solver):
    f = NanAfter(bad=[0], after=3)
    with pytest.raises(deqkit.SolveError, match=r"NONFINITE.*samples \[0\]") as info:
        solve(f, torch.zeros(2, 3, dtype=F64), solver=solver, tol=1e-10, max_steps=100)
    sol = info.value.solution
    assert sol.result == deqkit.Result.NONFINITE
    assert bool(torch.isfinite(sol.value).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_input_of_one_sample_does_not_spread(solver):
    case = mlp_cell(dim=6, batch=3)
    (x,) = case.inputs
    x_bad = x.clone()
    x_bad[1, 0] = float("nan")
    sol = solve(case.f, case.z0, inputs=(x_bad,), solver=solver, tol=1e-9, max_steps=200, throw=False)
    assert sol.result == deqkit.Result.NONFINITE
    assert sol.stats.status.tolist() == [0, int(deqkit.Result.NONFINITE), 0]
    alone = solve(case.f, case.z0[[0, 2]], inputs=(x[[0, 2]],), solver=solver, tol=1e-9, max_steps=200)
    torch.testing.assert_close(sol.value[[0, 2]], alone.value, rtol=0, atol=1e-8)
    if solver in [p.values[0] for p in PER_SAMPLE_SOLVERS]:  # not even a restart spreads
        assert sol.stats.steps[[0, 2]].tolist() == alone.stats.steps.tolist()


@pytest.mark.parametrize("solver", SOLVERS)
def test_expanding_map_reports_diverged(solver):
    # |f'| >= 2 everywhere: plain (damped) iteration runs away from the fixed point near -0.4.
    # Newton-type solvers model the map and may land on that fixed point instead.
    def f(z):
        return 3 * z + 1 + 0.5 * torch.sin(2 * z)

    z0 = torch.full((2, 1), 0.3, dtype=F64)
    kwargs = dict(solver=solver, tol=1e-10, stop_mode="abs", max_steps=100, divergence=10.0)
    sol = solve(f, z0, throw=False, **kwargs)
    if isinstance(solver, deqkit.FixedPoint):
        assert sol.result == deqkit.Result.DIVERGED
    if sol.result == deqkit.Result.SUCCESS:
        assert bool((residual(f, sol.value, stop_mode="abs") <= 1e-9).all())
        return
    assert sol.result == deqkit.Result.DIVERGED
    # a sample stops once its residual passes 10x its first one, and returns its best iterate
    trace = sol.stats.trace
    assert bool((trace[:, -1] > 10 * trace[:, 0]).all())
    assert bool((trace[:, :-1] <= 10 * trace[:, :1]).all())
    assert torch.equal(sol.stats.residual, trace.min(dim=1).values)
    with pytest.raises(deqkit.SolveError, match="DIVERGED"):
        solve(f, z0, **kwargs)

