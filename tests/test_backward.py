"""Gradients through the fixed point: every backward mode against exact references.

References: ``torch.autograd.gradcheck`` (float64), the implicit-function-theorem gradient of
an affine map in closed form, unrolled iteration to convergence and central finite
differences. Also the properties the modes promise (phantom -> implicit as steps grow, flat
memory for Implicit, stats and failures of the adjoint solve) and the autograd behaviours
torchdeq gets wrong (two calls before one backward, ``retain_graph``, graphs in eval mode).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deqkit

# torch.func.jvp (NewtonKrylov) imports a module that calls the deprecated torch.jit.script on
# first use; import it quietly so no test depends on running order (conftest does the same).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

F64 = torch.float64

FORWARD_SOLVERS = [
    pytest.param(deqkit.FixedPoint(), id="fixed_point"),
    pytest.param(deqkit.Anderson(m=5), id="anderson"),
    pytest.param(deqkit.Broyden(memory=10), id="broyden"),
]
ADJOINT_SOLVERS = [
    pytest.param(None, id="adj_default"),
    pytest.param(deqkit.FixedPoint(), id="adj_fixed_point"),
    pytest.param(deqkit.Broyden(memory=10), id="adj_broyden"),
]
ALL_SOLVERS = [
    pytest.param(deqkit.FixedPoint(), id="fixed_point"),
    pytest.param(deqkit.Anderson(m=5), id="anderson"),
    pytest.param(deqkit.Broyden(memory=10), id="broyden"),
    pytest.param(deqkit.NewtonKrylov(krylov_dim=10, krylov_rtol=1e-6), id="newton_krylov"),
]
ALL_BACKWARDS = [
    pytest.param(deqkit.Implicit(tol=1e-8), id="implicit"),
    pytest.param(deqkit.Phantom(steps=5, tau=0.5), id="phantom"),
    pytest.param(deqkit.Unrolled(), id="unrolled"),
    pytest.param(deqkit.OneStep(), id="one_step"),
]


# -- helpers ---------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(dim: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def scaled(dim: int, norm: float, seed: int) -> torch.Tensor:
    """A random (dim, dim) matrix with spectral norm ``norm``."""
    w = torch.randn(dim, dim, generator=gen(seed), dtype=F64)
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def tanh_cell(z, x, w):
    """``tanh(W z + x)``: contractive when ``||W|| < 1``."""
    return torch.tanh(z @ w.T + x)


def tanh_problem(batch=3, dim=5, norm=0.8, seed=0):
    """Leaf tensors (x, W) of a contractive tanh cell; W = norm * orthogonal."""
    w = (norm * orthogonal(dim, seed)).requires_grad_(True)
    x = (0.3 * torch.randn(batch, dim, generator=gen(seed + 1), dtype=F64)).requires_grad_(True)
    return x, w


def flat(*tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def grads_of(backward, x, w, g, *, solver=None, tol=1e-12, max_steps=400, f=tanh_cell):
    """Gradient of ``sum(g * z*)`` w.r.t. (x, W), flattened."""
    sol = deqkit.fixed_point(f, torch.zeros_like(x.detach()), inputs=(x, w), solver=solver,
                             backward=backward, tol=tol, max_steps=max_steps)
    assert sol.success
    gx, gw = torch.autograd.grad((sol.value * g).sum(), (x, w))
    return flat(gx, gw)


TIGHT = deqkit.Implicit(tol=1e-12, max_steps=300)


# -- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("adjoint_solver", [None, deqkit.FixedPoint()], ids=["adj_default", "adj_fixed_point"])
def test_gradcheck_implicit(adjoint_solver):
    x, w = tanh_problem(batch=2, dim=3)
    mode = deqkit.Implicit(solver=adjoint_solver, tol=1e-12, max_steps=300)

    def fn(x, w):
        return deqkit.fixed_point(tanh_cell, torch.zeros(2, 3, dtype=F64), inputs=(x, w),
                                  solver=deqkit.Broyden(memory=10), backward=mode,
                                  tol=1e-12, max_steps=200).value

    assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)


@pytest.mark.parametrize("adjoint_solver", ADJOINT_SOLVERS)
@pytest.mark.parametrize("solver", FORWARD_SOLVERS)
def test_implicit_equals_analytic_ift_on_affine_map(solver, adjoint_solver):
    batch, dim, dim_x = 3, 4, 3
    a = scaled(dim, 0.8, seed=10).requires_grad_(True)
    b = torch.randn(dim, dim_x, generator=gen(11), dtype=F64).requires_grad_(True)
    x = torch.randn(batch, dim_x, generator=gen(12), dtype=F64).requires_grad_(True)
    g = torch.randn(batch, dim, generator=gen(13), dtype=F64)

    sol = deqkit.fixed_point(lambda z, a, b, x: z @ a.T + x @ b.T, torch.zeros(batch, dim, dtype=F64),
                             inputs=(a, b, x), solver=solver, tol=1e-13, max_steps=400,
                             backward=deqkit.Implicit(solver=adjoint_solver, tol=1e-13, max_steps=400))
    assert sol.success
    ga, gb, gx = torch.autograd.grad((sol.value * g).sum(), (a, b, x))

    with torch.no_grad():
        eye = torch.eye(dim, dtype=F64)
        z_star = torch.linalg.solve(eye - a, b @ x.T).T       # (B, dim): (I - A)^-1 B x
        u = torch.linalg.solve(eye - a.T, g.T).T               # (B, dim): (I - A^T)^-1 g
        torch.testing.assert_close(sol.value.detach(), z_star, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ga, u.T @ z_star, rtol=1e-6, atol=1e-10)  # sum_b u z*^T
        torch.testing.assert_close(gb, u.T @ x, rtol=1e-6, atol=1e-10)       # sum_b u x^T
        torch.testing.assert_close(gx, u @ b, rtol=1e-6, atol=1e-10)         # B^T u per sample


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), dim=st.integers(1, 5), contraction=st.floats(0.0, 0.9),
       seed=st.integers(0, 2**16), stop_mode=st.sampled_from(["abs", "rel"]))
def test_implicit_gradient_of_any_contractive_affine_map(batch, dim, contraction, seed, stop_mode):
    a = scaled(dim, contraction, seed) if contraction > 0 else torch.zeros(dim, dim, dtype=F64)
    a.requires_grad_(True)
    x = torch.randn(batch, dim, generator=gen(seed + 1), dtype=F64).requires_grad_(True)
    g = torch.randn(batch, dim, generator=gen(seed + 2), dtype=F64)
    sol = deqkit.fixed_point(lambda z, a, x: z @ a.T + x, torch.zeros(batch, dim, dtype=F64), inputs=(a, x),
                             tol=1e-12, stop_mode=stop_mode, max_steps=300,
                             backward=deqkit.Implicit(tol=1e-12, stop_mode=stop_mode, max_steps=300))
    ga, gx = torch.autograd.grad((sol.value * g).sum(), (a, x))
    with torch.no_grad():
        eye = torch.eye(dim, dtype=F64)
        z_star = torch.linalg.solve(eye - a, x.T).T
        u = torch.linalg.solve(eye - a.T, g.T).T
        torch.testing.assert_close(gx, u, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ga, u.T @ z_star, rtol=1e-6, atol=1e-9)


def test_implicit_matches_unrolled_and_finite_differences():
    x, w = tanh_problem(norm=0.8, seed=3)
    g = torch.randn(x.shape, generator=gen(4), dtype=F64)
    implicit = grads_of(TIGHT, x, w, g, solver=deqkit.Broyden(memory=10))
    unrolled = grads_of(deqkit.Unrolled(), x, w, g, solver=deqkit.FixedPoint())
    torch.testing.assert_close(unrolled, implicit, rtol=1e-8, atol=1e-10)

    # Central finite difference of L(x, W) along a random direction.
    dx = torch.randn(x.shape, generator=gen(5), dtype=F64)
    dw = torch.randn(w.shape, generator=gen(6), dtype=F64)

    def loss(x, w):
        with torch.no_grad():
            sol = deqkit.fixed_point(tanh_cell, torch.zeros_like(x), inputs=(x, w),
                                     solver=deqkit.Broyden(memory=10), tol=1e-13, max_steps=200)
        return float((sol.value * g).sum())

    h = 1e-5
    fd = (loss(x.detach() + h * dx, w.detach() + h * dw) - loss(x.detach() - h * dx, w.detach() - h * dw)) / (2 * h)
    directional = float(implicit @ flat(dx, dw))
    assert directional == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_phantom_approaches_implicit_as_steps_grow():
    x, w = tanh_problem(norm=0.8, seed=7)
    g = torch.randn(x.shape, generator=gen(8), dtype=F64)
    implicit = grads_of(TIGHT, x, w, g)
    cosines, errors = [], []
    for k in (1, 2, 4, 8, 16):
        phantom = grads_of(deqkit.Phantom(steps=k, tau=1.0), x, w, g)
        cosines.append(cosine(phantom, implicit))
        errors.append(rel_err(phantom, implicit))
    assert all(later >= earlier - 1e-6 for earlier, later in zip(cosines, cosines[1:])), cosines
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert cosines[0] < 0.99  # the test problem is not one where every mode agrees
    assert cosines[-1] > 0.999


def test_one_step_differs_from_implicit_unless_jacobian_is_small():
    x, w = tanh_problem(norm=0.8, seed=9)
    g = torch.randn(x.shape, generator=gen(10), dtype=F64)
    implicit = grads_of(TIGHT, x, w, g)
    one_step = grads_of(deqkit.OneStep(), x, w, g)
    assert cosine(one_step, implicit) < 0.99 or rel_err(one_step, implicit) > 0.1

    def weak(z, x, w):  # J = 0.01 * diag(tanh') W: nearly zero, so (I - J)^-1 ~ I
        return 0.01 * torch.tanh(z @ w.T) + x

    implicit = grads_of(TIGHT, x, w, g, f=weak)
    one_step = grads_of(deqkit.OneStep(), x, w, g, f=weak)
    assert rel_err(one_step, implicit) < 0.03
    assert cosine(one_step, implicit) > 0.999


def test_unrolled_checkpoint_gives_the_same_gradient():
    x, w = tanh_problem(seed=11)
    g = torch.randn(x.shape, generator=gen(12), dtype=F64)
    for solver in (deqkit.FixedPoint(), deqkit.Anderson(m=3)):
        plain = grads_of(deqkit.Unrolled(), x, w, g, solver=solver, tol=1e-8, max_steps=200)
        ckpt = grads_of(deqkit.Unrolled(checkpoint=True), x, w, g, solver=solver, tol=1e-8, max_steps=200)
        torch.testing.assert_close(ckpt, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", ALL_BACKWARDS)
@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_every_backward_mode_pairs_with_every_solver(solver, backward):
    x, w = tanh_problem(batch=2, dim=4, norm=0.7, seed=13)
    if isinstance(solver, deqkit.NewtonKrylov) and isinstance(backward, deqkit.Unrolled):
        with pytest.raises(ValueError, match=r"Unrolled\(\) cannot differentiate through NewtonKrylov"):
            deqkit.fixed_point(tanh_cell, torch.zeros(2, 4, dtype=F64), inputs=(x, w), solver=solver, backward=backward)
        return
    sol = deqkit.fixed_point(tanh_cell, torch.zeros(2, 4, dtype=F64), inputs=(x, w),
                             solver=solver, backward=backward, tol=1e-8, max_steps=100)
    assert sol.success
    assert sol.value.shape == (2, 4) and sol.value.requires_grad
    gx, gw = torch.autograd.grad(sol.value.square().sum(), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert gx.abs().sum() > 0 and gw.abs().sum() > 0


# -- memory ----------------------------------------------------------------------------------
def saved_tensor_count(backward, max_steps: int) -> tuple[int, deqkit.Solution]:
    """Tensors autograd saves for backward while ``fixed_point`` runs."""
    a = (0.97 * orthogonal(6, seed=14)).requires_grad_(True)  # |eigenvalues| 0.97: no early stop
    x = torch.randn(2, 6, generator=gen(15), dtype=F64)
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sol = deqkit.fixed_point(lambda z, x: z @ a.T + x, torch.zeros(2, 6, dtype=F64),
                                 inputs=(x,), solver=deqkit.FixedPoint(), backward=backward,
                                 tol=1e-15, stop_mode="abs", max_steps=max_steps, divergence=None)
    assert (sol.stats.steps == max_steps).all()  # every step ran
    return count, sol


def test_implicit_graph_does_not_grow_with_iterations():
    short, _ = saved_tensor_count(deqkit.Implicit(), 10)
    long, sol = saved_tensor_count(deqkit.Implicit(), 100)
    assert short == long > 0
    assert sol.value.requires_grad

    short, _ = saved_tensor_count(deqkit.Unrolled(), 10)
    long, _ = saved_tensor_count(deqkit.Unrolled(), 100)
    assert 8 * short <= long <= 12 * short


# -- stats and failures of the adjoint solve -------------------------------------------------
def test_implicit_backward_records_its_stats():
    x, w = tanh_problem(seed=16)
    mode = deqkit.Implicit(tol=1e-9)
    sol = deqkit.fixed_point(tanh_cell, torch.zeros_like(x.detach()), inputs=(x, w), backward=mode, tol=1e-10)
    assert sol.stats.backward == []  # filled when the backward runs
    sol.value.sum().backward()
    (bstats,) = sol.stats.backward
    assert isinstance(bstats, deqkit.BackwardStats)
    assert bstats.result == deqkit.Result.SUCCESS
    assert bstats.steps.shape == (3,) and bool((bstats.steps >= 1).all())
    assert bstats.residual.shape == (3,) and bool((bstats.residual <= mode.tol).all())
    assert bstats.nfev >= int(bstats.steps.max())


def expanding_linear_problem():
    """``z = A z + x`` with an eigenvalue 2 of A: Newton solves it, plain adjoint iteration diverges."""
    q = orthogonal(4, seed=17)
    a = (q @ torch.diag(torch.tensor([2.0, 0.5, 0.3, 0.1], dtype=F64)) @ q.T).requires_grad_(True)
    x = torch.randn(3, 4, generator=gen(18), dtype=F64).requires_grad_(True)
    return (lambda z, x, a: z @ a.T + x), x, a


def expanding_solve(adjoint: deqkit.Implicit, throw: bool = True) -> deqkit.Solution:
    f, x, a = expanding_linear_problem()
    sol = deqkit.fixed_point(f, torch.zeros(3, 4, dtype=F64), inputs=(x, a), solver=deqkit.NewtonKrylov(),
                             backward=adjoint, tol=1e-10, max_steps=10, throw=throw)
    assert sol.success  # the forward solve is fine; only the adjoint iteration is not
    return sol


def test_diverging_adjoint_raises():
    adjoint = deqkit.Implicit(solver=deqkit.FixedPoint(), stop_mode="abs", tol=1e-10, max_steps=100)
    sol = expanding_solve(adjoint)
    with pytest.raises(RuntimeError, match="DIVERGED"):
        sol.value.sum().backward()
    assert sol.stats.backward[-1].result == deqkit.Result.DIVERGED


def test_diverging_adjoint_warns_without_throw():
    adjoint = deqkit.Implicit(solver=deqkit.FixedPoint(), stop_mode="abs", tol=1e-10, max_steps=100)
    sol = expanding_solve(adjoint, throw=False)
    with pytest.warns(RuntimeWarning, match="DIVERGED"):
        sol.value.sum().backward()


def test_adjoint_max_steps_warns():
    adjoint = deqkit.Implicit(solver=deqkit.FixedPoint(), stop_mode="abs", tol=1e-10, max_steps=2)
    sol = expanding_solve(adjoint)
    with pytest.warns(RuntimeWarning, match="max_steps=2"):
        sol.value.sum().backward()
    assert sol.stats.backward[-1].result == deqkit.Result.MAX_STEPS


@pytest.mark.parametrize("adjoint_solver", [
    pytest.param(deqkit.FixedPoint(), id="fixed_point"),
    pytest.param(deqkit.Anderson(m=5), id="anderson"),
    pytest.param(deqkit.Broyden(memory=10), id="broyden"),
])
def test_adjoint_solvers_solve_a_contractive_linear_adjoint(adjoint_solver):
    """Regression: Broyden once dropped its oldest rank-one update when its memory was full,
    which corrupts the later updates (each is built on the ones before); on this problem it
    stalled at MAX_STEPS (NaN in float32) where plain iteration converges in ~35 steps."""
    # z = C z + x with C = diag(d) W, spectral radius about 0.7: the adjoint map u -> C^T u + g
    # contracts, so every solver must meet tol within the budget (plain iteration takes ~35 steps).
    g32 = gen(6)
    w = torch.randn(16, 16, generator=g32) * 0.2
    d = 1 - torch.tanh(torch.randn(64, 16, generator=g32)) ** 2
    g = (torch.randn(64, 16, generator=g32) * 1e-3)[56:57].to(F64)
    c = (torch.diag(d[56]) @ w).to(F64).requires_grad_(True)
    x = torch.randn(1, 16, generator=gen(31), dtype=F64)
    assert float(torch.linalg.eigvals(c.detach()).abs().max()) < 0.75
    sol = deqkit.fixed_point(lambda z, c: z @ c.T + x, torch.zeros(1, 16, dtype=F64), inputs=(c,),
                             solver=deqkit.FixedPoint(), tol=1e-10, max_steps=200,
                             backward=deqkit.Implicit(solver=adjoint_solver, tol=1e-6, max_steps=100))
    sol.value.backward(g)  # a MAX_STEPS adjoint warns, and warnings are errors here
    assert sol.stats.backward[-1].result == deqkit.Result.SUCCESS


# -- autograd semantics ----------------------------------------------------------------------
@pytest.mark.parametrize("backward", ALL_BACKWARDS)
def test_two_calls_before_one_backward_add_up(backward):
    _, w = tanh_problem(batch=2, dim=4, seed=19)
    x1 = 0.3 * torch.randn(2, 4, generator=gen(20), dtype=F64)
    x2 = 0.3 * torch.randn(2, 4, generator=gen(21), dtype=F64)

    def value(x):
        return deqkit.fixed_point(tanh_cell, torch.zeros_like(x), inputs=(x, w), solver=deqkit.Broyden(memory=10),
                                  backward=backward, tol=1e-10, max_steps=100).value

    (g1,) = torch.autograd.grad(value(x1).sum(), w)
    (g2,) = torch.autograd.grad((2 * value(x2)).sum(), w)
    v1, v2 = value(x1), value(x2)
    (g12,) = torch.autograd.grad(v1.sum() + (2 * v2).sum(), w)
    torch.testing.assert_close(g12, g1 + g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", ALL_BACKWARDS)
def test_retain_graph_backward_twice_gives_the_same_gradient(backward):
    x, w = tanh_problem(batch=2, dim=4, seed=22)
    sol = deqkit.fixed_point(tanh_cell, torch.zeros(2, 4, dtype=F64), inputs=(x, w), solver=deqkit.Broyden(memory=10),
                             backward=backward, tol=1e-10, max_steps=100)
    loss = sol.value.square().sum()
    loss.backward(retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    x.grad, w.grad = None, None
    loss.backward()
    torch.testing.assert_close((x.grad, w.grad), first, rtol=1e-10, atol=1e-12)
    if isinstance(backward, deqkit.Implicit):
        assert len(sol.stats.backward) == 2


class TanhModule(torch.nn.Module):
    def __init__(self, dim: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim, dtype=F64)
        with torch.no_grad():
            self.lin.weight.copy_(scaled(dim, 0.7, seed=23))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def test_no_grad_returns_a_plain_value():
    x, w = tanh_problem(seed=24)
    with torch.no_grad():
        sol = deqkit.fixed_point(tanh_cell, torch.zeros(3, 5, dtype=F64), inputs=(x, w), tol=1e-8)
    assert sol.success and not sol.value.requires_grad and sol.value.grad_fn is None


@pytest.mark.parametrize("backward", ALL_BACKWARDS)
def test_eval_mode_still_builds_the_graph(backward):
    cell = TanhModule().eval()
    x = torch.randn(2, 4, generator=gen(25), dtype=F64).requires_grad_(True)
    sol = deqkit.fixed_point(cell, torch.zeros(2, 4, dtype=F64), inputs=(x,), backward=backward,
                             tol=1e-8, max_steps=100)
    assert sol.value.requires_grad
    (gx,) = torch.autograd.grad(sol.value.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0

    # Frozen parameters, input without grad: nothing to differentiate, a plain value.
    cell.requires_grad_(False)
    sol = deqkit.fixed_point(cell, torch.zeros(2, 4, dtype=F64), inputs=(x.detach(),), backward=backward,
                             tol=1e-8, max_steps=100)
    assert not sol.value.requires_grad

    # Frozen parameters, input with grad: the gradient still reaches the input.
    sol = deqkit.fixed_point(cell, torch.zeros(2, 4, dtype=F64), inputs=(x,), backward=backward,
                             tol=1e-8, max_steps=100)
    (gx_frozen,) = torch.autograd.grad(sol.value.sum(), x)
    torch.testing.assert_close(gx_frozen, gx, rtol=1e-5, atol=1e-8)


def test_create_graph_through_implicit_is_refused_not_approximated():
    """Double backward through Implicit raises; a plain backward of the same solve still works."""
    x, w = tanh_problem(seed=26)

    def loss():
        sol = deqkit.fixed_point(tanh_cell, torch.zeros(3, 5, dtype=F64), inputs=(x, w),
                                 solver=deqkit.Broyden(memory=10), backward=TIGHT, tol=1e-12, max_steps=200)
        return sol.value.square().sum()

    with pytest.raises(RuntimeError, match=r"second derivatives through backward=Implicit\(\) are not supported"):
        torch.autograd.grad(loss(), (x, w), create_graph=True)
    plain = torch.autograd.grad(loss(), (x, w))
    assert all(torch.isfinite(g).all() for g in plain)


# -- trajectory and fixed-point correction ---------------------------------------------------
def test_unrolled_trajectory_and_fp_correction():
    _, w = tanh_problem(batch=2, dim=4, seed=27)
    x = 0.3 * torch.randn(2, 4, generator=gen(28), dtype=F64)
    z0 = torch.randn(2, 4, generator=gen(29), dtype=F64)
    sol = deqkit.fixed_point(tanh_cell, z0, inputs=(x, w), solver=deqkit.FixedPoint(), backward=deqkit.Unrolled(),
                             tol=1e-12, max_steps=6, trajectory=6)
    assert sol.result == deqkit.Result.MAX_STEPS
    assert len(sol.trajectory) == 6
    with torch.no_grad():
        z = z0
        for k, iterate in enumerate(sol.trajectory):
            z = tanh_cell(z, x, w)  # f applied k + 1 times to z0
            assert iterate.grad_fn is not None
            torch.testing.assert_close(iterate.detach(), z, rtol=1e-12, atol=1e-12, msg=f"iterate {k}")
        torch.testing.assert_close(sol.value.detach(), z, rtol=1e-12, atol=1e-12)

    assert [round(v, 3) for v in deqkit.fp_weights(6, 0.8)] == [0.328, 0.41, 0.512, 0.64, 0.8, 1.0]
    target = torch.randn(2, 4, generator=gen(30), dtype=F64)

    def loss_fn(z):
        return (z - target).square().mean()

    total = deqkit.fp_correction(loss_fn, sol.trajectory, gamma=0.8)
    manual = sum(0.8 ** (5 - i) * loss_fn(z) for i, z in enumerate(sol.trajectory))
    torch.testing.assert_close(total, manual, rtol=1e-12, atol=0)
    (gw,) = torch.autograd.grad(total, w)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0


def test_phantom_value_and_trajectory_are_the_solves_with_phantom_gradients():
    x, w = tanh_problem(batch=1, dim=4, seed=32)  # one sample: no row frozen before the others
    w = w.detach().requires_grad_(True)
    mode = deqkit.Phantom(steps=3, tau=0.5)
    kwargs = dict(inputs=(x, w), solver=deqkit.FixedPoint(), tol=1e-6, max_steps=50, trajectory=2)
    sol = deqkit.fixed_point(tanh_cell, torch.zeros(1, 4, dtype=F64), backward=mode, **kwargs)
    with torch.no_grad():
        plain = deqkit.fixed_point(tanh_cell, torch.zeros(1, 4, dtype=F64), backward=mode, **kwargs)
    assert torch.equal(sol.value.detach(), plain.value)  # the steps are not part of the value
    assert len(sol.trajectory) == 2 and all(torch.equal(a.detach(), b) for a, b in zip(sol.trajectory, plain.trajectory))
    # the gradient of the last kept image: 3 damped steps from its pre-image (FixedPoint: the previous image)
    z = sol.trajectory[0].detach()
    for _ in range(3):
        z = 0.5 * z + 0.5 * tanh_cell(z, x, w)
    (ref,) = torch.autograd.grad(z.sum(), w)
    (got,) = torch.autograd.grad(sol.trajectory[1].sum(), w, retain_graph=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_implicit_trajectory_carries_the_implicit_gradient_at_each_iterate():
    x, w = tanh_problem(batch=1, dim=4, seed=33)  # one sample: none of its rows is frozen early
    w = w.detach().requires_grad_(True)
    sol = deqkit.fixed_point(tanh_cell, torch.zeros(1, 4, dtype=F64), inputs=(x, w), solver=deqkit.FixedPoint(),
                             backward=TIGHT, tol=1e-10, max_steps=100, trajectory=3)
    assert len(sol.trajectory) == 3
    assert all(z.requires_grad for z in sol.trajectory)
    with torch.no_grad():
        for prev, nxt in zip(sol.trajectory, sol.trajectory[1:]):  # consecutive images: f(prev) = next
            torch.testing.assert_close(tanh_cell(prev, x, w), nxt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sol.trajectory[-1], sol.value.detach(), rtol=1e-12, atol=1e-12)
    # the implicit gradient of the image of z_i (= the previous image): u = (I - J(z_i)^T)^-1 g, dw = f_w(z_i)^T u
    zi = sol.trajectory[1].detach()
    jac = torch.autograd.functional.jacobian(lambda z: tanh_cell(z, x, w.detach()), zi).reshape(4, 4)
    u = torch.linalg.solve(torch.eye(4, dtype=F64) - jac.T, torch.ones(4, dtype=F64)).reshape(1, 4)
    (ref,) = torch.autograd.grad(tanh_cell(zi, x, w), w, u)
    (got,) = torch.autograd.grad(sol.trajectory[2].sum(), w)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
