"""The teacher's network: an EDM-preconditioned denoiser D(x, sigma, labels) around a small UNet.

- :class:`UNet`: a compact conv UNet backbone F(x; c_noise, labels), sized by ``PRESETS``.
- :class:`EDMDenoiser`: D = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, Table 1).
- :func:`edm_loss`: log-normal sigma, EDM weighting.

Training lives in ``teacher.py``; denoisers made elsewhere in ``adapters.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- backbone

# name -> UNet keyword arguments. "tiny" is for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=8, channel_mult=(1, 2), num_blocks=1, emb_dim=16),
    "digits": dict(channels=64, channel_mult=(1,), num_blocks=1, emb_dim=64),  # 0.49M params
    "cifar-small": dict(channels=64, channel_mult=(1, 2, 2), num_blocks=2, emb_dim=256),
}


class FourierEmbedding(nn.Module):
    """Sinusoidal (positional) embedding of a scalar per sample, e.g. c_noise = ln(sigma) / 4."""

    def __init__(self, dim: int, max_period: float = 10.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half) * 100.0
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """A compact UNet F(x; c_noise, labels): residual conv blocks, one resolution per entry of
    ``channel_mult``, skip connections, a sinusoidal noise embedding and an optional class
    embedding added to it."""

    def __init__(self, in_channels: int = 1, channels: int = 64, channel_mult: tuple[int, ...] = (1, 2),
                 num_blocks: int = 1, emb_dim: int = 128, num_classes: int | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.noise_embed = nn.Sequential(FourierEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                         nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        widths, c = [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.down.append(ResBlock(c, channels * mult, emb_dim))
                c = channels * mult
                widths.append(c)
            if level < len(channel_mult) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                widths.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim), ResBlock(c, c, emb_dim)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                self.up.append(ResBlock(c + widths.pop(), channels * mult, emb_dim))
                c = channels * mult
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(min(8, c), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.channel_mult, self.num_blocks = tuple(channel_mult), num_blocks

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.noise_embed(c_noise)  # (B, E)
        if self.class_embed is not None:
            if labels is None:
                raise ValueError("this backbone is class-conditional: pass labels")
            emb = emb + self.class_embed(labels)
        emb = F.silu(emb)
        h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        blocks, downs = iter(self.down), iter(self.downsample)
        for level in range(len(self.channel_mult)):
            for _ in range(self.num_blocks):
                h = next(blocks)(h, emb)
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = next(downs)(h)  # (B, C', H/2, W/2)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        blocks, ups = iter(self.up), iter(self.upsample)
        for level in reversed(range(len(self.channel_mult))):
            for _ in range(self.num_blocks + 1):
                h = next(blocks)(torch.cat([h, skips.pop()], dim=1), emb)
            if level > 0:
                h = next(ups)(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C', 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_in, H, W)


def build_backbone(preset: str, in_channels: int, num_classes: int | None) -> UNet:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return UNet(in_channels=in_channels, num_classes=num_classes, **PRESETS[preset])


# ----------------------------------------------------------------------------- EDM wrapper


class EDMDenoiser(nn.Module):
    """EDM preconditioning around a backbone F(x; c_noise, labels):

    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.backbone, "num_classes", None)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)                                # (B, 1, 1, 1)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log().flatten() / 4                            # (B,)
        F_x = self.backbone((c_in * x).to(torch.float32), c_noise.to(torch.float32), labels)  # (B, C, H, W)
        return c_skip * x + c_out * F_x.to(x.dtype)


def edm_loss(denoiser: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *,
             P_mean: float = -1.2, P_std: float = 1.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's training loss: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2.

    Random numbers come from ``generator`` (on the CPU) when given, so training replays exactly.
    """
    B = images.shape[0]
    rnd = torch.randn(B, generator=generator).to(images.device)
    sigma = (rnd * P_std + P_mean).exp().to(images.dtype)  # (B,)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)  # (B, C, H, W)
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # (B,)
    denoised = denoiser(images + noise * sigma[:, None, None, None], sigma, labels)
    per_sample = ((denoised - images) ** 2).flatten(1).mean(1)  # (B,)
    return (weight * per_sample).mean()
