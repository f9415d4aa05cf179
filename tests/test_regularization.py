"""Stability diagnostics: ``jacobian_reg`` (Hutchinson) and ``spectral_radius`` (Arnoldi).

Both are checked against the explicit Jacobian of small random maps, computed with
``torch.autograd.functional.jacobian``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deqkit

F64 = torch.float64
BATCH, DIM = 3, 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_map(seed: int, dim: int = DIM, scale: float = 0.8):
    """A nonlinear per-sample map ``z -> W2 tanh(W1 z + b) + 0.3 sin(z)`` with its weights."""
    g = gen(seed)
    w1 = scale * torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim)
    w2 = scale * torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim)
    b = torch.randn(dim, generator=g, dtype=F64)

    def f(z):
        return torch.tanh(z @ w1.T + b) @ w2.T + 0.3 * torch.sin(z)

    return f, w1


def per_sample_jacobians(f, z):
    """(B, d, d): the diagonal blocks of the batch Jacobian (the maps act per sample)."""
    full = torch.autograd.functional.jacobian(f, z)  # (B, d, B, d)
    idx = torch.arange(z.shape[0])
    return full[idx, :, idx, :]


def point(seed: int, batch: int = BATCH, dim: int = DIM):
    return torch.randn(batch, dim, generator=gen(seed), dtype=F64)


# -- jacobian_reg ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_reg_is_unbiased(seed):
    f, _ = random_map(seed)
    z = point(seed + 100)
    jac = per_sample_jacobians(f, z)
    exact = jac.square().sum(dim=(1, 2)) / DIM  # ||J||_F^2 / dim per sample

    n = 4000
    torch.manual_seed(seed)
    reg = deqkit.jacobian_reg(f, z, n_samples=n, create_graph=False)
    # One Gaussian probe gives v^T (J J^T) v with variance 2 ||J J^T||_F^2; average of n, over dim.
    jjt = jac @ jac.transpose(1, 2)
    std_err = torch.sqrt(2 * jjt.square().sum(dim=(1, 2)) / n) / DIM
    assert reg.per_sample.shape == (BATCH,)
    assert bool(((reg.per_sample - exact).abs() <= 4 * std_err).all()), (reg.per_sample, exact, std_err)
    torch.testing.assert_close(reg.mean, reg.per_sample.mean())


def test_jacobian_reg_of_a_scaled_identity_is_exact_on_average():
    z = point(3)
    torch.manual_seed(0)
    reg = deqkit.jacobian_reg(lambda z: 0.5 * z, z, n_samples=2000, create_graph=False)
    # exact value 0.25; one probe's estimate has std 0.25 * sqrt(2 / dim)
    assert bool(((reg.per_sample - 0.25).abs() <= 4 * 0.25 * math.sqrt(2 / DIM / 2000)).all())


def test_jacobian_reg_is_differentiable():
    g = gen(4)
    w = (0.5 * torch.randn(DIM, DIM, generator=g, dtype=F64)).requires_grad_(True)
    z = point(5).requires_grad_(True)
    reg = deqkit.jacobian_reg(lambda z: torch.tanh(z @ w.T), z, n_samples=2)
    assert reg.mean.requires_grad
    (gw,) = torch.autograd.grad(reg.mean, w)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0

    no_graph = deqkit.jacobian_reg(lambda z: torch.tanh(z @ w.T), z, n_samples=2, create_graph=False)
    assert not no_graph.mean.requires_grad


def test_jacobian_reg_reuses_fz():
    f, _ = random_map(6)
    z = point(7).requires_grad_(True)
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    torch.manual_seed(8)
    fresh = deqkit.jacobian_reg(counted, z, n_samples=3)
    assert len(calls) == 1
    fz = f(z)
    torch.manual_seed(8)
    reused = deqkit.jacobian_reg(counted, z, n_samples=3, fz=fz)
    assert len(calls) == 1  # f was not called again
    torch.testing.assert_close(reused.per_sample, fresh.per_sample, rtol=1e-12, atol=0)
    torch.manual_seed(9)
    other = deqkit.jacobian_reg(counted, z, n_samples=3, fz=fz)
    assert not torch.equal(other.per_sample, fresh.per_sample)  # the probes are random


def test_jacobian_reg_errors():
    f, _ = random_map(0)
    z = point(0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_samples"):
            deqkit.jacobian_reg(f, z, n_samples=bad)
    with pytest.raises(ValueError, match="shape"):
        deqkit.jacobian_reg(lambda z: z[:, :2], z)
    with pytest.raises(ValueError, match="batch"):
        deqkit.jacobian_reg(f, torch.zeros(0, DIM, dtype=F64))
    with pytest.raises(TypeError, match="floating"):
        deqkit.jacobian_reg(f, torch.zeros(2, DIM, dtype=torch.long))


# -- spectral_radius -------------------------------------------------------------------------
def exact_radius(f, z):
    return torch.linalg.eigvals(per_sample_jacobians(f, z)).abs().amax(dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spectral_radius_matches_eigenvalues_of_random_maps(seed):
    f, _ = random_map(seed, scale=1.2)
    z = point(seed + 50)
    radius = deqkit.spectral_radius(f, z, n_iters=DIM, seed=seed)
    assert radius.shape == (BATCH,)
    torch.testing.assert_close(radius, exact_radius(f, z), rtol=1e-3, atol=0)


def rotation_dominated(dim: int = 6, seed: int = 0):
    """A map whose Jacobian's dominant eigenvalues are a complex pair.

    ``tanh(z) M^T`` with M a rotation block of modulus 0.95 (angle 1 rad), smaller real
    entries on the rest of the diagonal, plus a small random symmetric part.
    """
    g = gen(seed)
    m = torch.zeros(dim, dim, dtype=F64)
    c, s = 0.95 * math.cos(1.0), 0.95 * math.sin(1.0)
    m[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=F64)
    m[2:, 2:] = torch.diag(torch.linspace(0.5, -0.4, dim - 2, dtype=F64))
    sym = torch.randn(dim, dim, generator=g, dtype=F64)
    m = m + 0.05 * (sym + sym.T) / 2
    return lambda z: torch.tanh(z) @ m.T


def test_spectral_radius_with_a_complex_dominant_pair():
    f = rotation_dominated()
    z = 0.3 * point(11, dim=6)
    eig = torch.linalg.eigvals(per_sample_jacobians(f, z))
    dominant = eig[torch.arange(BATCH), eig.abs().argmax(dim=1)]
    assert bool((dominant.imag.abs() > 0.1).all())  # the case the power method gets wrong
    radius = deqkit.spectral_radius(f, z, n_iters=6, seed=0)
    torch.testing.assert_close(radius, eig.abs().amax(dim=1), rtol=1e-3, atol=0)


def test_spectral_radius_with_fewer_iterations_stays_within_the_norm():
    f, _ = random_map(4, dim=12, scale=1.2)
    z = point(12, dim=12)
    jac = per_sample_jacobians(f, z)
    norm = torch.linalg.matrix_norm(jac, ord=2)
    rough = deqkit.spectral_radius(f, z, n_iters=4, seed=0)
    full = deqkit.spectral_radius(f, z, n_iters=12, seed=0)
    torch.testing.assert_close(full, exact_radius(f, z), rtol=1e-3, atol=0)
    # Ritz values lie in the field of values of J, whose radius is at most ||J||_2.
    assert bool((rough <= norm * (1 + 1e-9)).all()) and bool((rough > 0).all())


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    batch=st.integers(1, 3),
    c=st.floats(0.05, 3.0),
    sign=st.sampled_from([1.0, -1.0]),
    n_iters=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, F64]),
)
def test_spectral_radius_of_a_scaling_for_any_shape(shape, batch, c, sign, n_iters, dtype):
    z = torch.randn(batch, *shape, generator=gen(0), dtype=dtype)
    radius = deqkit.spectral_radius(lambda z: sign * c * z, z, n_iters=n_iters, seed=0)
    assert radius.shape == (batch,)
    torch.testing.assert_close(radius.double(), torch.full((batch,), c, dtype=F64), rtol=1e-5, atol=0)


def test_spectral_radius_is_seeded_and_keeps_no_graph():
    w = (0.5 * torch.randn(DIM, DIM, generator=gen(13), dtype=F64)).requires_grad_(True)
    z = point(14).requires_grad_(True)
    f = lambda z: torch.tanh(z @ w.T)  # noqa: E731
    a = deqkit.spectral_radius(f, z, n_iters=3, seed=1)
    b = deqkit.spectral_radius(f, z, n_iters=3, seed=1)
    assert torch.equal(a, b)
    assert not a.requires_grad and a.grad_fn is None
    assert w.grad is None and z.grad is None


def test_spectral_radius_errors():
    f, _ = random_map(0)
    z = point(0)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="n_iters"):
            deqkit.spectral_radius(f, z, n_iters=bad)
    with pytest.raises(ValueError, match="shape"):
        deqkit.spectral_radius(lambda z: z.sum(dim=1, keepdim=True), z)
    with pytest.raises(ValueError, match="batch"):
        deqkit.spectral_radius(f, torch.zeros(0, DIM, dtype=F64))
