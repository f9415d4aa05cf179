"""The solver registry and the solver objects: names to objects, user solvers, immutability."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch

import deqkit
from _zoo import COS_FIXED_POINT, cos, mlp_cell, solve
from conftest import SOLVERS

BUILTIN_NAMES = {
    "fixed_point",
    "anderson",
    "broyden",
    "newton_krylov",
    "torchdeq_anderson",
    "torchdeq_broyden",
    "torchdeq_fixed_point_iter",
}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that a test's registrations do not leak."""
    monkeypatch.setattr(deqkit.solvers, "_REGISTRY", dict(deqkit.solvers._REGISTRY))


def test_available_lists_the_builtin_solvers_sorted():
    names = deqkit.solvers.available()
    assert BUILTIN_NAMES <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("fixed_point", {}, deqkit.FixedPoint()),
        ("fixed_point", dict(damping=0.5), deqkit.FixedPoint(damping=0.5)),
        ("anderson", dict(m=3, beta=0.8), deqkit.Anderson(m=3, beta=0.8)),
        ("broyden", dict(memory=4), deqkit.Broyden(memory=4)),
        ("newton_krylov", dict(krylov_dim=7, krylov_rtol=1e-5), deqkit.NewtonKrylov(krylov_dim=7, krylov_rtol=1e-5)),
        ("torchdeq_anderson", dict(m=4, lam=1e-3), deqkit.TorchDEQSolver("anderson", m=4, lam=1e-3)),
        ("torchdeq_broyden", {}, deqkit.TorchDEQSolver("broyden")),
        ("torchdeq_fixed_point_iter", dict(tau=0.9), deqkit.TorchDEQSolver("fixed_point_iter", tau=0.9)),
    ],
)
def test_get_builds_the_named_solver(name, kwargs, expected):
    solver = deqkit.solvers.get(name, **kwargs)
    assert type(solver) is type(expected)
    assert solver == expected
    for key, value in kwargs.items():
        if not isinstance(solver, deqkit.TorchDEQSolver):
            assert getattr(solver, key) == value
    if isinstance(solver, deqkit.TorchDEQSolver):
        assert dict(solver.kwargs) == kwargs


class MyDampedIteration:
    """A user's solver: no deqkit base class, just init and step."""

    def __init__(self, damping=0.5):
        self.damping = damping
        self.inits = 0

    def init(self, z, fz, problem):
        self.inits += 1
        return {"steps": 0}

    def step(self, z, fz, state, problem):
        return z + self.damping * (fz - z), {"steps": state["steps"] + 1}


def test_a_user_solver_needs_no_base_class(registry):
    deqkit.solvers.register("my_damped", MyDampedIteration)
    assert "my_damped" in deqkit.solvers.available()
    solver = deqkit.solvers.get("my_damped", damping=0.8)
    assert isinstance(solver, MyDampedIteration) and solver.damping == 0.8
    assert isinstance(solver, deqkit.solvers.SolverLike)
    case = cos()
    sol = solve(case.f, case.z0, solver=solver, tol=1e-10, max_steps=200)
    assert sol.success and solver.inits == 1
    assert (sol.value - COS_FIXED_POINT).abs().max() <= 1e-8


def test_a_user_solver_can_use_the_problem(registry):
    @dataclasses.dataclass(frozen=True)
    class Secant:
        """Per-sample scalar secant steps on g(z) = f(z) - z, using problem.f for a probe."""

        def init(self, z, fz, problem):
            return None

        def step(self, z, fz, state, problem):
            h = 1e-7
            g = fz - z
            g_h = problem.f(z + h) - (z + h)  # a counted extra call of f
            slope = (g_h - g) / h
            return z - g / slope, state

    deqkit.solvers.register("secant", Secant)
    case = cos(batch=2, dim=1)
    calls = []

    def f(z):
        calls.append(1)
        return torch.cos(z)

    sol = solve(f, case.z0, solver=deqkit.solvers.get("secant"), tol=1e-12, max_steps=20)
    assert sol.success and sol.stats.nfev == len(calls)
    assert (sol.value - COS_FIXED_POINT).abs().max() <= 1e-10


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_are_frozen(solver):
    field = dataclasses.fields(solver)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(solver, field, getattr(solver, field))


def test_torchdeq_solver_is_frozen():
    solver = deqkit.TorchDEQSolver("anderson", m=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.name = "broyden"


DIFFERENT = {
    deqkit.FixedPoint: deqkit.FixedPoint(damping=0.3),
    deqkit.Anderson: deqkit.Anderson(m=2),
    deqkit.Broyden: deqkit.Broyden(memory=3),
    deqkit.NewtonKrylov: deqkit.NewtonKrylov(krylov_dim=3),
    deqkit.TorchDEQSolver: deqkit.TorchDEQSolver("anderson", m=5),
}


@pytest.mark.parametrize("solver", SOLVERS + [pytest.param(deqkit.TorchDEQSolver("anderson", m=4), id="torchdeq")])
def test_solvers_compare_hash_copy_and_print_by_value(solver):
    twin = copy.deepcopy(solver)
    assert twin is not solver and twin == solver and hash(twin) == hash(solver)
    assert pickle.loads(pickle.dumps(solver)) == solver
    assert {solver: "x"}[twin] == "x"
    assert DIFFERENT[type(solver)] != solver
    assert type(solver).__name__ in repr(solver)
    if not isinstance(solver, deqkit.TorchDEQSolver):  # the repr is the constructor call
        assert eval(repr(solver), {type(solver).__name__: type(solver)}) == solver


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_solver_object_serves_many_solves(solver):
    before = copy.deepcopy(solver)
    small, large = cos(batch=3, dim=2), mlp_cell(dim=8, batch=4)
    first = solve(small.f, small.z0, solver=solver, tol=1e-9, max_steps=500)
    other = solve(large.f, large.z0, inputs=large.inputs, solver=solver, tol=1e-9, max_steps=500)
    again = solve(small.f, small.z0, solver=solver, tol=1e-9, max_steps=500)
    fresh = solve(large.f, large.z0, inputs=large.inputs, solver=copy.deepcopy(before), tol=1e-9, max_steps=500)
    assert solver == before  # a solve leaves no state on the object
    assert first.success and other.success
    assert torch.equal(first.value, again.value) and torch.equal(first.stats.steps, again.stats.steps)
    assert torch.equal(other.value, fresh.value) and other.stats.nfev == fresh.stats.nfev
