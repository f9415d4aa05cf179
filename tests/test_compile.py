"""torch.compile: a compiled model holding a DEQ, and compiled solver steps (``deqkit.compiled``).

Most tests compile with the "eager" or "aot_eager" backends: torch's graph capture (dynamo) and,
for "aot_eager", its autograd tracing, without inductor's code generation, which costs tens of
seconds per graph on two cores. The tests that use inductor, the default backend, are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import deqkit

ROOT = Path(__file__).resolve().parents[1]
BACKWARDS = [
    pytest.param(deqkit.Implicit(tol=1e-12, max_steps=200), id="implicit"),
    pytest.param(deqkit.Phantom(steps=3, tau=0.5), id="phantom"),
    pytest.param(deqkit.Unrolled(), id="unrolled"),
    pytest.param(deqkit.OneStep(), id="onestep"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tanh_map(d: int = 6, b: int = 3, dtype: torch.dtype = torch.float64, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, d, generator=g, dtype=dtype)
    w = (0.9 / torch.linalg.matrix_norm(w, ord=2)) * w
    x = torch.randn(b, d, generator=g, dtype=dtype)
    if grad:
        w.requires_grad_(True)
    return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(b, d, dtype=dtype), w


# -- a model holding a DEQ, compiled whole ------------------------------------------------------

class _Cell(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + x)


class _Model(torch.nn.Module):
    """An encoder, a DEQ layer and a head; or, with ``functional=True``, fixed_point in forward."""

    def __init__(self, d: int, backward, functional: bool = False):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.cell = _Cell(d)
        self.deq = deqkit.DEQ(self.cell, solver=deqkit.Anderson(m=3), backward=backward, tol=1e-10, max_steps=60)
        self.head = torch.nn.Linear(d, 1)
        self.functional = functional
        self.backward = backward

    def forward(self, x):
        x = self.inp(x)
        if self.functional:
            sol = deqkit.fixed_point(self.cell, torch.zeros_like(x), inputs=(x,), solver=deqkit.Anderson(m=3),
                                     backward=self.backward, tol=1e-10, max_steps=60)
        else:
            sol = self.deq(x)
        return self.head(sol.value).sum()


MODELS = [pytest.param(p.values[0], False, id=f"DEQ-{p.id}") for p in BACKWARDS]
MODELS.append(pytest.param(BACKWARDS[0].values[0], True, id="fixed_point-implicit"))


@pytest.mark.parametrize("backward, functional", MODELS)
def test_compiled_model_matches_eager(backward, functional):
    torch.manual_seed(0)
    model = _Model(6, backward, functional).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    loss = model(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    fast = torch.compile(model, backend="aot_eager", fullgraph=False)
    with warnings.catch_warnings():  # torch's notices while it traces deqkit (see docs/compile.md)
        warnings.filterwarnings("ignore", module=r"torch(\.|$)")
        c_loss = fast(x)
        c_grads = torch.autograd.grad(c_loss, list(model.parameters()))
    torch.testing.assert_close(c_loss, loss, rtol=0, atol=1e-12)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_compiled_solver_inside_a_compiled_model_is_left_to_the_outer_compilation():
    f, z0, _ = tanh_map()
    fast = deqkit.compiled(deqkit.Anderson(m=3), backend="eager")

    def solve(z0):
        return deqkit.fixed_point(f, z0, solver=fast, tol=None, max_steps=6).value

    eager = deqkit.fixed_point(f, z0, solver=deqkit.Anderson(m=3), tol=None, max_steps=6).value
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch(\.|$)")
        value = torch.compile(solve, backend="eager")(z0)
    torch.testing.assert_close(value, eager, rtol=0, atol=1e-12)
    assert fast.compilations == 0 and not fast.eager  # the outer compilation traced the plain step


# -- compiled steps: values --------------------------------------------------------------------

STEPPED = [
    pytest.param(deqkit.Anderson(m=3), id="anderson"),
    pytest.param(deqkit.Broyden(memory=4), id="broyden"),
    pytest.param(deqkit.FixedPoint(damping=0.7), id="fixed_point_damped"),
]


@pytest.mark.parametrize("solver", STEPPED)
def test_compiled_step_matches_eager(solver):
    f, z0, _ = tanh_map()
    eager = deqkit.fixed_point(f, z0, solver=solver, tol=None, max_steps=12)
    fast = deqkit.compiled(solver, backend="aot_eager")
    for _ in range(2):  # the second solve runs the graphs compiled by the first
        sol = deqkit.fixed_point(f, z0, solver=fast, tol=None, max_steps=12)
        torch.testing.assert_close(sol.value, eager.value, rtol=0, atol=1e-12)
    assert fast.compilations > 0 and not fast.eager


def test_compiled_step_converges_like_eager_with_the_active_set():
    """Samples stop at different steps; the loop compacts the compiled solver's state (select)."""
    _, z0, w = tanh_map(b=5)
    x = torch.linspace(0.05, 3.0, 5, dtype=torch.float64).unsqueeze(1) * torch.ones(5, 6, dtype=torch.float64)
    f = lambda z, x: torch.tanh(z @ w.T + x)  # noqa: E731
    solver = deqkit.Anderson(m=3)
    eager = deqkit.fixed_point(f, z0, inputs=(x,), solver=solver, tol=1e-8, active_set=True)
    fast = deqkit.compiled(solver, backend="eager")
    sol = deqkit.fixed_point(f, z0, inputs=(x,), solver=fast, tol=1e-8, active_set=True)
    assert len(set(eager.stats.steps.tolist())) > 1
    assert fast.selects_rows  # the loop compacts the state, as with the plain solver

    class Plain:  # a solver without select: its compiled form has none either (no compaction)
        def init(self, z, fz, problem):
            return None

        def step(self, z, fz, state, problem):
            return 0.5 * (z + fz), state

    assert not deqkit.compiled(Plain()).selects_rows
    torch.testing.assert_close(sol.value, eager.value, rtol=0, atol=1e-12)
    assert torch.equal(sol.stats.steps, eager.stats.steps)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["float32", "float64"])
