"""The teacher: an EDM-preconditioned denoiser D(x, sigma, labels), its training command, and
adapters for external teachers.

- :class:`UNet`: a compact conv UNet backbone F(x; c_noise, labels), sized by ``PRESETS``.
- :class:`EDMDenoiser`: D = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, Table 1).
- :func:`edm_loss`: log-normal sigma, EDM weighting.
- :func:`train`: a linear, resumable training loop (``python -m examples.get_distillation teacher``).
- :class:`EpsilonVPDenoiser`: a diffusers-style epsilon-prediction UNet as D(x, sigma).
- :func:`load_edm_pickle`: EDM's own CIFAR-10 checkpoints (needs the user's EDM code).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cli, common, data, sampling

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


update_ema = common.update_ema  # kept under this name for callers of the teacher module


# ----------------------------------------------------------------------------- config & checkpoints


@dataclasses.dataclass
class TeacherConfig:
    """A teacher training run; each field is one command-line option (``cli.add_config_arguments``)."""

    out: str = cli.option("runs/teacher", help="run folder (resumes from its checkpoint.pt if present)")
    data: str = cli.option("digits", help="training images", choices=data.DATASETS)
    data_root: Optional[str] = cli.option(None, help="folder for cifar10 / folder data")
    image_size: int = cli.option(32, help="resize for --data folder")
    preset: str = cli.option("digits", help="backbone size", choices=lambda: sorted(PRESETS))
    cond: bool = cli.option(True, help="class-conditional (--no-cond or --uncond: unconditional)")
    steps: int = cli.option(2000, help="optimizer steps")
    batch: int = cli.option(128, help="batch size")
    lr: float = cli.option(2e-3, help="Adam learning rate after warm-up")
    warmup: int = cli.option(100, help="linear lr warm-up steps")
    ema_decay: float = cli.option(0.999, help="EMA decay (ramped up over the first steps)")
    sigma_data: float = cli.option(0.5, help="EDM's sigma_data")
    seed: int = cli.option(0, help="seed of the weights and of the training randomness")
    ckpt_every: int = cli.option(500, help="steps between checkpoints")
    sample_every: int = cli.option(500, help="steps between sample grids (0: none)")
    sample_steps: int = cli.option(18, help="Heun steps for the sample grids")
    device: str = cli.option("cpu", help="torch device")

    def __post_init__(self) -> None:
        for name in ("image_size", "steps", "batch", "ckpt_every", "sample_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup", "sample_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"sigma_data must be a finite number > 0, got {self.sigma_data!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.data not in data.DATASETS:
            raise ValueError(f"data must be one of {data.DATASETS}, got {self.data!r}")


def build_denoiser(config: TeacherConfig, in_channels: int, num_classes: int | None) -> EDMDenoiser:
    backbone = build_backbone(config.preset, in_channels, num_classes if config.cond else None)
    return EDMDenoiser(backbone, sigma_data=config.sigma_data)


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True) -> tuple[EDMDenoiser, dict]:
    """A teacher checkpoint written by :func:`train` -> (denoiser in eval mode, its info dict).

    Loads with ``weights_only=True``; ``ema=True`` takes the EMA weights (what sampling uses).
    The info dict has ``config``, ``in_channels``, ``image_size``, ``num_classes``, ``step``.
    """
    state = common.load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("config", "model", "ema", "in_channels", "num_classes", "image_size") if k not in state]
    if missing:
        raise ValueError(f"{path}: not a teacher checkpoint (missing {missing})")
    config = common.config_from_dict(TeacherConfig, state["config"])
    denoiser = build_denoiser(config, state["in_channels"], state["num_classes"])
    denoiser.load_state_dict(state["ema" if ema else "model"])
    info = {k: state[k] for k in ("in_channels", "image_size", "num_classes", "step")}
    info["config"] = config
    return denoiser.to(device).eval(), info


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, config: TeacherConfig) -> float:
    return config.lr * min(1.0, (step + 1) / max(config.warmup, 1))


def _sample_grid(ema: EDMDenoiser, shape: tuple[int, ...], num_classes: int | None, steps: int,
                 device: torch.device, n: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)  # fixed noise: grids of different steps are comparable
    e = torch.randn((n, *shape), generator=g).to(device)  # (n, C, H, W)
    labels = (torch.arange(n) % num_classes).to(device) if num_classes else None
    sigmas = sampling.karras_sigmas(steps)
    return sampling.sample_heun(ema, e * sigmas[0], sigmas, labels=labels)


def train(config: TeacherConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a teacher into ``config.out``; returns {"losses": [...], "step": int}.

    The run folder holds ``config.json``, ``checkpoint.pt`` (model, EMA, optimizer, step, RNG
    state and the config; written atomically every ``ckpt_every`` steps and at the end) and
    ``samples/step_XXXXXXX.png``. If a checkpoint exists the run resumes from it and ends
    exactly where an uninterrupted run would (training randomness comes from one generator
    whose state is checkpointed). A non-finite loss raises :class:`TrainingDiverged` before
    anything is saved; another live process writing ``config.out`` raises ``common.FolderLocked``.
    """
    common.check_device(config.device)
    with common.folder_lock(config.out):
        return _train(config, progress)


