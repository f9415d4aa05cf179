"""Karras schedule and the Heun / Euler samplers, checked against the exact Gaussian ODE solution."""

from __future__ import annotations

import pytest
import torch

from examples.get_distillation.sampling import heun_nfe, karras_sigmas, sample_euler, sample_heun


def test_karras_schedule_matches_the_formula():
    sigmas = karras_sigmas(18)
    assert sigmas.shape == (19,) and sigmas[-1] == 0
    assert sigmas[0] == 80 and sigmas[17] == pytest.approx(0.002)
    assert (sigmas[1:] < sigmas[:-1]).all()
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="n must be"):
        karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, sigma_min=0.0)


class GaussianDenoiser:
    """The exact denoiser of data N(mu, s^2 I); counts its calls."""

    def __init__(self, mu, s):
        self.mu, self.s, self.calls = mu, s, 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        sigma = sigma[:, None]
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)


def test_heun_reproduces_the_exact_gaussian_ode_solution_with_35_nfe():
    torch.manual_seed(0)
    mu, s = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64), 0.5
    e = torch.randn(64, 16, dtype=torch.float64)
    sigmas = karras_sigmas(18)
    D = GaussianDenoiser(mu, s)
    x = sample_heun(D, sigmas[0] * e, sigmas)
    exact = mu + (sigmas[0] * e - mu) * s / (s**2 + sigmas[0] ** 2).sqrt()
    assert D.calls == 35 == heun_nfe(18)
    # 18 Heun steps are not exact here: the relative error is about 5% where sigma ~ s (a
    # property of the schedule, not a bug: it falls as 1/N^2, see the next test).
    err_heun = (x - exact).abs().max().item()
    assert err_heun < 0.06 * exact.abs().max().item(), err_heun
    D_euler = GaussianDenoiser(mu, s)
    x_euler = sample_euler(D_euler, sigmas[0] * e, sigmas)
    assert D_euler.calls == 18
    assert (x_euler - exact).abs().max().item() > 2 * err_heun  # 1st order is visibly worse


def test_heun_converges_with_more_steps_and_calls_back_each_step():
    mu, s = torch.zeros(4, dtype=torch.float64), 0.3
    e = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = (80 * e) * s / (s**2 + 80**2) ** 0.5
    errors = []
    for n in (18, 72):
        seen = []
        sigmas = karras_sigmas(n)
        x = sample_heun(GaussianDenoiser(mu, s), sigmas[0] * e, sigmas, callback=lambda info: seen.append(info["i"]))
        assert seen == list(range(n))
        errors.append((x - exact).abs().max().item())
    assert errors[1] < errors[0] / 10  # second order: 4x the steps, ~16x smaller error
    assert errors[1] < 5e-3 * exact.abs().max().item()


def test_samplers_reject_bad_schedules():
    with pytest.raises(ValueError, match="sigmas"):
        sample_heun(lambda x, s, y: x, torch.zeros(2, 3), torch.tensor([1.0]))
