"""Every bad input fails early with a message that names the argument and the problem."""

from __future__ import annotations

import pytest
import torch

import deqkit
from _zoo import NanAfter, solve

Z0 = torch.zeros(2, 3)


# -- what f returns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f, match",
    [
        (lambda z: z[:, :2], r"same shape as z: f\(z\) has shape \(2, 2\), z has shape \(2, 3\)"),
        (lambda z: z.reshape(3, 2), r"same shape"),
        (lambda z: z.double(), r"z0's dtype: f\(z\) is torch.float64, z0 is torch.float32"),
        (lambda z: z.to(torch.bfloat16), r"dtype.*autocast"),
        (lambda z: z.tolist(), r"f must return a Tensor, got list"),
        (lambda z: None, r"f must return a Tensor, got NoneType"),
        (lambda z: (z, z), r"f must return a Tensor, got tuple"),
    ],
    ids=["fewer-features", "reshaped", "float64", "bfloat16", "list", "none", "tuple"],
)
@pytest.mark.parametrize("solver", [deqkit.FixedPoint(), deqkit.Anderson()], ids=["fixed_point", "anderson"])
def test_f_returning_the_wrong_thing(f, match, solver):
    with pytest.raises((ValueError, TypeError), match=match):
        solve(f, Z0, solver=solver)


def test_f_returning_another_device():
    # The meta device stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match=r"z0's device: got meta, z0 is on cpu"):
        solve(lambda z: torch.empty_like(z, device="meta"), Z0)


def test_f_not_callable():
    with pytest.raises(TypeError, match="f must be callable, got Tensor"):
        solve(torch.ones(2, 3), Z0)


# -- z0 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_z0_not_finite(bad):
    z0 = torch.zeros(2, 3)
    z0[1, 2] = bad
    with pytest.raises(ValueError, match="z0 contains NaN or Inf"):
        solve(torch.cos, z0)


@pytest.mark.parametrize(
    "z0, error, match",
    [
        ([[0.0, 0.0]], TypeError, "z0 must be a torch.Tensor, got list"),
        (0.0, TypeError, "z0 must be a torch.Tensor, got float"),
        (torch.zeros(2, 3, dtype=torch.long), TypeError, "z0 must be a floating-point tensor, got dtype torch.int64"),
        (torch.zeros(2, 3, dtype=torch.bool), TypeError, "floating-point"),
        (torch.zeros(0, 3), ValueError, r"non-empty batch dimension first, got shape \(0, 3\)"),
        (torch.tensor(0.0), ValueError, r"non-empty batch dimension first, got shape \(\)"),
    ],
    ids=["list", "float", "int64", "bool", "empty-batch", "scalar"],
)
def test_bad_z0(z0, error, match):
    with pytest.raises(error, match=match):
        solve(torch.cos, z0)


# -- the stopping rule and the budget ----------------------------------------------------------------


@pytest.mark.parametrize("tol", [0, 0.0, -1e-4, float("nan"), float("inf"), True, "1e-4"])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match=rf"tol must be a finite number > 0, or None for a fixed number of iterations \(exactly max_steps\), got {tol!r}"):
        solve(torch.cos, Z0, tol=tol)


@pytest.mark.parametrize("max_steps", [0, -5, 2.5, 10.0, True, "50", None])
def test_bad_max_steps(max_steps):
    with pytest.raises(ValueError, match=f"max_steps must be an integer >= 1, got {max_steps!r}"):
        solve(torch.cos, Z0, max_steps=max_steps)


@pytest.mark.parametrize("stop_mode", ["relative", "ABS", "", None, "max"])
def test_bad_stop_mode(stop_mode):
    with pytest.raises(ValueError, match=rf"stop_mode must be one of \('abs', 'rel'\), got {stop_mode!r}"):
        solve(torch.cos, Z0, stop_mode=stop_mode)


@pytest.mark.parametrize("divergence", [1, 0.5, -3, "big"])
def test_bad_divergence(divergence):
    with pytest.raises(ValueError, match=f"divergence must be a number > 1, or None to never stop on divergence, got {divergence!r}"):
        solve(torch.cos, Z0, divergence=divergence)


@pytest.mark.parametrize("trajectory", [-1, 1.5, True])
def test_bad_trajectory(trajectory):
    with pytest.raises(ValueError, match=f"trajectory must be an integer >= 0, got {trajectory!r}"):
        solve(torch.cos, Z0, trajectory=trajectory)


# -- solver and backward objects ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [deqkit.Anderson, deqkit.FixedPoint, deqkit.Broyden, deqkit.NewtonKrylov])
def test_solver_passed_as_a_class(cls):
    with pytest.raises(TypeError, match=rf"solver must be a solver object, not a class: use solver={cls.__name__}\(\)"):
        solve(torch.cos, Z0, solver=cls)


def test_solver_given_as_a_name_points_to_the_registry():
    with pytest.raises(TypeError, match=r"got the string 'anderson': use deqkit.solvers.get\('anderson'\)"):
        solve(torch.cos, Z0, solver="anderson")


@pytest.mark.parametrize("solver", [3, object()])
def test_solver_without_init_and_step(solver):
    with pytest.raises(TypeError, match="solver must have init\\(\\) and step\\(\\) methods"):
        solve(torch.cos, Z0, solver=solver)


def test_backward_passed_as_a_class():
    with pytest.raises(TypeError, match=r"not a class: use backward=Implicit\(\)"):
        solve(torch.cos, Z0, backward=deqkit.Implicit)


def test_backward_of_the_wrong_kind():
    with pytest.raises(TypeError, match=r"backward must be a deqkit backward mode \(Implicit, Phantom, Unrolled, OneStep\), got 'implicit'"):
        solve(torch.cos, Z0, backward="implicit")


