"""The benchmark problem suite: maps f(z, *inputs) with a starting point, built from a seed.

Each builder returns a ``Problem``. Problems without cross-sample coupling can be solved with
``active_set=True``; all take per-sample inputs through ``inputs`` so that works.

Every builder takes ``device``: the numbers are drawn on the CPU from the seed (so a problem is
the same on every device) and then moved, the map's weights, the start point and the inputs
alike; nothing the map touches stays behind on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Union

import torch
from torch import Tensor, nn

Device = Union[str, torch.device]


@dataclasses.dataclass
class Problem:
    name: str
    description: str
    f: Callable[..., Tensor]
    z0: Tensor
    inputs: tuple
    budget: int  # max_steps of the fixed-budget runs
    coupled: bool = False  # True if f mixes samples (no active set)


def _spectral_scale(w: Tensor, rho: float) -> Tensor:
    return w * (rho / torch.linalg.matrix_norm(w, ord=2))


def tanh_layer(rho: float, dim: int = 256, batch: int = 32, seed: int = 0, device: Device = "cpu") -> Problem:
    """z = tanh(W z + U x) with ||W||_2 = rho: contraction factor at most rho."""
    g = torch.Generator().manual_seed(seed)
    w = _spectral_scale(torch.randn(dim, dim, generator=g), rho)
    u = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    x = 0.3 * torch.randn(batch, dim, generator=g)  # small inputs: tanh stays near linear
    w, u, x = w.to(device), u.to(device), x.to(device)

    def f(z, x):
        return torch.tanh(z @ w.T + x @ u.T)

    return Problem(f"tanh_rho{rho}", f"tanh(Wz+Ux), ||W||={rho}, d={dim}, B={batch}", f, torch.zeros(batch, dim, device=device),
                   (x,), budget=60 if rho < 0.95 else 150)


def heterogeneous(dim: int = 256, batch: int = 32, tokens: int = 1, seed: int = 0, low: float = 0.3, high: float = 0.98,
                  device: Device = "cpu") -> Problem:
    """z_i = tanh(c_i z_i Q + x_i), Q orthogonal: per-sample contraction c_i from low to high.

    With ``tokens > 1`` each sample is a (tokens, dim) state, so the cost of f grows with the
    number of samples evaluated (as in a conv or transformer cell) and skipping finished
    samples (active set) saves real work.
    """
    g = torch.Generator().manual_seed(seed)
    w, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))  # orthogonal: every direction contracts at c_i
    shape = (batch, tokens, dim) if tokens > 1 else (batch, dim)
    x = 0.3 * torch.randn(shape, generator=g)
    # most samples contract fast; a few are slow (the case active sets are for)
    c = torch.cat([torch.linspace(low, 0.6, batch - batch // 8), torch.linspace(0.9, high, batch // 8)])
    c = c.reshape((batch,) + (1,) * (len(shape) - 1))
    w, x, c = w.to(device), x.to(device), c.to(device)

    def f(z, x, c):
        return torch.tanh(c * (z @ w.T) + x)

    size = f"T={tokens}, " if tokens > 1 else ""
    return Problem("heterogeneous", f"tanh(c_i z Q + x), c_i in [{low}, {high}], {size}d={dim}, B={batch}", f,
                   torch.zeros(shape, device=device), (x, c), budget=200)


def linear_ill(dim: int = 256, batch: int = 16, seed: int = 0, top: float = 0.99, device: Device = "cpu") -> Problem:
    """z = A z + b, A symmetric with eigenvalues spread over [0, top] (ill-conditioned I - A)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    eig = top * (1 - torch.logspace(0, -2, dim)) / (1 - 0.01)
    a = (q * eig) @ q.T
    b = torch.randn(batch, dim, generator=g)
    a, b = a.to(device), b.to(device)

    def f(z, b):
        return z @ a.T + b

    return Problem("linear_ill", f"z=Az+b, eig(A) in [0, {top}], d={dim}, B={batch}", f, torch.zeros(batch, dim, device=device), (b,),
                   budget=300)


def get_t(batch: int = 4, seed: int = 0, checkpoint: str | None = None, device: Device = "cpu") -> Problem:
    """The GET-T/2 equilibrium function of the example's model (CIFAR shapes: 256 tokens,
    D=256, 3 blocks, MLP ratio 6), at init or, given a training checkpoint, trained.

    The injection ``u`` comes from the model's own stem and injection transformer applied to
    seeded noise images (and labels), as in a forward pass; ``f(z) = equilibrium_map(z, u)``.
    """
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from examples.get_distillation import models

    torch.manual_seed(seed)
    if checkpoint:
        from examples.get_distillation.train import load_student

        model, _ = load_student(checkpoint)
        state = "trained"
    else:
        model = models.build("GET-T/2", img_size=32, channels=3, num_classes=10).eval()
        state = "at init"
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, model.channels, model.img_size, model.img_size), generator=g)
    labels = torch.arange(batch) % model.num_classes if model.conditional else None
    with torch.no_grad():
        c = model._condition(noise, labels)
        x = model.embed(noise)  # (B, N, D)
        for block in model.injection_blocks:
            x = block(x, c)
        u = model.injection(x)  # (B, N, 3D*L_e)
        if c is not None:
            u = u + c.repeat(1, 1, model.depth_equilibrium)
    z0 = torch.randn(x.shape, generator=g)
    model.to(device)  # the injection is computed once, on the CPU; f runs on the device
    return Problem("get_t_trained" if checkpoint else "get_t", f"GET-T/2 equilibrium transformer ({state}), B={batch}, N={x.shape[1]}, D={x.shape[2]}",
                   model.equilibrium_map, z0.to(device), (u.to(device),), budget=40)


class _ConvCell(nn.Module):
    """An MDEQ-style residual cell on images: GN(relu(z + GN(conv(relu(GN(conv(z))))) + x))."""

    def __init__(self, channels: int = 32, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1, self.gn2, self.gn3 = (nn.GroupNorm(groups, channels, affine=False) for _ in range(3))
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(z)))))
        return self.gn3(torch.relu(z + y + x))


def mdeq_conv(batch: int = 16, channels: int = 32, size: int = 16, seed: int = 0, device: Device = "cpu") -> Problem:
    torch.manual_seed(seed)
    cell = _ConvCell(channels).eval()
    for p in cell.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, channels, size, size).to(device)
    cell.to(device)
    return Problem("mdeq_conv", f"MDEQ-style conv cell, B={batch}, C={channels}, {size}x{size}", cell,
                   torch.zeros(batch, channels, size, size, device=device), (x,), budget=60)


def suite(quick: bool, get_checkpoint: str | None = None, device: Device = "cpu") -> list[Problem]:
    if quick:
        return [tanh_layer(0.9, dim=64, batch=8, device=device), heterogeneous(dim=64, batch=16, device=device)]
    return [
        tanh_layer(0.5, device=device),
        tanh_layer(0.9, device=device),
        tanh_layer(0.99, device=device),
        heterogeneous(dim=256, batch=32, tokens=64, device=device),  # f's cost grows with the samples evaluated
        linear_ill(device=device),
        get_t(device=device),
        *([get_t(checkpoint=get_checkpoint, device=device)] if get_checkpoint else []),
        mdeq_conv(device=device),
    ]