# a resumed run may change these: where it is, how long it runs, how often it reports, the device
FREE_ON_RESUME = ("out", "steps", "ckpt_every", "sample_every", "device")


class TrainingDiverged(RuntimeError):
    """The teacher's loss became non-finite; nothing was saved past the last finite state."""


def _train(config: TeacherConfig, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out = Path(config.out)
    device = torch.device(config.device)
    dataset = data.get_dataset(config.data, config.data_root, "train", image_size=config.image_size,
                               channels=3 if config.data != "digits" else 1)
    images, labels = dataset.images, dataset.labels  # (N, C, H, W), (N,)
    num_classes = dataset.num_classes if config.cond else None
    in_channels, image_size = images.shape[1], images.shape[-1]
    torch.manual_seed(config.seed)  # the initial weights
    denoiser = build_denoiser(config, in_channels, num_classes).to(device)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        state = common.load_checkpoint(ckpt_path)
        saved = common.config_from_dict(TeacherConfig, state["config"])
        changed = [f.name for f in dataclasses.fields(TeacherConfig)
                   if f.name not in FREE_ON_RESUME and getattr(saved, f.name) != getattr(config, f.name)]
        if changed:
            raise ValueError(f"{ckpt_path} was made with a different config ({changed} differ); "
                             "use another --out or the same settings")
        denoiser.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"])
        step = int(state["step"])
    common.save_config(out / "config.json", config)

    def checkpoint() -> None:
        common.save_checkpoint(ckpt_path, {
            "config": common.config_to_dict(config), "model": denoiser.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "rng": generator.get_state(),
            "in_channels": in_channels, "image_size": image_size, "num_classes": num_classes,
        })

    losses: list[float] = []
    denoiser.train()
    bar = tqdm(total=config.steps, initial=step, desc="teacher", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < config.steps:
        index = torch.randint(len(images), (config.batch,), generator=generator)
        x = images[index].to(device)  # (B, C, H, W)
        y = labels[index].to(device) if num_classes else None
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = edm_loss(denoiser, x, y, generator=generator)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"step {step + 1}: the loss is {loss.item()}; stopped without saving "
                                   f"({ckpt_path} keeps the last finite state). Lower --lr (now {config.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, denoiser, min(config.ema_decay, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.ckpt_every == 0 or step == config.steps:
            checkpoint()
        if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
            grid = _sample_grid(ema, images.shape[1:], num_classes, config.sample_steps, device)
            common.save_image_grid(grid, out / "samples" / f"step_{step:07d}.png", nrow=10, scale=4)
    bar.close()
    if progress and losses:
        print(f"trained {len(losses)} steps in {time.perf_counter() - t0:.1f} s; final loss {losses[-1]:.4f}; "
              f"checkpoint {ckpt_path}", file=sys.stderr)
    return {"losses": losses, "step": step}


# ----------------------------------------------------------------------------- external teachers


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


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, TeacherConfig)
    parser.add_argument("--uncond", dest="cond", action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _run(config: TeacherConfig) -> int:
    common.seed_everything(config.seed)
    try:
        train(config)
    except TrainingDiverged as exc:
        print(f"error: teacher: {exc}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    return cli.run(TeacherConfig, args, _run)