def test_solver_returning_the_wrong_shape_is_named():
    class Shrinking:
        def init(self, z, fz, problem):
            return None

        def step(self, z, fz, state, problem):
            return fz[:, :1], state

    with pytest.raises(RuntimeError, match=r"returned an iterate of shape \(2, 1\).*expected \(2, 3\)"):
        solve(torch.cos, Z0, solver=Shrinking(), tol=1e-8)


# -- solver hyperparameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0, -1, 2.0, True, None])
def test_anderson_bad_m(m):
    with pytest.raises(ValueError, match=f"m must be an integer >= 1, got {m!r}"):
        deqkit.Anderson(m=m)


@pytest.mark.parametrize("beta", [0, 0.0, -0.5, 1.01, 2, float("nan"), "1"])
def test_anderson_bad_beta(beta):
    with pytest.raises(ValueError, match=r"beta must be a number in \(0, 1\]"):
        deqkit.Anderson(beta=beta)


@pytest.mark.parametrize("lam", [-1e-4, float("nan"), "0"])
def test_anderson_bad_lam(lam):
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        deqkit.Anderson(lam=lam)


@pytest.mark.parametrize("restart", [1, 0.5, "4"])
def test_anderson_bad_restart(restart):
    with pytest.raises(ValueError, match="restart must be a number > 1"):
        deqkit.Anderson(restart=restart)


@pytest.mark.parametrize("damping", [0, 0.0, 1.5, -1, float("nan"), "0.5", None])
def test_fixed_point_bad_damping(damping):
    with pytest.raises(ValueError, match=rf"damping must be a number in \(0, 1\], got {damping!r}"):
        deqkit.FixedPoint(damping=damping)


@pytest.mark.parametrize("memory", [0, -3, 1.5, True])
def test_broyden_bad_memory(memory):
    with pytest.raises(ValueError, match=f"memory must be an integer >= 1, got {memory!r}"):
        deqkit.Broyden(memory=memory)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(krylov_dim=0), "krylov_dim must be an integer >= 1, got 0"),
        (dict(krylov_dim=2.0), "krylov_dim must be an integer >= 1"),
        (dict(krylov_rtol=0), "krylov_rtol must be a finite number > 0"),
        (dict(krylov_rtol=-1e-3), "krylov_rtol must be a finite number > 0"),
        (dict(damping=0), r"damping must be a number in \(0, 1\]"),
        (dict(damping=1.5), r"damping must be a number in \(0, 1\]"),
    ],
)
def test_newton_krylov_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deqkit.NewtonKrylov(**kwargs)


def test_unknown_hyperparameter_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'mm'"):
        deqkit.Anderson(mm=3)


# -- registry and the torchdeq adapter --------------------------------------------------------------------


def test_unknown_solver_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown solver 'andersen'; available: ") as info:
        deqkit.solvers.get("andersen")
    for name in deqkit.solvers.available():
        assert name in str(info.value)


def test_registering_a_taken_name(monkeypatch):
    monkeypatch.setattr(deqkit.solvers, "_REGISTRY", dict(deqkit.solvers._REGISTRY))
    with pytest.raises(ValueError, match="a solver named 'anderson' is already registered; pass overwrite=True"):
        deqkit.solvers.register("anderson", deqkit.FixedPoint)
    assert deqkit.solvers.get("anderson") == deqkit.Anderson()  # unchanged
    deqkit.solvers.register("anderson", deqkit.FixedPoint, overwrite=True)
    assert deqkit.solvers.get("anderson", damping=0.5) == deqkit.FixedPoint(damping=0.5)


@pytest.mark.parametrize("name, error", [("", ValueError), (None, ValueError), (3, ValueError)])
def test_registering_a_bad_name(monkeypatch, name, error):
    monkeypatch.setattr(deqkit.solvers, "_REGISTRY", dict(deqkit.solvers._REGISTRY))
    with pytest.raises(error, match="a solver name must be a non-empty string"):
        deqkit.solvers.register(name, deqkit.FixedPoint)


def test_registering_something_not_callable(monkeypatch):
    monkeypatch.setattr(deqkit.solvers, "_REGISTRY", dict(deqkit.solvers._REGISTRY))
    with pytest.raises(TypeError, match=r"register\('mine', \.\.\.\) needs a class or factory"):
        deqkit.solvers.register("mine", deqkit.FixedPoint())


def test_torchdeq_solver_unknown_name():
    with pytest.raises(ValueError, match="unknown torchdeq solver 'newton'; available: anderson, broyden"):
        deqkit.TorchDEQSolver("newton")


def test_torchdeq_solver_unknown_keyword():
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['mm'\] for torchdeq's 'anderson' solver; it accepts .*'m'"):
        deqkit.TorchDEQSolver("anderson", mm=5)


def test_torchdeq_solver_rejects_the_arguments_deqkit_sets():
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['max_iter'\]"):
        deqkit.TorchDEQSolver("anderson", max_iter=10)


# -- failures reported by SolveError ------------------------------------------------------------------------


def test_solve_error_names_the_failed_samples_and_the_fix():
    with pytest.raises(deqkit.SolveError) as info:
        solve(NanAfter(bad=[2], after=3), torch.zeros(4, 2, dtype=torch.float64), solver=deqkit.FixedPoint(), tol=1e-10)
    message = str(info.value)
    assert "NONFINITE" in message and "samples [2] of 4" in message
    assert "throw=False" in message


def test_inputs_must_be_a_tuple_not_a_tensor():
    x = torch.randn(3, 2)
    with pytest.raises(TypeError, match=r"inputs=\(x,\)"):
        deqkit.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(3, 2), inputs=x)
