"""Trained equilibrium maps for ``benchmarks/trained.py``.

- ``digits_mlp``: an implicit MLP classifier (weight-normed cell) trained on the bundled 8x8
  digits with ``Implicit`` backward and ``jacobian_reg``.
- ``mdeq_conv_trained``: the MDEQ-style conv cell of ``_problems.py`` after brief training
  on the digits upsampled to 16x16, same recipe.
- ``get_student``: the GET distillation demo's student equilibrium map, from its checkpoint.

Each trained model is cached as a checkpoint that loads with ``torch.load(weights_only=True)``
and records the spec it was trained with; it is reused only when that spec matches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deqkit
from _problems import Problem, _ConvCell, get_t

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FORMAT = 1
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Sizes and training recipe of one trained map (saved in its checkpoint)."""

    kind: str  # "mlp" or "conv"
    width: int  # state size (mlp) or channels (conv)
    hidden: int  # hidden units of the mlp cell (conv: unused, 0)
    image_size: int  # the digits resized to image_size x image_size (8: as bundled)
    steps: int  # optimizer steps
    batch: int
    lr: float
    jac_weight: float  # weight of the Jacobian penalty in the loss
    solve_steps: int  # forward and adjoint budget while training
    solve_tol: float  # forward and adjoint relative tolerance while training
    bench_batch: int  # held-out images in the benchmark's batch
    seed: int = 0


SPECS: dict[str, TrainSpec] = {
    "digits_mlp": TrainSpec("mlp", width=128, hidden=256, image_size=8, steps=600, batch=64, lr=2e-3,
                            jac_weight=1.0, solve_steps=30, solve_tol=1e-3, bench_batch=64),
    "mdeq_conv_trained": TrainSpec("conv", width=32, hidden=0, image_size=16, steps=150, batch=32, lr=2e-3,
                                   jac_weight=4.0, solve_steps=30, solve_tol=1e-3, bench_batch=16),
}
QUICK_SPECS: dict[str, TrainSpec] = {
    "digits_mlp": dataclasses.replace(SPECS["digits_mlp"], width=16, hidden=32, steps=20, batch=32, bench_batch=8),
    "mdeq_conv_trained": dataclasses.replace(SPECS["mdeq_conv_trained"], width=8, image_size=8, steps=3, batch=8,
                                             solve_steps=8, bench_batch=4),
}


@functools.lru_cache(maxsize=None)
def load_digits(split: str) -> tuple[Tensor, Tensor]:
    """The demo's digits split: images (N, 1, 8, 8) in [-1, 1] and labels (N,) (read once)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.get_distillation.data import load_digits as load

    data = load(split)
    return data.images, data.labels


class MLPCell(nn.Module):
    """``f(z, x) = tanh(W2 relu(W1 z + x) + b2)``, W1 and W2 weight-normed; x is the injection."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(width, hidden, bias=False)
        self.lin2 = nn.Linear(hidden, width)
        deqkit.nn.apply_norm(self, "weight")

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.lin2(torch.relu(self.lin1(z) + x)))  # (B, width)


class ImplicitClassifier(nn.Module):
    """injection -> DEQ(cell) -> linear head: an MLP cell on flattened images, or the
    MDEQ-style conv cell on (C, H, W) feature maps injected by a 3x3 conv."""

    def __init__(self, spec: TrainSpec):
        super().__init__()
        self.spec = spec
        self.inject: nn.Module
        self.head: nn.Module
        if spec.kind == "mlp":
            self.inject = nn.Sequential(nn.Flatten(), nn.Linear(spec.image_size ** 2, spec.hidden))
            cell: nn.Module = MLPCell(spec.width, spec.hidden)
            self.head = nn.Linear(spec.width, NUM_CLASSES)
        elif spec.kind == "conv":
            self.inject = nn.Conv2d(1, spec.width, 3, padding=1)
            cell = _ConvCell(spec.width)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(spec.width * spec.image_size ** 2, NUM_CLASSES))
        else:
            raise ValueError(f"spec.kind must be 'mlp' or 'conv', got {spec.kind!r}")
        self.deq = deqkit.DEQ(
            cell, solver=deqkit.Anderson(m=5), tol=spec.solve_tol, max_steps=spec.solve_steps, throw=False,
            backward=deqkit.Implicit(tol=spec.solve_tol, max_steps=spec.solve_steps), init=self.start,
        )

    @property
    def cell(self) -> nn.Module:
        return cast(nn.Module, self.deq.cell)

    def start(self, x: Tensor) -> Tensor:
        """z0 = 0, shaped like the state (the mlp's state is narrower than its injection)."""
        if self.spec.kind == "mlp":
            return x.new_zeros(x.shape[0], self.spec.width)  # (B, width)
        return torch.zeros_like(x)  # (B, C, H, W)

    def resize(self, images: Tensor) -> Tensor:
        size = self.spec.image_size
        if images.shape[-1] == size:
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, deqkit.Solution]:
        """(logits, z*, injection, solution)."""
        x = self.inject(self.resize(images))
        sol = self.deq(x)
        return self.head(sol.value), sol.value, x, sol


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def accuracy(model: ImplicitClassifier, images: Tensor, labels: Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(images[i: i + batch])[0]
            correct += int((logits.argmax(dim=1) == labels[i: i + batch]).sum())
    return correct / len(images)


def train(spec: TrainSpec, device: torch.device, progress: Callable[..., Any]) -> tuple[ImplicitClassifier, dict]:
    """Adam with cosine decay on cross-entropy + ``jac_weight`` x the Hutchinson estimate of
    ``||J_f(z*)||_F^2 / dim`` (one probe). Returns the model and a record of the run, with how
    many steps' forward and adjoint solves reached ``solve_tol`` (the others give an
    approximate gradient; deqkit's per-step warning about it is counted here instead)."""
    g = _seed_everything(spec.seed)
    model = ImplicitClassifier(spec).to(device)
    images, labels = (t.to(device) for t in load_digits("train"))
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / spec.steps)))
    forward_ok = adjoint_ok = 0
    t0 = time.perf_counter()
    bar = progress(range(spec.steps), desc=f"train {spec.kind}", unit="step", leave=False)
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="implicit backward solve hit max_steps", category=RuntimeWarning)
        for _ in bar:
            index = torch.randint(len(images), (spec.batch,), generator=g).to(device)
            logits, z, x, sol = model(images[index])
            task = F.cross_entropy(logits, labels[index])
            jac = deqkit.jacobian_reg(lambda z: model.cell(z, x), z.detach().requires_grad_()).mean
            loss = task + spec.jac_weight * jac
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            forward_ok += bool(sol.stats.converged.all())
            adjoint_ok += sol.stats.backward[-1].result == deqkit.Result.SUCCESS
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{task.item():.3f}", jac=f"{jac.item():.3f}", nfe=sol.stats.nfev)
    seconds = time.perf_counter() - t0
    test_images, test_labels = (t.to(device) for t in load_digits("test"))
    record = {"train_seconds": seconds, "test_accuracy": accuracy(model, test_images, test_labels),
              "final_task_loss": task.item(), "final_jacobian_penalty": jac.item(),
              "steps_forward_converged": forward_ok, "steps_adjoint_converged": adjoint_ok}
    return model, record