def test_inductor_step_matches_eager(dtype, atol):
    """The default backend (inductor) generates its own kernels: equal to float tolerance."""
    f, z0, _ = tanh_map(d=8, dtype=dtype)
    solver = deqkit.Anderson(m=2)
    eager = deqkit.fixed_point(f, z0, solver=solver, tol=None, max_steps=6)
    fast = deqkit.compiled(solver)
    sol = deqkit.fixed_point(f, z0, solver=fast, tol=None, max_steps=6)
    torch.testing.assert_close(sol.value, eager.value, rtol=0, atol=atol)
    assert fast.compilations > 0 and not fast.eager


# -- recompilation -------------------------------------------------------------------------------

@pytest.mark.parametrize("solver, most", [(deqkit.Anderson(m=4), 3), (deqkit.Broyden(memory=4), 5)], ids=["anderson", "broyden"])
def test_recompilations_are_bounded(solver, most):
    """Anderson's step count (slot = n_steps % m) and Broyden's fill count are python ints in the
    state: after their first change torch makes them symbolic, so the graphs do not grow with
    the steps (Anderson: n = 0, n % m == 0, n % m > 0; Broyden: no state, 0, 1, 2..memory-1, full)."""
    f, z0, _ = tanh_map()
    fast = deqkit.compiled(solver, backend="eager")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):
        deqkit.fixed_point(f, z0, solver=fast, tol=None, max_steps=25)
    assert 0 < fast.compilations <= most
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == fast.compilations


def test_each_compiled_record_owns_its_runtime():
    # equal records compare equal, but one falling back to eager never switches another
    f, z0, _ = tanh_map()
    first = deqkit.compiled(deqkit.FixedPoint(), backend="eager")
    again = deqkit.compiled(deqkit.FixedPoint(), backend="eager")
    assert again == first and hash(again) == hash(first)
    with pytest.warns(RuntimeWarning, match="no tensor operations"):
        deqkit.fixed_point(f, z0, solver=first, tol=None, max_steps=3)
    assert first.eager and not again.eager
    other = deqkit.compiled(deqkit.Anderson(m=2), backend="eager")
    assert other != first and other.compilations == 0


# -- fallbacks --------------------------------------------------------------------------------

def test_a_step_calling_the_map_falls_back_with_one_warning():
    f, z0, _ = tanh_map()
    solver = deqkit.NewtonKrylov()
    eager = deqkit.fixed_point(f, z0, solver=solver, tol=1e-10)
    fast = deqkit.compiled(solver, backend="eager")
    with pytest.warns(RuntimeWarning, match=r"runs eagerly from now on: the step calls problem\.jvp") as record:
        sol = deqkit.fixed_point(f, z0, solver=fast, tol=1e-10)
        sol2 = deqkit.fixed_point(f, z0, solver=fast, tol=1e-10)
    assert len(record) == 1 and fast.eager and "problem.jvp" in fast.why_eager
    torch.testing.assert_close(sol.value, eager.value, rtol=0, atol=0)
    torch.testing.assert_close(sol2.value, eager.value, rtol=0, atol=0)


