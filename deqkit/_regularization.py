"""Jacobian regularisation and stability diagnostics of the map at a point."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple, Optional, cast

import torch
from torch import Tensor

from . import _checks
from ._numerics import arnoldi_step


class JacobianReg(NamedTuple):
    per_sample: Tensor  # (B,) estimate of ||J_f(z_i)||_F^2 / dim
    mean: Tensor        # scalar: the batch mean, the usual loss term


@contextlib.contextmanager
def _double_differentiable_attention() -> Iterator[None]:
    """Select the math kernel of ``F.scaled_dot_product_attention`` inside the context.

    The fused CPU and flash kernels have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), which a
    differentiable Jacobian penalty needs; the math kernel has it and computes the same values.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the selector
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _vjp(name: str, fz: Tensor, z: Tensor, v: Tensor, **kwargs: bool) -> Tensor:
    """``v^T J`` through ``fz = f(z)``, with a clear error when f(z) does not depend on z."""
    if not fz.requires_grad:
        raise ValueError(
            f"{name}: f(z) does not depend on z (its output has no autograd graph back to z): there is "
            "no Jacobian to measure. Check that f uses z and does not detach it or run under no_grad."
        )
    (vjp,) = torch.autograd.grad(fz, z, v, allow_unused=True, **kwargs)
    if vjp is None:
        raise ValueError(f"{name}: f(z) does not depend on z (z is not used in its graph): there is no Jacobian to measure")
    return vjp


def _check_batch(name: str, z: Tensor) -> None:
    if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[0] == 0:
        raise ValueError(f"{name} must be a tensor with a non-empty batch dimension first")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {z.dtype}")


def jacobian_reg(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    n_samples: int = 1,
    *,
    fz: Optional[Tensor] = None,
    create_graph: bool = True,
) -> JacobianReg:
    """Hutchinson estimate of ``||J_f(z)||_F^2 / dim`` per sample (Bai et al., 2021).

    With Gaussian probes ``v``, ``E ||v^T J||^2 = ||J||_F^2``: each probe costs one
    vector-Jacobian product. The estimate is differentiable (``create_graph=True``) so it can
    be added to the training loss to keep the map well conditioned (and the solve short).

    Args:
        f: the map, called as ``f(z)`` (close over other inputs).
        z: the point, shape (B, ...); typically the detached fixed point with
            ``requires_grad_()``, or an iterate already in the graph.
        n_samples: number of probes averaged, >= 1.
        fz: ``f(z)`` if already computed with a graph from ``z`` (saves a call). Without it f
            is called with the math kernel of ``scaled_dot_product_attention`` selected, whose
            double backward exists (the fused CPU kernel's does not).
        create_graph: keep the graph so the estimate can be differentiated.

    Returns:
        ``JacobianReg(per_sample, mean)``.

    Reference: Bai, Koltun & Kolter, "Stabilizing equilibrium models by Jacobian
    regularization" (ICML 2021).

    Example:
        >>> import torch, deqkit
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> reg = deqkit.jacobian_reg(lambda z: 0.5 * z, z, n_samples=4000)
        >>> bool((reg.per_sample - 0.25).abs().max() < 0.02)  # ||0.5 I||_F^2 / 3 = 0.25
        True
    """
    _check_batch("z", z)
    n_samples = _checks.integer("n_samples", n_samples)
    with torch.enable_grad():
        if not z.requires_grad:
            z = z.detach().requires_grad_(True)
        if fz is None:
            with _double_differentiable_attention():
                fz = f(z)
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            raise ValueError(f"f(z) must have z's shape {tuple(z.shape)}, got {tuple(getattr(fz, 'shape', ()))}")
        dim = z[0].numel()
        total = z.new_zeros(z.shape[0])
        for i in range(n_samples):
            v = torch.randn_like(fz)
            vjp = _vjp("jacobian_reg", fz, z, v, retain_graph=True, create_graph=create_graph)
            total = total + vjp.reshape(z.shape[0], -1).pow(2).sum(dim=1)
    per_sample = total / (n_samples * dim)
    return JacobianReg(per_sample, per_sample.mean())


def spectral_radius(f: Callable[[Tensor], Tensor], z: Tensor, n_iters: int = 20, *, seed: Optional[int] = None) -> Tensor:
    """Estimate the spectral radius of ``J_f(z)`` per sample (largest |eigenvalue|).

    Runs ``n_iters`` steps of Arnoldi on vector-Jacobian products and takes the largest
    modulus among the Ritz values. Unlike the plain power method it is right when the
    dominant eigenvalues are a complex pair (rotations, common in trained DEQs), and it
    converges faster. No graph is kept. Values above 1 mean the fixed point is unstable for
    plain iteration; a value near 1 means slow convergence.

    Args:
        f: the map, called as ``f(z)``.
        z: the point, shape (B, ...).
        n_iters: Krylov dimension (vector-Jacobian products), >= 1.
        seed: seed of the random start vector (None: torch's global generator).

    Example:
        >>> import torch, deqkit
        >>> rot = torch.tensor([[0.0, -0.9], [0.9, 0.0]])  # eigenvalues +-0.9i
        >>> r = deqkit.spectral_radius(lambda z: z @ rot.T, torch.zeros(3, 2), n_iters=2)
        >>> torch.allclose(r, torch.full((3,), 0.9))
        True
    """
    _check_batch("z", z)
    n_iters = _checks.integer("n_iters", n_iters)
    b = z.shape[0]
    dt = torch.promote_types(z.dtype, torch.float32)
    gen = torch.Generator(device=z.device).manual_seed(seed) if seed is not None else None
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        fz = f(zr)
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            raise ValueError(f"f(z) must have z's shape {tuple(z.shape)}, got {tuple(getattr(fz, 'shape', ()))}")
        n = min(n_iters, z[0].numel())
        v = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype).reshape(b, -1).to(dt)
        basis = [v / torch.linalg.vector_norm(v, dim=1, keepdim=True)]
        h = torch.zeros(b, n + 1, n, dtype=dt, device=z.device)
        for j in range(n):
            w = _vjp("spectral_radius", fz, zr, basis[j].reshape(z.shape).to(z.dtype), retain_graph=j < n - 1)
            w = w.detach().reshape(b, -1).to(dt)  # J^T v: same spectrum as J
            w, h[:, : j + 1, j], norm = arnoldi_step(w, basis)
            h[:, j + 1, j] = norm
            basis.append(w / norm.clamp_min(torch.finfo(dt).tiny).unsqueeze(1))
    ritz = torch.linalg.eigvals(h[:, :n, :n])
    return cast(Tensor, ritz.abs().amax(dim=1).to(dt))
