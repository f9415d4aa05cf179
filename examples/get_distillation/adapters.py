"""External teachers as EDM denoisers D(x, sigma, labels).

- :class:`EpsilonVPDenoiser`: a diffusers-style epsilon-prediction (DDPM / VP) UNet.
- :func:`load_edm_pickle`: EDM's own released network pickles (needs the user's EDM code,
  and ``trust=True``: unpickling runs code from the file).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class EpsilonVPDenoiser(nn.Module):
    """A discrete-time epsilon-prediction (DDPM / VP) model as an EDM denoiser D(x, sigma).

    With sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t):
    D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)), where t(sigma) is the nearest
    timestep in log-sigma (``interpolate=False``) or a fractional one found by linear
    interpolation in log-sigma (for models that accept float timesteps).

    ``eps_model`` is called as ``eps_model(x_in, t)`` (plus ``class_labels=labels`` when labels
    are given), and may return a tensor or an object with ``.sample`` (diffusers' UNet2DModel).
    Sample with sigma_max <= ``self.sigma_max`` and sigma_min >= ``self.sigma_min``.

    Example (a diffusers checkpoint; not a dependency of this project)::

        unet = diffusers.UNet2DModel.from_pretrained("google/ddpm-cifar10-32")
        sched = diffusers.DDPMScheduler.from_pretrained("google/ddpm-cifar10-32")
        D = EpsilonVPDenoiser(unet, sched.alphas_cumprod)
    """

    def __init__(self, eps_model: nn.Module, alphas_cumprod: torch.Tensor, interpolate: bool = False):
        super().__init__()
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with >= 2 entries, got shape {tuple(alphas_cumprod.shape)}")
        if not ((alphas_cumprod > 0) & (alphas_cumprod < 1)).all():
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        if not (sigmas[1:] > sigmas[:-1]).all():
            raise ValueError("alphas_cumprod must decrease with t (sigma(t) increasing)")
        self.eps_model = eps_model
        self.interpolate = interpolate
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma): nearest index (long) or fractional index (float), per sample."""
        log_sigma = sigma.to(torch.float64).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])  # (B,)
        if not self.interpolate:
            return (log_sigma[:, None] - self.log_sigmas[None]).abs().argmin(dim=1)
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo = hi - 1
        w = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return (lo + w).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        s = sigma[:, None, None, None]
        x_in = x / (1 + s**2).sqrt()  # VP-scaled input  (B, C, H, W)
        t = self.timestep(sigma).to(x.device)
        kwargs = {"class_labels": labels} if labels is not None else {}
        eps = self.eps_model(x_in, t, **kwargs)
        eps = getattr(eps, "sample", eps)
        if isinstance(eps, (tuple, list)):
            eps = eps[0]
        return x - s * eps.to(x.dtype)


class _EDMNetAdapter(nn.Module):
    """EDM's networks take (x, sigma, class_labels one-hot); this takes integer labels."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = int(getattr(net, "label_dim", 0)) or None
        self.sigma_data = float(getattr(net, "sigma_data", 0.5))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        class_labels = None
        if self.num_classes:
            if labels is None:
                raise ValueError("this EDM network is class-conditional: pass labels")
            class_labels = F.one_hot(labels.long(), self.num_classes).to(x.dtype)
        return self.net(x.float(), sigma.float(), class_labels).to(x.dtype)


def load_edm_pickle(path: str | os.PathLike, *, trust: bool = False) -> nn.Module:
    """Load one of EDM's released network pickles (e.g. edm-cifar10-32x32-cond-vp.pkl) as D(x, sigma, labels).

    EDM pickles hold Python objects of EDM's own code, so unpickling needs that code: clone
    https://github.com/NVlabs/edm and put its root on PYTHONPATH (it provides ``torch_utils``
    and ``dnnlib``), e.g. ``PYTHONPATH=/path/to/edm python -m examples.get_distillation pairs
    --teacher edm-cifar10-32x32-cond-vp.pkl ...``. Unpickling runs code: load only files you
    trust, and say so with ``trust=True`` (``--trust-pickle`` on the command line); without it
    this raises before reading the file. Returns the EMA network in eval mode, taking integer labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM pickle not found: expected a file at {str(path)!r}")
    if not trust:
        raise ValueError(f"{str(path)!r} is a pickle: loading it executes code stored in the file. Pass "
                         "trust=True (--trust-pickle) only for files from a source you trust")
    try:
        import dnnlib  # noqa: F401
        import torch_utils  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"loading {path.name} needs EDM's code: clone https://github.com/NVlabs/edm and add its root "
            "to PYTHONPATH (it provides the 'torch_utils' and 'dnnlib' packages the pickle refers to)"
        ) from exc
    with open(path, "rb") as f:
        obj = pickle.load(f)  # noqa: S301 - EDM's format; documented above
    net = obj.get("ema") if isinstance(obj, dict) else None
    if not isinstance(net, nn.Module):
        raise RuntimeError(f"{path}: expected an EDM network pickle (a dict with an 'ema' network)")
    return _EDMNetAdapter(net).eval().requires_grad_(False)
