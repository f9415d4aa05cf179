"""``Problem``: the map as solver steps see it (counted calls, the residual the loop shares,
Jacobian-vector products)."""

from __future__ import annotations

import warnings

import pytest
import torch

import deqkit
from deqkit._problem import Problem

F64 = torch.float64


def tanh_map(dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=F64) * 0.3
    return (lambda z: torch.tanh(z @ w.T + 0.1)), w


def exact_jvp(w, z, v):
    return (1 - torch.tanh(z @ w.T + 0.1) ** 2) * (v @ w.T)


# -- the residual the loop shares with the step ---------------------------------------------------


@torch.no_grad()
def test_the_step_reads_the_loops_own_residual_and_nothing_stale():
    f, _ = tanh_map()
    z = torch.randn(3, 5, dtype=F64)
    fz = f(z)
    problem = Problem(lambda z: f(z), z)
    problem.norms(z, fz)
    g, norm = problem.residual(z, fz)
    again_g, again_norm = problem.residual(z, fz)
    assert again_norm is norm and again_g.data_ptr() == g.data_ptr()  # the very tensors: nothing recomputed
    torch.testing.assert_close(norm, torch.linalg.vector_norm(fz - z, dim=1), rtol=1e-14, atol=0)
    # another z or another f(z): computed anew, never the remembered one
    other = fz + 1.0
    g2, norm2 = problem.residual(z, other)
    torch.testing.assert_close(g2, other - z, rtol=0, atol=0)
    z2 = z + 1.0
    g3, _ = problem.residual(z2, fz)
    torch.testing.assert_close(g3, fz - z2, rtol=0, atol=0)
    assert norm2 is not norm


def test_under_autograd_the_residual_is_recomputed_with_its_graph():
    f, _ = tanh_map()
    z = torch.randn(3, 5, dtype=F64, requires_grad=True)
    fz = f(z)
    problem = Problem(lambda z: f(z), z)
    problem.norms(z, fz)
    g, _ = problem.residual(z, fz)
    assert g.requires_grad  # Unrolled differentiates through the step's residual


# -- Jacobian-vector products ---------------------------------------------------------------------


def test_jvp_by_default_is_forward_mode_exact():
    f, w = tanh_map()
    z = torch.randn(4, 5, dtype=F64)
    v = torch.randn(4, 5, dtype=F64)
    problem = Problem(lambda z: f(z), z)
    got = problem.jvp(z, v, fz=f(z))  # the default method
    torch.testing.assert_close(got, exact_jvp(w, z, v), rtol=1e-13, atol=1e-15)  # finite differences: ~1e-8
    assert problem.nfev == 1 and problem.sample_evals == 4
    fd = problem.jvp(z, v, fz=f(z), method="finite_difference")
    assert (fd - exact_jvp(w, z, v)).abs().max() > 1e-12  # it is not the exact one: the default above was
    torch.testing.assert_close(fd, exact_jvp(w, z, v), rtol=1e-6, atol=1e-7)


def test_finite_differences_need_fz():
    f, _ = tanh_map()
    z = torch.randn(2, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"^a finite-difference JVP needs fz = f\(z\)$"):
        Problem(lambda z: f(z), z).jvp(z, z, method="finite_difference")


@pytest.mark.parametrize("v_scale", [1e-3, 1.0, 1e3])
def test_finite_differences_step_per_sample_and_per_direction(v_scale):
    # a sample 1e6 times larger than the others, directions of any length: each sample's
    # difference quotient is accurate on its own
    f, w = tanh_map()
    z = torch.randn(3, 5, dtype=F64) * torch.tensor([[1.0], [1e6], [1e-3]], dtype=F64)
    v = v_scale * torch.randn(3, 5, dtype=F64) * torch.tensor([[1.0], [1e6], [1.0]], dtype=F64)
    problem = Problem(lambda z: f(z), z)
    got = problem.jvp(z, v, fz=f(z), method="finite_difference")
    exact = exact_jvp(w, z, v)
    for i in (0, 2):
        torch.testing.assert_close(got[i], exact[i], rtol=1e-6, atol=1e-7 * v_scale)
        alone = Problem(lambda z: f(z), z[i:i + 1]).jvp(z[i:i + 1], v[i:i + 1], fz=f(z[i:i + 1]), method="finite_difference")
        torch.testing.assert_close(got[i], alone[0], rtol=1e-6, atol=1e-7 * v_scale)


