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
the last checkpoint stays the last finite state, and ``log.jsonl`` stays valid JSON. The
loop itself (resume, EMA, checkpoints, the log) is ``loop.run``, which trains the teacher too.

Every checkpoint describes itself: the config, the image shape and classes, and the
provenance of its pairs (teacher identity, sampler, seed range, a hash of the data), so a
student loads without its pair folder and evaluation can check held-out pairs against it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import deqkit

from . import checkpoints, cli, locks, loop, models, runtime
from . import config as cfg
from .config import MAX_BATCH, MAX_SEED, MAX_STEPS, option
from .images import save_image_grid
from .loop import TrainingDiverged
from .pairs import PairDataset

__all__ = ["TrainConfig", "TrainingDiverged", "train", "load_student", "build_student", "lr_at"]

CHECKPOINT_FORMAT = "deqkit-get-student/2"
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


@cfg.settings
class TrainConfig:
    """Everything a training run depends on; saved as config.json and in every checkpoint.
    Each field is one command-line option (``cli.add_config_arguments``)."""

    pairs: str = option(help="pair folder (from the pairs subcommand)")
    out: str = option(help="run folder (rerun to resume)")
    num_pairs: Optional[int] = option(None, help="train on the first N pairs only, e.g. for a data-scaling study",
                                      default_text="all pairs", ge=1, le=MAX_STEPS)
    model: str = option("GET-T/2", help="student preset", choices=lambda: list(models.PRESETS))
    solver: str = option("fixed_point", help="fixed-point solver (deqkit registry name)",
                         choices=lambda: deqkit.solvers.available())
    solver_args: dict[str, Any] = option(help="solver hyperparameter, repeatable, e.g. --solver anderson "
                                         "--solver-arg m=5", flag="--solver-arg", default_factory=dict)
    backward: str = option("unrolled", help="how to differentiate through the solve", choices=lambda: list(BACKWARDS))
    phantom_steps: int = option(6, help="phantom gradient steps (--backward phantom)", ge=1, le=1000)
    phantom_tau: float = option(1.0, help="phantom gradient damping (--backward phantom)", gt=0, le=1)
    max_steps: int = option(6, help="calls of f per forward (GET: 6)", ge=1, le=1000)
    min_steps: Optional[int] = option(None, help="GET: draw each training step's number of fixed-point iterations "
                                      "uniformly from [MIN_STEPS, --max-steps] (seeded by the step)",
                                      default_text="always --max-steps", ge=1, le=1000)
    output_norm: bool = option(False, help="GET: end the equilibrium map with a LayerNorm, f(z) = LN(blocks(z)), "
                               "so that it has a fixed point (GET's map: no LayerNorm)")
    jac_reg: float = option(0.0, help="GET: weight of the Jacobian penalty ||J_f||_F^2/dim at the solve's value "
                            "(deqkit.jacobian_reg; 0: none)", ge=0, le=1e6)
    jac_reg_samples: int = option(1, help="GET: Hutchinson probes of the Jacobian penalty (--jac-reg)", ge=1, le=1000)
    z0: str = option("randn", help="start of the equilibrium solve (GET: a fresh Gaussian draw)",
                     choices=("randn", "zeros"))
    gamma: float = option(0.8, help="fixed-point correction weight (1: all iterates equal)", gt=0, le=1)
    loss: str = option("l1", help="regression loss on every decoded iterate", choices=LOSSES)
    lr: float = option(1e-4, help="peak learning rate", gt=0, le=10)
    lr_schedule: str = option("constant", help="after warm-up: constant (the paper) or cosine decay to --lr-min "
                              "at --steps", choices=LR_SCHEDULES)
    lr_min: float = option(0.0, help="final learning rate of the cosine schedule", ge=0, le=10)
    warmup: int = option(0, help="linear lr warm-up steps", ge=0, le=MAX_STEPS)
    weight_decay: float = option(0.0, help="AdamW's decoupled weight decay (paper: 0)", ge=0, le=10)
    grad_clip: Optional[float] = option(None, help="clip the global gradient norm (paper: none)",
                                        default_text="no clipping", gt=0, le=1e6)
    batch: int = option(128, help="global batch size (split across ranks)", ge=1, le=MAX_BATCH)
    steps: int = option(800_000, help="optimizer steps", ge=1, le=MAX_STEPS)
    ema_decay: float = option(0.9999, help="EMA decay of the weights that sample and evaluate", ge=0, lt=1)
    seed: int = option(0, help="seed of the initial weights, the data order and the random starts", ge=0, le=MAX_SEED)
    log_every: int = option(50, help="steps between log.jsonl records", ge=1, le=MAX_STEPS)
    sample_every: int = option(1000, help="steps between sample grids", ge=1, le=MAX_STEPS)
    ckpt_every: int = option(1000, help="steps between checkpoints", ge=1, le=MAX_STEPS)
    device: Optional[str] = option(None, help="torch device", default_text="cuda:LOCAL_RANK if available, else cpu")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The rules across fields (types and bounds are the config layer's), and the solver
        with its arguments and backward mode, built and tried once on a toy map."""
        if self.model not in models.PRESETS:
            raise ValueError(f"model must be one of {list(models.PRESETS)}, got {self.model!r}")
        if self.solver not in deqkit.solvers.available():
            raise ValueError(f"solver must be one of {deqkit.solvers.available()}, got {self.solver!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {list(BACKWARDS)}, got {self.backward!r}")
        if self.z0 not in ("randn", "zeros"):
            raise ValueError(f"z0 must be 'randn' or 'zeros', got {self.z0!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr={self.lr}], got {self.lr_min!r}")
        if self.lr_schedule == "cosine" and self.warmup >= self.steps - 1 and self.steps > 1:
            raise ValueError(f"warmup ({self.warmup}) must be below steps - 1 ({self.steps - 1}) for the cosine "
                             "schedule to decay")
        if self.min_steps is not None and self.min_steps > self.max_steps:
            raise ValueError(f"min_steps must be an integer in [1, max_steps={self.max_steps}] (or None), "
                             f"got {self.min_steps!r}")
        if models.PRESETS[self.model]["family"] != "GET":
            used = [name for name, off in (("min_steps", self.min_steps is None), ("output_norm", not self.output_norm),
                                           ("jac_reg", self.jac_reg == 0)) if not off]
            if used:
                raise ValueError(f"{', '.join(used)} apply to GET students only, not to {self.model}")
        else:
            check_solver(self.solver, self.solver_args, make_backward(self), "solver_args (--solver-arg)",
                         "--solver/--backward")


def check_solver(name: str, solver_args: dict[str, Any], backward: deqkit.AbstractBackward, args_option: str,
                 option: str) -> Any:
    """Build solver ``name`` with ``solver_args`` and try it with ``backward`` on a toy map:
    what a run would meet at its first step, as a ValueError naming ``args_option`` (the
    arguments) or ``option`` (the pairing). Returns the solver."""
    try:
        solver = deqkit.solvers.get(name, **solver_args)
    except (TypeError, ValueError) as exc:
        given = " ".join(f"{k}={v!r}" for k, v in solver_args.items())
        raise ValueError(f"{args_option}: solver {name} does not take {given}: {exc}") from None
    u = torch.ones(1, 2, requires_grad=True)
    try:
        with warnings.catch_warnings():  # a two-step toy solve need not converge
            warnings.simplefilter("ignore")
            sol = deqkit.fixed_point(lambda v, w: 0.5 * v + w, torch.zeros(1, 2), inputs=(u,), solver=solver,
                                     backward=backward, tol=None, max_steps=2, trajectory=2, divergence=None, throw=False)
            sol.value.sum().backward()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{option}: {exc}") from None
    return solver


# -- pieces -----------------------------------------------------------------------------------
def make_backward(config: "TrainConfig") -> deqkit.AbstractBackward:
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


# -- the run ----------------------------------------------------------------------------------
def train(config: TrainConfig, progress: bool = True, stop_after: Optional[int] = None,
          on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. ``stop_after`` ends early at that step
    (for tests that simulate a kill); ``on_step(step)`` is called after every optimisation step,
    in this thread (the demo uses it to widen a run's threads once the run beside it is done)."""
    config.validate()
    runtime.check_device(config.device)
    dist = runtime.init_distributed(config.device)
    try:
        return _train(config, dist, progress, stop_after, on_step)
    finally:
        runtime.cleanup_distributed(dist)


def _train(config: TrainConfig, dist: runtime.DistInfo, progress: bool, stop_after: Optional[int],
           on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    out = Path(config.out)
    if config.batch % dist.world_size:
        raise ValueError(f"batch {config.batch} must be divisible by the number of processes ({dist.world_size})")
    dataset = PairDataset(config.pairs)
    num_items = check_data(config, dataset)
    data = dataset.provenance(num_items)
    with locks.folder_lock(out, dist.rank, dist.world_size):
        recipe = _recipe(config, dist, dataset, num_items, data)
        result = loop.run(recipe, progress=progress, stop_after=stop_after, on_step=on_step)
    return {"step": result["step"], "loss": result["loss"], "out": str(out)}


def check_data(config: TrainConfig, dataset: PairDataset) -> int:
    """The number of pairs the run trains on; ValueError if ``num_pairs`` or ``batch`` do not fit."""
    num_items = len(dataset)
    if config.num_pairs is not None:
        if config.num_pairs > len(dataset):
            raise ValueError(f"num_pairs {config.num_pairs} exceeds the {len(dataset)} pairs in {config.pairs}")
        num_items = config.num_pairs
    if config.batch > num_items:
        raise ValueError(f"batch {config.batch} is larger than the {num_items} pairs available")
    return num_items


# settings a resumed run may change: where things are (the data is checked by its provenance),
# how often it reports, and the device
FREE_ON_RESUME = ("out", "pairs", "device", "log_every", "sample_every", "ckpt_every")


def check_resume(config: TrainConfig, state: dict, data: dict, ckpt_path: Path) -> None:
    """Raise ValueError unless the checkpoint belongs to this run on these pairs."""
    free = set(FREE_ON_RESUME)
    if config.lr_schedule == "constant":
        free.add("steps")  # more steps may be asked of a run whose schedule does not depend on them
    # (settings added since the checkpoint was written take their defaults)
    saved = cfg.to_dict(cfg.from_dict(TrainConfig, state["config"], f"{str(ckpt_path)!r}"))
    now = cfg.to_dict(config)
    diff = sorted(k for k in now if k not in free and saved.get(k) != now[k])
    if diff:
        raise ValueError(f"{ckpt_path} belongs to a run with other settings ({diff}); use another --out")
    before = checkpoints.data_record(state, ckpt_path)
    if before["image_shape"] != data["image_shape"] or before["num_classes"] != data["num_classes"]:
        raise ValueError(f"the pairs in {config.pairs!r} are images {tuple(data['image_shape'])} with "
                         f"{data['num_classes']} classes, but {ckpt_path} was trained on {tuple(before['image_shape'])} "
                         f"with {before['num_classes']} classes; use another --out")
    changed = sorted(k for k in before if before[k] != data.get(k))
    if changed:
        raise ValueError(f"the pairs in {config.pairs!r} are not those {ckpt_path} was trained on ({changed} differ: "
                         "regenerated, grown, or made by another teacher?); use another --out, or the original pairs")


def _recipe(config: TrainConfig, dist: runtime.DistInfo, dataset: PairDataset, num_items: int,
            data: dict) -> loop.Recipe:
    out = Path(config.out)
    device = dist.device
    num_classes = dataset.num_classes
    conditional = bool(num_classes)
    runtime.seed_everything(config.seed)
    model = build_student(config, dataset.image_shape, num_classes).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    net = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    token_shape = ((model.img_size // model.patch) ** 2, model.dim) if isinstance(model, models.GET) else None
    local = config.batch // dist.world_size
    sample_noise = torch.randn((64, *dataset.image_shape), generator=torch.Generator().manual_seed(config.seed + 7)).to(device)
    sample_labels = (torch.arange(64) % num_classes).to(device) if conditional else None

    def step_loss(step: int) -> loop.StepResult:
        idx = batch_indices(num_items, config.batch, step, config.seed, dist.rank, dist.world_size)
        noise, target, labels = load_batch(dataset, idx, device, conditional)
        kwargs: dict[str, Any] = {}
        if token_shape is not None:
            if config.z0 == "randn":
                kwargs["z0"] = start_points(token_shape, step, config.seed, dist.rank * local, local).to(device)
            else:
                kwargs["z0"] = torch.zeros((local, *token_shape), device=device)
            kwargs["max_steps"] = iterations_at(config, step)
        result = net(noise, labels, **kwargs)
        loss = distillation_loss(result, target, config.loss, config.gamma)
        record: dict[str, Optional[float]] = {}
        if config.jac_reg > 0:
            penalty = model.jacobian_penalty(result, config.jac_reg_samples)
            loss = loss + config.jac_reg * penalty
            record["jac_reg"] = float(penalty.detach())
        # the loss of the output image alone: the same quantity for a GET (whose objective sums
        # every iterate) and a ViT, which the report's loss plot compares
        losses = torch.stack([loss.detach(), output_loss(result.images.detach(), target, config.loss)])
        if dist.world_size > 1:
            torch.distributed.all_reduce(losses)
            losses /= dist.world_size
        record["output_loss"] = float(losses[1])
        if result.stats is not None:
            record["residual"] = float(result.stats.residual.mean())
        return loop.StepResult(loss, float(losses[0]), record)

    def sample(step: int) -> None:
        with torch.no_grad():
            grid = ema(sample_noise, sample_labels).images
        iterations = f", {config.max_steps} fixed-point iterations" if token_shape is not None else ""
        save_image_grid(grid, out / f"samples-{step:07d}.png", nrow=8, labels=sample_labels,
                        title=f"{config.model} (EMA) at step {step}: 1 NFE (one network call{iterations}), fixed noise")

    return loop.Recipe(
        name=f"train {config.model}", out=out, model=model, ema=ema, optimizer=optimizer, steps=config.steps,
        step_loss=step_loss, lr_at=lambda step: lr_at(config, step), ema_decay_at=lambda step: config.ema_decay,
        rng_state=_rng_state, set_rng_state=_set_rng_state,
        check_resume=lambda state, path: check_resume(config, state, data, path),
        checkpoint_extra={"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(config),
                          "student": {"model": config.model, "image_shape": list(dataset.image_shape),
                                      "num_classes": num_classes}, "data": data},
        log_every=config.log_every, ckpt_every=config.ckpt_every, sample_every=config.sample_every, sample=sample,
        grad_clip=config.grad_clip, dist=dist,
        lr_hint=f"Lower --lr (now {config.lr}), add warm-up or --grad-clip, and start again in a new --out or "
                "resume from there")


def load_student(path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
                 state: Optional[dict] = None) -> tuple[nn.Module, TrainConfig]:
    """The (EMA) student of a training checkpoint, in eval mode, and its config.

    The checkpoint says which images and classes the student is for (one written before
    checkpoints described themselves: its pair folder, ``checkpoints.student_record``).
    ``state``: the checkpoint already loaded (verified) from ``path``.
    """
    if state is None:
        state = checkpoints.load_checkpoint(path, map_location=device)
    if "config" not in state or "ema" not in state:
        raise ValueError(f"{str(path)!r} is not a student checkpoint of the train command")
    config = cfg.from_dict(TrainConfig, state["config"], f"{str(path)!r}")
    record = checkpoints.student_record(state, path)
    model = build_student(config, tuple(record["image_shape"]), record["num_classes"]).to(device)
    model.load_state_dict(state["ema" if ema else "model"])
    return model.eval(), config


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, TrainConfig)


def preflight(config: TrainConfig) -> None:
    """What a run checks before its work: the device, the pairs (manifest, counts), and a
    checkpoint in ``out`` belonging to this run."""
    runtime.check_device(config.device)
    dataset = PairDataset(config.pairs, verify="none")
    num_items = check_data(config, dataset)
    ckpt = Path(config.out) / "checkpoint.pt"
    if ckpt.exists():
        check_resume(config, checkpoints.load_checkpoint(ckpt), dataset.provenance(num_items), ckpt)


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
    return cli.run(TrainConfig, args, _run, check=preflight)
