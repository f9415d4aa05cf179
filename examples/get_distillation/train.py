"""Train a one-step student (GET or ViT) on offline noise/image pairs.

The paper's recipe by default: L1 loss on every decoded iterate of 6 unrolled fixed-point
steps from a random start, weighted by fixed-point correction (gamma = 0.8); Adam with a
constant learning rate; an EMA of the weights, which is what samples and evaluation use.
Every deqkit solver and backward mode is selectable from the command line.

One process, or several under torchrun (DDP; gloo on CPU, nccl on GPU):

    python -m examples.get_distillation train --pairs runs/pairs --out runs/get
    torchrun --nproc_per_node 8 -m examples.get_distillation train --pairs ... --batch 256

``Implicit`` and ``OneStep`` differentiate at a fixed point: they suit a student whose
equilibrium solve converges. An untrained GET does not (its residual grows over the six
iterations, and the output still carries the random start), so train it as the paper does,
with ``Unrolled`` (or ``Phantom``); ``--z0 zeros`` makes the start deterministic.

GET's map is ``f(z) = z + r(z)`` with ``r`` blind to the scale of ``z`` (pre-LN blocks), so
it has no fixed point unless ``r(z*) = 0``: its iterates drift and the solve never converges
(the relative residual falls as 1/k). The equilibrium recipe's options: ``--output-norm``
(``f(z) = LN(blocks(z))``, a map with a fixed point), ``--jac-reg W`` (a Jacobian penalty at
the solve's value) and ``--min-steps K`` (each step draws its number of iterations from
[K, --max-steps]); the tutorial measures them.

Rerunning with the same ``--out`` resumes from the last checkpoint and continues the same
run: the data order, the random starts z0 and therefore the loss curve are those of an
uninterrupted run (batch b of step s is a function of the seed and s only). A run folder may
be moved or copied and resumed from there, and a constant-lr run extended with a larger
``--steps``; a resume refuses other pairs than it was trained on (another teacher, other
seeds, other images), whatever path they sit at. Rerunning a finished run does nothing.

A non-finite loss stops the run with an error (exit status 1) before anything is saved:
the last checkpoint stays the last finite state, and ``log.jsonl`` stays valid JSON.

Every checkpoint describes itself: the config, the image shape and classes, and the
provenance of its pairs (teacher identity, sampler, seed range, a hash of the data), so a
student loads without its pair folder and evaluation can check held-out pairs against it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import deqkit

from . import cli, common, models
from .pairs import PairDataset

CHECKPOINT_FORMAT = "deqkit-get-student/2"
BACKWARDS = ("unrolled", "unrolled-checkpoint", "phantom", "implicit", "onestep")
LOSSES = ("l1", "l2")
LR_SCHEDULES = ("constant", "cosine")


# name -> constructor of the backward mode (the command line's choices; solvers come from
# deqkit's registry, deqkit.solvers.get(name, **solver_args))
BACKWARDS: dict[str, Callable[["TrainConfig"], deqkit.AbstractBackward]] = {
    "unrolled": lambda c: deqkit.Unrolled(),
    "unrolled-checkpoint": lambda c: deqkit.Unrolled(checkpoint=True),
    "phantom": lambda c: deqkit.Phantom(steps=c.phantom_steps, tau=c.phantom_tau),
    "implicit": lambda c: deqkit.Implicit(),
    "onestep": lambda c: deqkit.OneStep(),
}
LOSSES = ("l1", "l2")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; saved as config.json and in every checkpoint.
    Each field is one command-line option (``cli.add_config_arguments``)."""

    pairs: str = cli.option(help="pair folder (from the pairs subcommand)")
    out: str = cli.option(help="run folder (rerun to resume)")
    num_pairs: Optional[int] = cli.option(None, help="train on the first N pairs only, e.g. for a data-scaling study",
                                          default_text="all pairs")
    model: str = cli.option("GET-T/2", help="student preset", choices=lambda: list(models.PRESETS))
    solver: str = cli.option("fixed_point", help="fixed-point solver (deqkit registry name)",
                             choices=lambda: deqkit.solvers.available())
    solver_args: dict = cli.option(help="solver hyperparameter, repeatable, e.g. --solver anderson --solver-arg m=5",
                                   flag="--solver-arg", default_factory=dict)
    backward: str = cli.option("unrolled", help="how to differentiate through the solve", choices=lambda: list(BACKWARDS))
    phantom_steps: int = cli.option(6, help="phantom gradient steps (--backward phantom)")
    phantom_tau: float = cli.option(1.0, help="phantom gradient damping (--backward phantom)")
    max_steps: int = cli.option(6, help="calls of f per forward (GET: 6)")
    min_steps: Optional[int] = cli.option(None, help="GET: draw each training step's number of fixed-point iterations "
                                          "uniformly from [MIN_STEPS, --max-steps] (seeded by the step)",
                                          default_text="always --max-steps")
    output_norm: bool = cli.option(False, help="GET: end the equilibrium map with a LayerNorm, f(z) = LN(blocks(z)), "
                                   "so that it has a fixed point (GET's map: no LayerNorm)")
    jac_reg: float = cli.option(0.0, help="GET: weight of the Jacobian penalty ||J_f||_F^2/dim at the solve's value "
                                "(deqkit.jacobian_reg; 0: none)")
    jac_reg_samples: int = cli.option(1, help="GET: Hutchinson probes of the Jacobian penalty (--jac-reg)")
    z0: str = cli.option("randn", help="start of the equilibrium solve (GET: a fresh Gaussian draw)",
                         choices=("randn", "zeros"))
    gamma: float = cli.option(0.8, help="fixed-point correction weight (1: all iterates equal)")
    loss: str = cli.option("l1", help="regression loss on every decoded iterate", choices=LOSSES)
    lr: float = cli.option(1e-4, help="peak learning rate")
    lr_schedule: str = cli.option("constant", help="after warm-up: constant (the paper) or cosine decay to --lr-min "
                                  "at --steps", choices=LR_SCHEDULES)
    lr_min: float = cli.option(0.0, help="final learning rate of the cosine schedule")
    warmup: int = cli.option(0, help="linear lr warm-up steps")
    weight_decay: float = cli.option(0.0, help="AdamW's decoupled weight decay (paper: 0)")
    grad_clip: Optional[float] = cli.option(None, help="clip the global gradient norm (paper: none)",
                                            default_text="no clipping")
    batch: int = cli.option(128, help="global batch size (split across ranks)")
    steps: int = cli.option(800_000, help="optimizer steps")
    ema_decay: float = cli.option(0.9999, help="EMA decay of the weights that sample and evaluate")
    seed: int = cli.option(0, help="seed of the initial weights, the data order and the random starts")
    log_every: int = cli.option(50, help="steps between log.jsonl records")
    sample_every: int = cli.option(1000, help="steps between sample grids")
    ckpt_every: int = cli.option(1000, help="steps between checkpoints")
    device: Optional[str] = cli.option(None, help="torch device", default_text="cuda:LOCAL_RANK if available, else cpu")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("phantom_tau", "gamma", "lr", "lr_min", "weight_decay", "ema_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.model not in models.PRESETS:
            raise ValueError(f"model must be one of {list(models.PRESETS)}, got {self.model!r}")
        if self.solver not in deqkit.solvers.available():
            raise ValueError(f"solver must be one of {deqkit.solvers.available()}, got {self.solver!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")
        if self.z0 not in ("randn", "zeros"):
            raise ValueError(f"z0 must be 'randn' or 'zeros', got {self.z0!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("max_steps", "batch", "steps", "log_every", "sample_every", "ckpt_every", "phantom_steps",
                     "jac_reg_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_pairs is not None and (not isinstance(self.num_pairs, int) or self.num_pairs < 1):
            raise ValueError(f"num_pairs must be an integer >= 1 (or None for all), got {self.num_pairs!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr={self.lr}], got {self.lr_min!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if self.lr_schedule == "cosine" and self.warmup >= self.steps - 1 and self.steps > 1:
            raise ValueError(f"warmup ({self.warmup}) must be below steps - 1 ({self.steps - 1}) for the cosine "
                             "schedule to decay")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip!r}")
        if self.min_steps is not None and (isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int)
                                           or not 1 <= self.min_steps <= self.max_steps):
            raise ValueError(f"min_steps must be an integer in [1, max_steps={self.max_steps}] (or None), "
                             f"got {self.min_steps!r}")
        if not isinstance(self.output_norm, bool):
            raise ValueError(f"output_norm must be true or false, got {self.output_norm!r}")
        if not (isinstance(self.jac_reg, (int, float)) and math.isfinite(self.jac_reg) and self.jac_reg >= 0):
            raise ValueError(f"jac_reg must be a finite number >= 0, got {self.jac_reg!r}")
        if models.PRESETS[self.model]["family"] != "GET":
            used = [name for name, off in (("min_steps", self.min_steps is None), ("output_norm", not self.output_norm),
                                           ("jac_reg", self.jac_reg == 0)) if not off]
            if used:
                raise ValueError(f"{', '.join(used)} apply to GET students only, not to {self.model}")


# -- pieces -----------------------------------------------------------------------------------
def make_backward(config: TrainConfig) -> deqkit.AbstractBackward:
    return BACKWARDS[config.backward](config)


def lr_at(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then constant or a cosine decay from ``lr`` to ``lr_min`` at ``steps``.
    A function of the step only, so a resumed run follows the same schedule."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant":
        return config.lr
    span = max(config.steps - 1 - config.warmup, 1)  # the last step runs at lr_min
    progress = min((step - config.warmup) / span, 1.0)
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * progress))


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became non-finite; nothing was saved past the last finite state."""


def build_student(config: TrainConfig, image_shape: tuple[int, ...], num_classes: Optional[int]) -> nn.Module:
    channels, size, _ = image_shape
    overrides: dict[str, Any] = {}
    if models.PRESETS[config.model]["family"] == "GET":
        overrides = dict(solver=deqkit.solvers.get(config.solver, **config.solver_args),
                         backward=make_backward(config), max_steps=config.max_steps,
                         output_norm=config.output_norm)
    return models.build(config.model, img_size=size, channels=channels, num_classes=num_classes or 0, **overrides)


def batch_indices(num_items: int, global_batch: int, step: int, seed: int, rank: int, world: int) -> list[int]:
    """This rank's item indices for ``step``: epochs are seeded permutations, walked in order.

    A function of (seed, step) only, so a resumed run sees exactly the batches of an
    uninterrupted one, and each rank takes a disjoint slice of the same global batch (no
    sampling with replacement).
    """
    per_epoch = num_items // global_batch
    if per_epoch < 1:
        raise ValueError(f"batch {global_batch} is larger than the {num_items} pairs available")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    chunk = perm[i * global_batch:(i + 1) * global_batch]
    local = global_batch // world
    return chunk[rank * local:(rank + 1) * local].tolist()


def start_points(shape: tuple[int, ...], step: int, seed: int, first: int, count: int) -> Tensor:
    """z0 for global batch positions first .. first+count-1 at ``step``: one seeded draw each,
    so the random starts do not depend on how the batch is split across ranks."""
    out = torch.empty((count, *shape))
    for j in range(count):
        key = hashlib.sha256(f"{seed}:{step}:{first + j}".encode()).digest()
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(key[:8], "little")))
    return out


def iterations_at(config: TrainConfig, step: int) -> int:
    """The number of fixed-point iterations of training step ``step``: ``max_steps``, or with
    ``min_steps`` a uniform draw from [min_steps, max_steps] seeded by (seed, step) only, so a
    resumed run and every rank draw the same."""
    if config.min_steps is None or config.min_steps == config.max_steps:
        return config.max_steps
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 17)
    return int(torch.randint(config.min_steps, config.max_steps + 1, (1,), generator=gen))


def load_batch(dataset: PairDataset, indices: list[int], device: torch.device, conditional: bool):
    items = [dataset[i] for i in indices]
    noise = torch.stack([it[0] for it in items]).to(device)   # (B, C, H, W)
    target = torch.stack([it[1] for it in items]).to(device)  # (B, C, H, W)
    labels = torch.stack([it[2] for it in items]).to(device) if conditional else None
    return noise, target, labels


def output_loss(images: Tensor, target: Tensor, kind: str) -> Tensor:
    """The regression loss ("l1": mean absolute, "l2": mean squared error) of one batch of images."""
    diff = images - target
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def distillation_loss(out: models.ModelOutput, target: Tensor, kind: str, gamma: float) -> Tensor:
    """Regression loss on every decoded iterate, weighted gamma^(n-1-i) (fixed-point correction)."""
    return deqkit.fp_correction(lambda images: output_loss(images, target, kind), out.iterates, gamma=gamma)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the loop ---------------------------------------------------------------------------------
def train(config: TrainConfig, progress: bool = True, stop_after: Optional[int] = None,
          on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. ``stop_after`` ends early at that step
    (for tests that simulate a kill); ``on_step(step)`` is called after every optimisation step,
    in this thread (the demo uses it to widen a run's threads once the run beside it is done)."""
    config.validate()
    common.check_device(config.device)
    dist = common.init_distributed(config.device)
    try:
        return _train(config, dist, progress, stop_after, on_step)
    finally:
        common.cleanup_distributed(dist)