def _save(path: Path, state: dict) -> None:
    """torch.save through a temporary file, so a killed run leaves no half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def trained_classifier(name: str, spec: TrainSpec, folder: Path, device: torch.device, retrain: bool,
                       progress: Callable[..., Any], log: Callable[[str], None]) -> tuple[ImplicitClassifier, dict]:
    """The model of ``folder/name.pt`` if it was trained with ``spec``, else a newly trained one
    (saved there). The record says which (``reused``) and holds the test accuracy."""
    path = folder / f"{name}.pt"
    if path.exists() and not retrain:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except (RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            log(f"{name}: cannot read {path} ({str(exc).splitlines()[0]}); retraining")
            state = {}
        if state.get("format") == CHECKPOINT_FORMAT and state.get("spec") == dataclasses.asdict(spec):
            model = ImplicitClassifier(spec).to(device)
            model.load_state_dict(state["model"])
            log(f"{name}: reusing the checkpoint {path} (test accuracy {state['record']['test_accuracy']:.3f})")
            return model.eval(), {**state["record"], "checkpoint": str(path), "reused": True}
        elif state:
            log(f"{name}: the checkpoint {path} was trained with other settings; retraining")
    log(f"{name}: training ({spec.steps} steps) -> {path}")
    model, record = train(spec, device, progress)
    _save(path, {"format": CHECKPOINT_FORMAT, "spec": dataclasses.asdict(spec), "model": model.state_dict(),
                 "record": record, "torch": str(torch.__version__)})
    log(f"{name}: trained in {record['train_seconds']:.0f} s, test accuracy {record['test_accuracy']:.3f}")
    return model.eval(), {**record, "checkpoint": str(path), "reused": False}


def classifier_problem(name: str, model: ImplicitClassifier, budget: int) -> Problem:
    """The trained cell as a benchmark map on held-out digits: ``f(z, x) = cell(z, x)`` with x
    the injection of the first ``bench_batch`` test images, z0 = 0. The weight norm is folded
    into plain weights (the values the trained model uses; the model's cell is changed in
    place), so every solver, deqkit's or torchdeq's, calls the same plain function."""
    spec = model.spec
    device = next(model.parameters()).device
    images = load_digits("test")[0][: spec.bench_batch].to(device)
    with torch.no_grad():
        x = model.inject(model.resize(images))
    cell = deqkit.nn.remove_norm(model.cell) if deqkit.nn.has_norm(model.cell) else model.cell
    cell.eval().requires_grad_(False)
    z0 = model.start(x)
    if spec.kind == "mlp":
        description = f"implicit MLP classifier on the digits, trained (d={spec.width}, hidden {spec.hidden}), B={spec.bench_batch}"
    else:
        description = (f"MDEQ-style conv cell, trained on the digits at {spec.image_size}x{spec.image_size}, "
                       f"B={spec.bench_batch}, C={spec.width}")
    return Problem(name, description, cell, z0, (x,), budget=budget)


def get_student(path: Path, batch: int, budget: int, device: torch.device) -> tuple[Problem, dict]:
    """The GET student's equilibrium map (EMA weights) from a training checkpoint, its injection
    computed by the model's own stem from seeded noise, as ``_problems.get_t`` builds it; and a
    record of the checkpoint (preset, steps trained of the run's total)."""
    problem = get_t(batch=batch, checkpoint=str(path))
    model = cast(nn.Module, problem.f.__self__)  # type: ignore[attr-defined]  # f is model.equilibrium_map
    model.to(device)
    state = torch.load(path, map_location="cpu", weights_only=True)
    record = {"checkpoint": str(path), "preset": state["config"]["model"], "step": state.get("step"),
              "steps": state["config"]["steps"]}
    tokens, dim = problem.z0.shape[1:]
    description = (f"{record['preset']} student of the GET distillation demo (EMA weights, step {record['step']}), "
                   f"B={batch}, N={tokens}, D={dim}")
    problem = dataclasses.replace(problem, name="get_student", description=description, budget=budget,
                                  z0=problem.z0.to(device), inputs=tuple(t.to(device) for t in problem.inputs))
    return problem, record