def test_jvp_takes_a_direction_in_another_dtype():
    f, w = tanh_map()
    z = torch.randn(2, 5, dtype=F64)
    v = torch.randn(2, 5, dtype=torch.float32)  # GMRES's basis is in its working dtype
    got = Problem(lambda z: f(z), z).jvp(z, v, fz=f(z), method="forward")
    assert got.dtype == F64
    torch.testing.assert_close(got, exact_jvp(w, z, v.double()), rtol=1e-13, atol=1e-15)


def test_jvp_sees_the_rows_it_is_called_on():
    # a per-sample parameter sliced by the rows deqkit says f is called on: the JVP of a
    # compacted active set must slice it too
    from deqkit._context import current_rows

    scale = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=F64).unsqueeze(1)

    def f(z, x):
        rows = current_rows()
        s = scale if rows is None else scale.index_select(0, rows)
        return s * torch.tanh(z) + x

    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=F64) * torch.ones(4, 3, dtype=F64)
    kw = dict(inputs=(x,), solver=deqkit.NewtonKrylov(jvp="forward"), tol=1e-12, max_steps=30)
    whole = deqkit.fixed_point(f, torch.zeros(4, 3, dtype=F64), **kw)
    active = deqkit.fixed_point(f, torch.zeros(4, 3, dtype=F64), active_set=True, **kw)
    assert whole.success and active.success
    torch.testing.assert_close(active.value, whole.value, rtol=1e-12, atol=1e-12)


def test_a_warning_from_f_inside_a_jvp_reaches_the_caller():
    f, _ = tanh_map()

    def noisy(z):
        warnings.warn("f is deprecated", DeprecationWarning, stacklevel=2)
        return f(z)

    z = torch.randn(2, 5, dtype=F64)
    with pytest.warns(DeprecationWarning, match="f is deprecated"):
        Problem(noisy, z).jvp(z, z, method="forward")


def test_restart_gives_back_the_whole_batch_and_keeps_the_counts():
    z = torch.zeros(4, 2, dtype=F64)
    x = torch.arange(4, dtype=F64).reshape(4, 1) * torch.ones(4, 2, dtype=F64)
    problem = Problem(lambda z, x: 0.5 * z + x, z, inputs=(x,), active_set=True)
    problem.f(z)
    local = problem.compact(__import__("numpy").array([1, 3]))
    assert problem.work_rows.tolist() == [1, 3] and local.tolist() == [1, 3]
    out = problem.f(z[:2])
    torch.testing.assert_close(out, x[[1, 3]], rtol=0, atol=0)
    problem.restart()
    assert problem.work_rows is None and bool(problem.active.all()) and problem.active.shape == (4,)
    torch.testing.assert_close(problem.f(z), x, rtol=0, atol=0)
    assert problem.nfev == 3 and problem.sample_evals == 4 + 2 + 4


def test_finite_difference_steps_scale_with_the_iterate():
    # far from 0 the step must grow with |z| (h ~ sqrt(eps) (1 + |z|) / |v|), or round-off swamps it
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 5, generator=g, dtype=F64) * 0.3
    f = lambda z: z @ w.T + 0.05 * torch.sin(z)  # noqa: E731
    z = torch.randn(2, 5, generator=g, dtype=F64) * torch.tensor([[1e3], [1.0]], dtype=F64)
    v = torch.randn(2, 5, generator=g, dtype=F64)
    exact = v @ w.T + 0.05 * torch.cos(z) * v
    got = Problem(f, z).jvp(z, v, fz=f(z), method="finite_difference")
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