def _train(config: TrainConfig, dist: common.DistInfo, progress: bool, stop_after: Optional[int],
           on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    out = Path(config.out)
    if config.batch % dist.world_size:
        raise ValueError(f"batch {config.batch} must be divisible by the number of processes ({dist.world_size})")
    dataset = PairDataset(config.pairs)
    num_items = len(dataset)
    if config.num_pairs is not None:
        if config.num_pairs > len(dataset):
            raise ValueError(f"num_pairs {config.num_pairs} exceeds the {len(dataset)} pairs in {config.pairs}")
        num_items = config.num_pairs
    data = dataset.provenance(num_items)
    with common.folder_lock(out, dist.rank, dist.world_size):
        return _train_locked(config, dist, progress, stop_after, dataset, num_items, data, on_step)


# settings a resumed run may change: where things are (the data is checked by its provenance),
# how often it reports, and the device
FREE_ON_RESUME = ("out", "pairs", "device", "log_every", "sample_every", "ckpt_every")


def _check_resume(config: TrainConfig, state: dict, data: dict, ckpt_path: Path) -> None:
    """Raise ValueError unless the checkpoint belongs to this run on these pairs."""
    free = set(FREE_ON_RESUME) if "data" in state else set(FREE_ON_RESUME) - {"pairs"}
    if config.lr_schedule == "constant":
        free.add("steps")  # more steps may be asked of a run whose schedule does not depend on them
    # (settings added since the checkpoint was written take their defaults)
    saved = common.config_to_dict(common.config_from_dict(TrainConfig, state["config"]))
    now = common.config_to_dict(config)
    diff = sorted(k for k in now if k not in free and saved.get(k) != now[k])
    if diff:
        raise ValueError(f"{ckpt_path} belongs to a run with other settings ({diff}); use another --out")
    if "data" not in state:
        return  # written before checkpoints recorded their data: the pairs path matched above
    before = state["data"]
    if before["image_shape"] != data["image_shape"] or before["num_classes"] != data["num_classes"]:
        raise ValueError(f"the pairs in {config.pairs!r} are images {tuple(data['image_shape'])} with "
                         f"{data['num_classes']} classes, but {ckpt_path} was trained on {tuple(before['image_shape'])} "
                         f"with {before['num_classes']} classes; use another --out")
    changed = sorted(k for k in before if before[k] != data.get(k))
    if changed:
        raise ValueError(f"the pairs in {config.pairs!r} are not those {ckpt_path} was trained on ({changed} differ: "
                         "regenerated, grown, or made by another teacher?); use another --out, or the original pairs")


def _all_finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.state_dict().values() if p.is_floating_point())


