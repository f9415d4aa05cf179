"""Train an EDM teacher (``python -m examples.get_distillation teacher``) and load its checkpoints.

- :class:`TeacherConfig`: the run's settings, one command-line option each.
- :func:`train`: a resumable run of the example's one training loop (``loop.py``); the run
  folder is locked while it runs, and a non-finite loss stops it before anything is saved.
- :func:`load_teacher`: a checkpoint -> the EMA denoiser (``weights_only=True``).

The network is in ``edm.py`` (UNet backbone, EDM preconditioning, loss); denoisers made
elsewhere (diffusers' epsilon models, EDM's pickles) are in ``adapters.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from . import checkpoints, cli, data, locks, loop, runtime, sampling
from . import config as cfg
from .config import MAX_BATCH, MAX_SEED, MAX_STEPS, option
from .edm import PRESETS, EDMDenoiser, build_backbone, edm_loss
from .images import save_image_grid
from .loop import TrainingDiverged

__all__ = ["TeacherConfig", "TrainingDiverged", "build_denoiser", "load_teacher", "train"]

# ----------------------------------------------------------------------------- config & checkpoints


@cfg.settings
class TeacherConfig:
    """A teacher training run; each field is one command-line option (``cli.add_config_arguments``)."""

    out: str = option("runs/teacher", help="run folder (resumes from its checkpoint.pt if present)")
    data: str = option("digits", help="training images", choices=data.DATASETS)
    data_root: Optional[str] = option(None, help="folder for cifar10 / folder data")
    image_size: int = option(32, help="resize for --data folder", ge=1, le=4096)
    preset: str = option("digits", help="backbone size", choices=lambda: sorted(PRESETS))
    cond: bool = option(True, help="class-conditional (--no-cond or --uncond: unconditional)")
    steps: int = option(2000, help="optimizer steps", ge=1, le=MAX_STEPS)
    batch: int = option(128, help="batch size", ge=1, le=MAX_BATCH)
    lr: float = option(2e-3, help="Adam learning rate after warm-up", gt=0, le=10)
    warmup: int = option(100, help="linear lr warm-up steps", ge=0, le=MAX_STEPS)
    ema_decay: float = option(0.999, help="EMA decay (ramped up over the first steps)", ge=0, lt=1)
    sigma_data: float = option(0.5, help="EDM's sigma_data", gt=0, le=1e3)
    seed: int = option(0, help="seed of the weights and of the training randomness", ge=0, le=MAX_SEED)
    ckpt_every: int = option(500, help="steps between checkpoints", ge=1, le=MAX_STEPS)
    sample_every: int = option(500, help="steps between sample grids (0: none)", ge=0, le=MAX_STEPS)
    sample_steps: int = option(18, help="Heun steps for the sample grids", ge=1, le=1000)
    log_every: int = option(10, help="steps between log.jsonl records", ge=1, le=MAX_STEPS)
    device: str = option("cpu", help="torch device")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.data not in data.DATASETS:
            raise ValueError(f"data must be one of {data.DATASETS}, got {self.data!r}")


def build_denoiser(config: TeacherConfig, in_channels: int, num_classes: int | None) -> EDMDenoiser:
    backbone = build_backbone(config.preset, in_channels, num_classes if config.cond else None)
    return EDMDenoiser(backbone, sigma_data=config.sigma_data)


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True) -> tuple[EDMDenoiser, dict]:
    """A teacher checkpoint written by :func:`train` -> (denoiser in eval mode, its info dict).

    Verifies the file against its sha256 record and loads with ``weights_only=True``;
    ``ema=True`` takes the EMA weights (what sampling uses). The info dict has ``config``,
    ``in_channels``, ``image_size``, ``num_classes``, ``step`` and ``sha256`` (of the file).
    """
    state = checkpoints.load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("config", "model", "ema", "in_channels", "num_classes", "image_size") if k not in state]
    if missing:
        raise ValueError(f"{path}: not a teacher checkpoint (missing {missing})")
    config = cfg.from_dict(TeacherConfig, state["config"], f"{str(path)!r}")
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
    state and the config; written atomically with its sha256 record every ``ckpt_every``
    steps and at the end), ``log.jsonl`` and ``samples/step_XXXXXXX.png``. If a checkpoint
    exists the run resumes from it and ends exactly where an uninterrupted run would
    (training randomness comes from one generator whose state is checkpointed). A non-finite
    loss raises :class:`TrainingDiverged` before anything is saved; another live process
    writing ``config.out`` raises ``locks.FolderLocked``. The loop is ``loop.run``, the
    students' too.
    """
    runtime.check_device(config.device)
    with locks.folder_lock(config.out):
        return _train(config, progress)


