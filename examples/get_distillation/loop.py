"""The one training loop of the example: the teacher and the students both run :func:`run`.

What a run is made of is a :class:`Recipe`: its model, EMA copy and optimizer, how to compute
the loss of step ``s``, the learning rate and EMA decay of step ``s``, its random state, what
to check before resuming and what else its checkpoint holds. The loop owns the rest, once:

- resume: load ``checkpoint.pt`` (verified), check it belongs to this run, restore the
  weights, EMA, optimizer, step and random state, and cut ``log.jsonl`` back to that step, so
  a resumed run continues the same run and its log is that of an uninterrupted one; then
  write ``config.json`` (the checkpoint's ``config``);
- each step: loss, a non-finite loss stops the run before anything is saved, backward,
  optional gradient clipping, the learning rate, the optimizer step, the EMA update;
- every ``log_every`` steps a whole-line, fsynced record in ``log.jsonl``; sample grids;
  every ``ckpt_every`` steps (and at the end) a checkpoint with its sha256 record, after
  checking the weights are finite;
- ``stop_after`` (tests simulate a kill) and ``on_step(step)``, called after every step in
  the training thread (the demo widens a run's threads there).

Under torchrun the recipe's loss reduces across ranks; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import checkpoints, fileio, runtime


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became non-finite; nothing was saved past the last finite state."""


@dataclasses.dataclass
class StepResult:
    """What the recipe's loss of one step gives the loop: the loss to differentiate, its value
    (reduced across ranks: every rank sees the same and stops together), and more figures
    for the log (floats, or None)."""

    loss: Tensor
    value: float
    record: dict[str, Optional[float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Recipe:
    """One training run, as the loop needs it (see the module docstring)."""

    name: str                                     # for the progress bar and messages
    out: Path
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    steps: int
    step_loss: Callable[[int], StepResult]        # the loss of optimizer step s (0-based)
    lr_at: Callable[[int], float]
    ema_decay_at: Callable[[int], float]
    rng_state: Callable[[], Any]                  # the random state to checkpoint ...
    set_rng_state: Callable[[Any], None]          # ... and to restore on resume
    check_resume: Callable[[dict, Path], None]    # raise unless a checkpoint belongs to this run
    checkpoint_extra: dict[str, Any]              # what else every checkpoint holds (config, ...)
    log_every: int
    ckpt_every: int
    sample_every: int = 0                         # 0: no sample grids
    sample: Optional[Callable[[int], None]] = None  # write the grid of step s
    grad_clip: Optional[float] = None
    lr_hint: str = ""                             # the option that sets the lr, for the divergence message
    dist: runtime.DistInfo = dataclasses.field(
        default_factory=lambda: runtime.DistInfo(0, 1, 0, torch.device("cpu"), False))

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"


def resume(recipe: Recipe) -> int:
    """Restore ``recipe``'s state from its checkpoint, if there is one; returns the step."""
    path = recipe.ckpt_path
    if not path.exists():
        _cut_log(recipe, 0)
        return 0
    state = checkpoints.load_checkpoint(path, map_location=recipe.dist.device)
    recipe.check_resume(state, path)
    try:
        recipe.model.load_state_dict(state["model"])
        recipe.ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{path} does not fit this run's {recipe.name} ({str(exc).splitlines()[0]}); "
                         "use another --out") from exc
    recipe.optimizer.load_state_dict(state["optimizer"])
    recipe.set_rng_state(state["rng"])
    step = int(state["step"])
    _cut_log(recipe, step)
    return step


def _cut_log(recipe: Recipe, step: int) -> None:
    """Keep the log records of steps up to ``step`` (a torn last line is dropped with a warning)."""
    if not recipe.dist.is_main or not recipe.log_path.exists():
        return
    records = fileio.read_jsonl(recipe.log_path)
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept).encode()
    if data != recipe.log_path.read_bytes():
        fileio.atomic_write_bytes(recipe.log_path, data)


def _all_finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.state_dict().values() if p.is_floating_point())


def run(recipe: Recipe, *, progress: bool = True, stop_after: Optional[int] = None,
        on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Train (or resume) ``recipe`` to its last step; returns ``{"step", "losses", "loss"}``
    (this process's losses; ``loss``: the last, None if nothing was left to do)."""
    r, dist = recipe, recipe.dist
    step = resume(r)
    if dist.is_main:  # the resolved config beside the checkpoint, once it is known to be this run's
        fileio.atomic_write_json(r.out / "config.json", r.checkpoint_extra["config"])
    end = r.steps if stop_after is None else min(r.steps, stop_after)
    if step >= r.steps and progress:
        print(f"{r.out} is already trained to step {step} of {r.steps}; nothing to do", file=sys.stderr)
    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=r.steps, initial=step, desc=r.name, unit="step", dynamic_ncols=True)
    params = [p for group in r.optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    last_saved = step
    t0 = time.perf_counter()
    r.model.train()
    while step < end:
        result = r.step_loss(step)
        if not math.isfinite(result.value):  # every rank sees the same value and stops together
            _diverged(r, f"step {step + 1}: the loss is {result.value}", last_saved)
        r.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        if r.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, r.grad_clip, foreach=True)
        for group in r.optimizer.param_groups:
            group["lr"] = r.lr_at(step)
        r.optimizer.step()
        _update_ema(r.ema, r.model, r.ema_decay_at(step))
        step += 1
        losses.append(result.value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.value:.4f}")
        if dist.is_main and (step % r.log_every == 0 or step == end):
            record = {"step": step, "loss": result.value, **result.record, "lr": r.lr_at(step - 1),
                      "seconds": round(time.perf_counter() - t0, 3), "threads": torch.get_num_threads()}
            record = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
            fileio.append_jsonl(r.log_path, record)
        if dist.is_main and r.sample is not None and r.sample_every and (step % r.sample_every == 0 or step == end):
            r.sample(step)
        if step % r.ckpt_every == 0 or step == end:
            if not _all_finite(r.model, r.ema):  # a finite loss with a non-finite update
                _diverged(r, f"step {step}: the weights are no longer finite", last_saved)
            if dist.is_main:
                checkpoints.save_checkpoint(r.ckpt_path, {
                    **r.checkpoint_extra, "step": step, "model": r.model.state_dict(), "ema": r.ema.state_dict(),
                    "optimizer": r.optimizer.state_dict(), "rng": r.rng_state()})
            last_saved = step
            runtime.barrier(dist.world_size)
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    return {"step": step, "losses": losses, "loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for every parameter (buffers copied)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _diverged(recipe: Recipe, what: str, last_saved: int) -> None:
    path = recipe.ckpt_path
    kept = (f"{path} still holds the finite state of step {last_saved}" if path.exists()
            else "no checkpoint was written")
    raise TrainingDiverged(f"{what}: training stopped without saving ({kept}). {recipe.lr_hint}")