def _train_locked(config: TrainConfig, dist: common.DistInfo, progress: bool, stop_after: Optional[int],
                  dataset: PairDataset, num_items: int, data: dict,
                  on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    out = Path(config.out)
    device = dist.device
    num_classes = dataset.num_classes
    conditional = bool(num_classes)
    common.seed_everything(config.seed)
    model = build_student(config, dataset.image_shape, num_classes).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    step = 0
    ckpt_path = out / "checkpoint.pt"
    cfg = common.config_to_dict(config)
    if ckpt_path.exists():
        state = common.load_checkpoint(ckpt_path, map_location=device)
        _check_resume(config, state, data, ckpt_path)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # an older checkpoint without its data's record
            raise ValueError(f"{ckpt_path} does not fit a student for the pairs in {config.pairs!r} (images "
                             f"{dataset.image_shape}, {num_classes} classes): were they regenerated for other "
                             "images? use another --out") from exc
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        _set_rng_state(state["rng"])
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        common.save_config(out / "config.json", config)
    net = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    token_shape = None
    if isinstance(model, models.GET):
        token_shape = ((model.img_size // model.patch) ** 2, model.dim)
    local = config.batch // dist.world_size
    sample_noise = torch.randn((64, *dataset.image_shape), generator=torch.Generator().manual_seed(config.seed + 7)).to(device)
    sample_labels = (torch.arange(64) % num_classes).to(device) if conditional else None

    log_path = out / "log.jsonl"
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.model}", unit="step")
    t0, last = time.perf_counter(), None
    if step >= config.steps:
        print(f"{out} is already trained to step {step} of {config.steps}; nothing to do", file=sys.stderr)
    last_saved = step
    model.train()
    while step < end:
        idx = batch_indices(num_items, config.batch, step, config.seed, dist.rank, dist.world_size)
        noise, target, labels = load_batch(dataset, idx, device, conditional)
        kwargs = {}
        if token_shape is not None:
            if config.z0 == "randn":
                kwargs["z0"] = start_points(token_shape, step, config.seed, dist.rank * local, local).to(device)
            else:
                kwargs["z0"] = torch.zeros((local, *token_shape), device=device)
        if token_shape is not None:
            kwargs["max_steps"] = iterations_at(config, step)
        result = net(noise, labels, **kwargs)
        loss = distillation_loss(result, target, config.loss, config.gamma)
        penalty = None
        if config.jac_reg > 0:
            penalty = model.jacobian_penalty(result, config.jac_reg_samples)
            loss = loss + config.jac_reg * penalty
        # the loss of the output image alone: the same quantity for a GET (whose objective sums
        # every iterate) and a ViT, which the report's loss plot compares
        losses = torch.stack([loss.detach(), output_loss(result.images.detach(), target, config.loss)])
        if dist.world_size > 1:
            torch.distributed.all_reduce(losses)
            losses /= dist.world_size
        loss_value = losses[0]
        if not torch.isfinite(loss_value):  # every rank sees the same mean and stops together
            _diverged(f"step {step + 1}: the loss is {float(loss_value)}", config, ckpt_path, last_saved)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        optimizer.step()
        common.update_ema(ema, model, config.ema_decay)
        step += 1
        last = float(loss_value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last:.4f}")
        if dist.is_main and (step % config.log_every == 0 or step == end):
            record = {"step": step, "loss": last, "output_loss": float(losses[1]), "lr": lr_at(config, step - 1),
                      "seconds": round(time.perf_counter() - t0, 3), "threads": torch.get_num_threads()}
            if result.stats is not None:
                residual = float(result.stats.residual.mean())
                record["residual"] = residual if math.isfinite(residual) else None  # JSON has no NaN
            if penalty is not None:
                record["jac_reg"] = float(penalty.detach())
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record, allow_nan=False) + "\n")
        if dist.is_main and (step % config.sample_every == 0 or step == end):
            with torch.no_grad():
                grid = ema(sample_noise, sample_labels).images
            iterations = f", {config.max_steps} fixed-point iterations" if token_shape is not None else ""
            common.save_image_grid(grid, out / f"samples-{step:07d}.png", nrow=8, labels=sample_labels,
                                   title=f"{config.model} (EMA) at step {step}: 1 NFE (one network call"
                                         f"{iterations}), fixed noise")
        if step % config.ckpt_every == 0 or step == end:
            if not _all_finite(model, ema):  # a finite loss with a non-finite update
                _diverged(f"step {step}: the weights are no longer finite", config, ckpt_path, last_saved)
            if dist.is_main:
                common.save_checkpoint(ckpt_path, {
                    "format": CHECKPOINT_FORMAT, "config": cfg, "step": step, "model": model.state_dict(),
                    "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                    "student": {"model": config.model, "image_shape": list(dataset.image_shape),
                                "num_classes": num_classes}, "data": data,
                })
            last_saved = step
            common.barrier(dist.world_size)
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    if dist.is_main:
        # the log is appended as training goes; a resumed run may repeat the lines of the
        # steps after its last checkpoint: keep the last record of each step
        _dedupe_log(log_path)
    return {"step": step, "loss": last, "out": str(out)}


