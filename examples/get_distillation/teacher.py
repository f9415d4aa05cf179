"""Train an EDM teacher (``python -m examples.get_distillation teacher``) and load its checkpoints.

- :class:`TeacherConfig`: the run's settings, one command-line option each.
- :func:`train`: a linear, resumable training loop; the run folder is locked while it runs,
  and a non-finite loss stops it before anything is saved.
- :func:`load_teacher`: a checkpoint -> the EMA denoiser (``weights_only=True``).

The network is in ``edm.py`` (UNet backbone, EDM preconditioning, loss); denoisers made
elsewhere (diffusers' epsilon models, EDM's pickles) are in ``adapters.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import cli, common, data, sampling
from .edm import PRESETS, EDMDenoiser, build_backbone, edm_loss

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
        common.update_ema(ema, denoiser, min(config.ema_decay, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.ckpt_every == 0 or step == config.steps:
            checkpoint()
        if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
            grid = _sample_grid(ema, images.shape[1:], num_classes, config.sample_steps, device)
            grid_labels = torch.arange(len(grid)) % num_classes if num_classes else None
            common.save_image_grid(grid, out / "samples" / f"step_{step:07d}.png", nrow=10, labels=grid_labels,
                                   title=f"teacher (EMA) at step {step}: EDM Heun, "
                                         f"{sampling.heun_nfe(config.sample_steps)} NFE, fixed noise")
    bar.close()
    if progress and losses:
        print(f"trained {len(losses)} steps in {time.perf_counter() - t0:.1f} s; final loss {losses[-1]:.4f}; "
              f"checkpoint {ckpt_path}", file=sys.stderr)
    return {"losses": losses, "step": step}


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
