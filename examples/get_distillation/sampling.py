"""Karras/EDM noise schedule and deterministic ODE samplers, as plain functions.

A denoiser is any callable ``denoiser(x, sigma, labels) -> D(x; sigma)`` with ``sigma`` of
shape (B,). References: Karras et al. 2022 (EDM), eq. 5 and Algorithm 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Denoiser = Callable[..., torch.Tensor]
SIGMA_LIMIT = 1e4  # the largest noise level accepted (EDM: 80); sigma^2 stays far inside float32


def karras_sigmas(n: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The EDM time steps sigma_0 > ... > sigma_{n-1} = sigma_min, followed by sigma_n = 0.

    Returns a tensor of n + 1 values.

    >>> karras_sigmas(18)[[0, 17, 18]].tolist()
    [80.0, 0.002, 0.0]
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    check_schedule(sigma_min, sigma_max, rho)
    i = torch.arange(n, dtype=torch.float64)
    ramp = i / max(n - 1, 1)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact end points despite rounding
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def check_schedule(sigma_min: float, sigma_max: float, rho: float) -> None:
    """Raise ValueError naming the value unless 0 < sigma_min <= sigma_max <= SIGMA_LIMIT and rho > 0."""
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min <= sigma_max <= SIGMA_LIMIT):
        raise ValueError(f"need 0 < sigma_min <= sigma_max <= {SIGMA_LIMIT:g}, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0 (EDM: 7), got {rho}")


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    sigma_b = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)  # (B,)
    return denoiser(x, sigma_b, labels)


def _check(x: torch.Tensor, sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}")
    if x.ndim < 2:
        raise ValueError(f"x must be batched (B, ...), got shape {tuple(x.shape)}")


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                labels: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (Algorithm 1 without churn).

    ``x`` is the start x_0 = sigma_0 * e (already scaled); ``sigmas`` comes from
    :func:`karras_sigmas` (ending in 0). N steps cost 2N - 1 denoiser calls (35 for N = 18):
    the step to sigma = 0 is Euler only. Output is not clipped. ``callback`` receives a dict
    with i, sigma, sigma_next, x (the new iterate) and denoised after every step.
    """
    _check(x, sigmas)
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]           # sigma_i, sigma_{i+1}
        x_cur = x
        t_hat = t_cur                                       # no churn: gamma_i = 0, so t_hat = t_i
        denoised = _call(denoiser, x_cur, t_hat, labels)
        d_cur = (x_cur - denoised) / t_hat                  # d_i = (x_i - D(x_i; t_i)) / t_i
        x_next = x_cur + (t_next - t_hat) * d_cur           # Euler step
        if t_next != 0:                                     # 2nd-order correction
            denoised = _call(denoiser, x_next, t_next, labels)
            d_prime = (x_next - denoised) / t_next          # d'_i
            x_next = x_cur + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        if callback is not None:
            callback({"i": i, "sigma": float(t_cur), "sigma_next": float(t_next), "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                 labels: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """First-order (Euler) sampler of the probability-flow ODE: N steps cost N denoiser calls."""
    _check(x, sigmas)
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = _call(denoiser, x, t_cur, labels)
        d_cur = (x - denoised) / t_cur                      # dx/dt at (x_i, t_i)
        x = x + (t_next - t_cur) * d_cur                    # x_{i+1} = x_i + (t_{i+1} - t_i) d_i
        if callback is not None:
            callback({"i": i, "sigma": float(t_cur), "sigma_next": float(t_next), "x": x, "denoised": denoised})
    return x


def heun_nfe(num_steps: int) -> int:
    """Denoiser calls of :func:`sample_heun` for ``num_steps`` steps: 2N - 1."""
    return 2 * num_steps - 1