def _diverged(what: str, config: TrainConfig, ckpt_path: Path, last_saved: int) -> None:
    kept = (f"{ckpt_path} still holds the finite state of step {last_saved}" if ckpt_path.exists()
            else "no checkpoint was written")
    raise TrainingDiverged(f"{what}: training stopped without saving ({kept}). Lower --lr (now {config.lr}), "
                           "add warm-up or --grad-clip, and start again in a new --out or resume from there")


def _dedupe_log(path: Path) -> None:
    if not path.exists():
        return
    records: dict[int, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            records[json.loads(line)["step"]] = line
    common.atomic_write_bytes(path, ("\n".join(records[k] for k in sorted(records)) + "\n").encode())


def load_student(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> tuple[nn.Module, TrainConfig]:
    """The (EMA) student of a training checkpoint, in eval mode, and its config.

    The checkpoint says which images and classes the student is for; one written before
    checkpoints described themselves needs its pair folder (``config.pairs``) to say it.
    """
    state = common.load_checkpoint(path, map_location=device)
    if "config" not in state or "ema" not in state:
        raise ValueError(f"{str(path)!r} is not a student checkpoint of the train command")
    config = common.config_from_dict(TrainConfig, state["config"])
    shape, num_classes = student_shape(state, path)
    model = build_student(config, shape, num_classes).to(device)
    model.load_state_dict(state["ema" if ema else "model"])
    return model.eval(), config


def student_shape(state: dict, path: str | Path) -> tuple[tuple[int, ...], Optional[int]]:
    """(image shape, classes) of a student checkpoint (from its pair folder for an old one)."""
    if "student" in state:
        return tuple(state["student"]["image_shape"]), state["student"]["num_classes"]
    pairs = state["config"]["pairs"]
    try:
        dataset = PairDataset(pairs, verify="none")
    except FileNotFoundError as exc:
        raise ValueError(f"{path} predates self-describing checkpoints and its pair folder {pairs!r} is gone; "
                         "resume it once with the pairs present (or retrain) to record its image shape") from exc
    return dataset.image_shape, dataset.num_classes


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, TrainConfig)


def _run(config: TrainConfig) -> int:
    try:
        summary = train(config)
    except TrainingDiverged as exc:
        print(f"error: train: {exc}", file=sys.stderr)
        return 1
    if summary["loss"] is None:
        print(f"nothing to do: {summary['out']} is at step {summary['step']}")
    else:
        print(f"trained to step {summary['step']} (loss {summary['loss']:.4f}); checkpoint in {summary['out']}")
    return 0


def main(args: argparse.Namespace) -> int:
    return cli.run(TrainConfig, args, _run)