def test_a_failed_compilation_falls_back_with_a_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no code generation today")

    f, z0, _ = tanh_map()
    solver = deqkit.Anderson(m=3)
    eager = deqkit.fixed_point(f, z0, solver=solver, tol=None, max_steps=6)
    fast = deqkit.compiled(solver, backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no code generation today"):
        sol = deqkit.fixed_point(f, z0, solver=fast, tol=None, max_steps=6)
    torch.testing.assert_close(sol.value, eager.value, rtol=0, atol=0)
    assert fast.eager


def test_a_step_with_nothing_to_compile_falls_back_with_a_warning():
    f, z0, _ = tanh_map()
    fast = deqkit.compiled(deqkit.FixedPoint(), backend="eager")
    with pytest.warns(RuntimeWarning, match="no tensor operations"):
        sol = deqkit.fixed_point(f, z0, solver=fast, tol=None, max_steps=5)
    torch.testing.assert_close(sol.value, deqkit.fixed_point(f, z0, solver=deqkit.FixedPoint(), tol=None, max_steps=5).value)


# -- autograd (Unrolled) and refusals ---------------------------------------------------------

@pytest.mark.parametrize("solver", STEPPED[:2])
def test_unrolled_gradients_through_compiled_steps(solver):
    f, z0, w = tanh_map(grad=True)
    eager = deqkit.fixed_point(f, z0, solver=solver, backward=deqkit.Unrolled(), tol=None, max_steps=8)
    (g_eager,) = torch.autograd.grad(eager.value.square().sum(), w)
    fast = deqkit.compiled(solver, backend="aot_eager")
    sol = deqkit.fixed_point(f, z0, solver=fast, backward=deqkit.Unrolled(), tol=None, max_steps=8)
    (g_fast,) = torch.autograd.grad(sol.value.square().sum(), w)
    torch.testing.assert_close(sol.value.detach(), eager.value.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(g_fast, g_eager, rtol=0, atol=1e-12)


def test_second_derivatives_and_retained_graphs_are_refused():
    f, z0, w = tanh_map(grad=True)
    fast = deqkit.compiled(deqkit.Anderson(m=3), backend="aot_eager")
    sol = deqkit.fixed_point(f, z0, solver=fast, backward=deqkit.Unrolled(), tol=None, max_steps=4)
    with pytest.raises(RuntimeError, match="second derivatives through .*Use the plain solver"):
        torch.autograd.grad(sol.value.sum(), w, create_graph=True)
    sol = deqkit.fixed_point(f, z0, solver=fast, backward=deqkit.Unrolled(), tol=None, max_steps=4)
    with pytest.raises(RuntimeError, match=r"retain_graph=True.*donated_buffer = False"):
        sol.value.sum().backward(retain_graph=True)


def test_what_cannot_be_compiled_is_refused():
    with pytest.raises(ValueError, match="runs a loop of its own"):
        deqkit.compiled(deqkit.TorchDEQSolver("anderson"))
    with pytest.raises(ValueError, match="compiled already"):
        deqkit.compiled(deqkit.compiled(deqkit.Anderson()))
    with pytest.raises(TypeError, match="not a class"):
        deqkit.compiled(deqkit.Anderson)
    with pytest.raises(TypeError, match="init\\(\\) and step\\(\\)"):
        deqkit.compiled(object())
    f, z0, _ = tanh_map()
    with pytest.raises(ValueError, match="Unrolled\\(\\) cannot differentiate"):
        deqkit.fixed_point(f, z0, solver=deqkit.compiled(deqkit.NewtonKrylov()), backward=deqkit.Unrolled())


# -- the benchmark script ------------------------------------------------------------------------

@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile.py"), "--quick", "--backend", "eager",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| map | solver | eager (ms) | compiled (ms) |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["iterations"] == 30 and data["device"] == "cpu" and data["quick"]
    assert {r["solver"] for r in data["rows"]} == {"FixedPoint", "Anderson(m=5)", "Broyden"}
    for row in data["rows"]:
        assert row["max_abs_diff"] <= 1e-6 and row["eager_ms"] > 0 and row["compiled_ms"] > 0
        assert (row["fell_back"] is None) == (row["solver"] != "FixedPoint")