# a resumed run may change these: where it is, how long it runs, how often it reports, the device
FREE_ON_RESUME = ("out", "steps", "ckpt_every", "sample_every", "log_every", "device")


def _check_resume(config: TeacherConfig, state: dict, path: Path) -> None:
    saved = cfg.from_dict(TeacherConfig, state["config"], f"{str(path)!r}")
    changed = [f.name for f in dataclasses.fields(TeacherConfig)
               if f.name not in FREE_ON_RESUME and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        raise ValueError(f"{path} was made with a different config ({changed} differ); "
                         "use another --out or the same settings")


def _train(config: TeacherConfig, progress: bool) -> dict[str, Any]:
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
    generator = torch.Generator().manual_seed(config.seed)  # the data order and EDM's noise

    def step_loss(step: int) -> loop.StepResult:
        index = torch.randint(len(images), (config.batch,), generator=generator)
        x = images[index].to(device)  # (B, C, H, W)
        y = labels[index].to(device) if num_classes else None
        loss = edm_loss(denoiser, x, y, generator=generator)
        return loop.StepResult(loss, loss.item())

    def sample(step: int) -> None:
        grid = _sample_grid(ema, images.shape[1:], num_classes, config.sample_steps, device)
        grid_labels = torch.arange(len(grid)) % num_classes if num_classes else None
        save_image_grid(grid, out / "samples" / f"step_{step:07d}.png", nrow=10, labels=grid_labels,
                        title=f"teacher (EMA) at step {step}: EDM Heun, "
                              f"{sampling.heun_nfe(config.sample_steps)} NFE, fixed noise")

    recipe = loop.Recipe(
        name="teacher", out=out, model=denoiser, ema=ema, optimizer=optimizer, steps=config.steps,
        step_loss=step_loss, lr_at=lambda step: _lr_at(step, config),
        ema_decay_at=lambda step: min(config.ema_decay, (1 + step) / (10 + step)),
        rng_state=generator.get_state, set_rng_state=generator.set_state,
        check_resume=lambda state, path: _check_resume(config, state, path),
        checkpoint_extra={"format": "deqkit-get-teacher/1", "config": cfg.to_dict(config), "in_channels": in_channels,
                          "image_size": image_size, "num_classes": num_classes},
        log_every=config.log_every, ckpt_every=config.ckpt_every, sample_every=config.sample_every, sample=sample,
        lr_hint=f"Lower --lr (now {config.lr})")
    result = loop.run(recipe, progress=progress)
    if progress and result["losses"]:
        print(f"trained {len(result['losses'])} steps in {result['seconds']:.1f} s; final loss {result['loss']:.4f}; "
              f"checkpoint {recipe.ckpt_path}", file=sys.stderr)
    return {"losses": result["losses"], "step": result["step"]}


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, TeacherConfig)
    parser.add_argument("--uncond", dest="cond", action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _run(config: TeacherConfig) -> int:
    runtime.seed_everything(config.seed)
    try:
        train(config)
    except TrainingDiverged as exc:
        print(f"error: teacher: {exc}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    return cli.run(TeacherConfig, args, _run)
