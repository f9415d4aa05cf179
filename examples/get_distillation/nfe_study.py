"""Residual and quality of GET students against the solver's NFE, per solver: does the map
have a fixed point that the solvers reach?

For each student (the EMA weights of a training run) and each solver, one solve of
``nfe_max`` calls of f per held-out pair from a seeded random start (the same start for
every solver and student), keeping every iterate; at each NFE k it measures

- the relative residual ``||f(z_k) - z_k|| / ||f(z_k)||`` per sample (mean, median, max);
- teacher-match PSNR of the image decoded from ``f(z_k)`` (what ``max_steps=k`` returns)
  against the teacher's images of the held-out pairs;
- FD-digits of those images (digits only; N = the number of held-out pairs, so compare it
  only with FDs at that N);

and writes OUT/nfe_study.json, OUT/nfe_study.md (tables and a summary of the targets:
the first NFE with residual <= ``--residual-target``, the largest quality drop after the
best NFE so far, the quality at the training iterations) and OUT/nfe_study.png.

    python -m examples.get_distillation nfe-study --run runs/get --run runs/get-eq \\
        --heldout runs/pairs-heldout --out runs/nfe-study
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import deqkit

from . import checkpoints, cli, fileio, locks, metrics, models, runtime
from . import config as cfg
from .config import MAX_BATCH, MAX_SEED, MAX_STEPS, option
from .images import save_figure
from .pairs import PairDataset
from .report import run_labels

TARGETS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # the summary's "NFE to reach" columns
SOLVER_LABELS = {"fixed_point": "FixedPoint", "anderson": "Anderson", "broyden": "Broyden"}


@cfg.settings
class NfeStudyConfig:
    """One NFE study; each field is one command-line option (``cli.add_config_arguments``)."""

    heldout: str = option(help="held-out pair folder: same teacher as the students' pairs, seeds disjoint")
    out: str = option(help="folder of nfe_study.{json,md,png}")
    runs: list[str] = option(help="a GET student's training run folder (repeatable)", flag="--run", default_factory=list)
    solvers: list[str] = option(help="solver, deqkit registry name with its default settings (repeatable)",
                                flag="--solver", default_factory=lambda: ["fixed_point", "anderson", "broyden"])
    nfe_max: int = option(30, help="largest NFE (calls of f) measured", ge=1, le=1000)
    num_heldout: Optional[int] = option(None, help="use the first N held-out pairs", default_text="all", ge=2,
                                        le=MAX_STEPS)
    residual_target: float = option(1e-3, help="the relative residual whose first NFE the summary reports", gt=0, le=1e6)
    fd: bool = option(True, help="FD-digits at every NFE (digits images only)")
    ema: bool = option(True, help="measure the EMA weights (--no-ema: the raw weights; for short runs, whose "
                       "EMA still holds a share of the initial weights: decay**steps)")
    batch: int = option(250, help="batch size of the solves", ge=1, le=MAX_BATCH)
    seed: int = option(0, help="seed of the random starts z0", ge=0, le=MAX_SEED)
    cache: Optional[str] = option(None, help="the digits classifier's cache", default_text="OUT/cache")
    device: str = option("cpu", help="torch device")

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("--run is required (one or more GET training runs)")
        unknown = [s for s in self.solvers if s not in deqkit.solvers.available()]
        if unknown or not self.solvers:
            raise ValueError(f"solver must be among {deqkit.solvers.available()}, got {unknown or self.solvers}")
        from .train import check_solver

        for name in self.solvers:  # the study keeps every iterate through an Unrolled solve
            check_solver(name, {}, deqkit.Unrolled(), f"--solver {name}",
                         f"--solver {name} (nfe-study keeps every iterate through deqkit.Unrolled)")

    @property
    def cache_dir(self) -> str:
        return self.cache if self.cache is not None else str(Path(self.out) / "cache")


def solve_path(model: models.GET, noise: torch.Tensor, labels: Optional[torch.Tensor], solver: Any, nfe_max: int,
               z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One solve of ``nfe_max`` calls of f from ``z0``: (images (K, B, C, H, W) decoded from
    ``f(z_k)`` for k = 1..K, relative residuals (B, K))."""
    with torch.no_grad():
        u = model.inject(noise, model._condition(noise, labels))  # (B, N, 3D*L_e)
        sol = deqkit.fixed_point(model.equilibrium_map, z0, inputs=(u,), solver=solver, backward=deqkit.Unrolled(),
                                 tol=None, stop_mode="rel", max_steps=nfe_max, divergence=None, trajectory=nfe_max,
                                 throw=False)
        images = torch.stack([model.decode(fz) for fz in sol.trajectory])  # (K, B, C, H, W)
    residual = sol.stats.trace  # (B, K)
    if images.shape[0] != nfe_max or residual.shape[1] != nfe_max:  # a sample went non-finite and stopped
        pad = nfe_max - residual.shape[1]
        residual = torch.cat([residual, residual.new_full((residual.shape[0], pad), float("nan"))], dim=1)
        images = torch.cat([images, images.new_full((nfe_max - images.shape[0], *images.shape[1:]), float("nan"))])
    return images, residual


def first_at_or_below(values: list[float], target: float) -> Optional[int]:
    """The 1-based index of the first value <= target, or None."""
    return next((i + 1 for i, v in enumerate(values) if v <= target), None)


def largest_drop(values: list[float], higher_is_better: bool = True) -> float:
    """The largest worsening of a quality curve below its best value so far (0: monotone)."""
    best, drop = None, 0.0
    for v in values:
        if not math.isfinite(v):
            return float("inf")
        best = v if best is None else (max(best, v) if higher_is_better else min(best, v))
        drop = max(drop, (best - v) if higher_is_better else (v - best))
    return drop


def study(config: NfeStudyConfig) -> dict[str, Any]:
    """Measure every student with every solver (see the module docstring); write the files and
    return the study's dict."""
    with locks.folder_lock(config.out):
        return _study(config)


def _study(config: NfeStudyConfig) -> dict[str, Any]:
    out = Path(config.out)
    runtime.check_device(config.device)
    device = torch.device(config.device)
    heldout = PairDataset(config.heldout)
    from .evaluate import check_heldout
    from .train import load_student

    n = len(heldout) if config.num_heldout is None else min(config.num_heldout, len(heldout))
    items = [heldout[i] for i in range(n)]
    noise = torch.stack([it[0] for it in items]).to(device)
    target = torch.stack([it[1] for it in items]).to(device)
    labels = torch.stack([it[2] for it in items]).to(device) if heldout.num_classes else None
    digits = tuple(heldout.image_shape) == (1, 8, 8) and config.fd
    if digits:
        classifier = metrics.load_digits_classifier(config.cache_dir)
        from . import data

        ref_features, _ = metrics.classifier_outputs(classifier, data.load_digits("train").images)
    states = {run: checkpoints.load_checkpoint(Path(run) / "checkpoint.pt") for run in config.runs}
    loaded = {run: load_student(Path(run) / "checkpoint.pt", device, ema=config.ema, state=states[run])
              for run in config.runs}
    students = []
    for run, label in zip(config.runs, run_labels(config.runs, [loaded[run][1].model for run in config.runs])):
        check_heldout(heldout, run, states[run])
        model, tcfg = loaded[run]
        if not isinstance(model, models.GET):
            raise ValueError(f"{run}: nfe-study measures GET students, and {tcfg.model} is not one")
        token_shape = ((model.img_size // model.patch) ** 2, model.dim)
        z0 = torch.randn((n, *token_shape), generator=torch.Generator().manual_seed(config.seed)).to(device)
        row: dict[str, Any] = {"run": str(run), "label": label or tcfg.model, "model": tcfg.model,
                               "train": {k: getattr(tcfg, k) for k in ("max_steps", "min_steps", "output_norm", "jac_reg",
                                                                       "solver", "backward", "gamma", "steps")},
                               "solvers": {}}
        for name in config.solvers:
            solver = deqkit.solvers.get(name)
            imgs, res = [], []
            for i in range(0, n, config.batch):
                lab = labels[i:i + config.batch] if labels is not None else None
                im, r = solve_path(model, noise[i:i + config.batch], lab, solver, config.nfe_max, z0[i:i + config.batch])
                imgs.append(im)
                res.append(r)
            images = torch.cat(imgs, dim=1)  # (K, n, C, H, W)
            residual = torch.cat(res).double().cpu()  # (n, K)
            entry = {
                "solver": repr(solver),
                "residual_mean": residual.mean(0).tolist(),
                "residual_median": residual.median(0).values.tolist(),
                "residual_max": residual.max(0).values.tolist(),
                "psnr": [metrics.psnr(images[k], target) for k in range(config.nfe_max)],
            }
            if digits:
                fds = []
                for k in range(config.nfe_max):
                    if not bool(torch.isfinite(images[k]).all()):
                        fds.append(float("nan"))
                        continue
                    feats, _ = metrics.classifier_outputs(classifier, images[k])
                    fds.append(metrics.frechet_distance(feats, ref_features))
                entry["fd_digits"] = fds
            entry["summary"] = _summary(entry, config.residual_target, tcfg.max_steps)
            row["solvers"][SOLVER_LABELS.get(name, name)] = entry
        students.append(row)
    result = {"config": cfg.to_dict(config), "n": n, "nfe": list(range(1, config.nfe_max + 1)),
              "students": students}
    save_figure(figure(result), out / "nfe_study.png")
    fileio.atomic_write_bytes(out / "nfe_study.json", json.dumps(result, indent=1, default=str).encode())
    fileio.atomic_write_bytes(out / "nfe_study.md", markdown(result).encode())
    return result


def _summary(entry: dict, target: float, trained: int) -> dict[str, Any]:
    k = min(trained, len(entry["psnr"]))
    summary = {
        "nfe_to_target": first_at_or_below(entry["residual_mean"], target),
        "nfe_to": {f"{t:g}": first_at_or_below(entry["residual_mean"], t) for t in TARGETS},
        "residual_at_max": entry["residual_mean"][-1],
        "psnr_at_trained": entry["psnr"][k - 1],
        "psnr_best": max(entry["psnr"]),
        "psnr_at_max": entry["psnr"][-1],
        "psnr_largest_drop": largest_drop(entry["psnr"], higher_is_better=True),
    }
    if "fd_digits" in entry:
        summary.update(fd_at_trained=entry["fd_digits"][k - 1], fd_at_max=entry["fd_digits"][-1],
                       fd_largest_rise=largest_drop(entry["fd_digits"], higher_is_better=False))
    return summary


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    cfg = result["config"]
    target = cfg["residual_target"]
    lines = ["# GET students: residual and quality against NFE", "",
             f"{'EMA' if cfg['ema'] else 'Raw (not EMA)'} weights; {result['n']} held-out pairs, one seeded random start per pair (the same for every solver and student); "
             "residual: mean over the pairs of ||f(z) - z|| / ||f(z)||; PSNR against the teacher's images"
             + ("; FD-digits of the same images (N = that count)" if any("fd_digits" in e for s in result["students"]
                                                                         for e in s["solvers"].values()) else "") + ".",
             "", "## Summary", "",
             f"| student | solver | NFE to residual <= {target:g} | residual at NFE {cfg['nfe_max']} | "
             "PSNR at its training iterations | best PSNR | PSNR at max NFE | largest PSNR drop | FD at training its. | "
             "FD at max NFE | largest FD rise |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["students"]:
        for name, e in s["solvers"].items():
            m = e["summary"]
            lines.append(f"| {s['label']} | {name} | {_fmt(m['nfe_to_target'], 'd')} | {m['residual_at_max']:.2e} | "
                         f"{m['psnr_at_trained']:.2f} ({s['train']['max_steps']}) | {m['psnr_best']:.2f} | "
                         f"{m['psnr_at_max']:.2f} | {m['psnr_largest_drop']:.2f} | {_fmt(m.get('fd_at_trained'), '.2f')} | "
                         f"{_fmt(m.get('fd_at_max'), '.2f')} | {_fmt(m.get('fd_largest_rise'), '.2f')} |")
    lines += ["", "NFE to reach a mean relative residual (-: not within the NFE measured; in brackets: the solver's "
              "NFE over FixedPoint's):", "",
              "| student | solver | " + " | ".join(f"<= {t:g}" for t in TARGETS) + " |", "|---|---|" + "---|" * len(TARGETS)]
    for s in result["students"]:
        plain = s["solvers"].get("FixedPoint", {}).get("summary", {}).get("nfe_to", {})
        for name, e in s["solvers"].items():
            cells = []
            for t in TARGETS:
                k, base = e["summary"]["nfe_to"][f"{t:g}"], plain.get(f"{t:g}")
                ratio = f" ({k / base:.2f}x)" if k is not None and base and name != "FixedPoint" else ""
                cells.append(("-" if k is None else str(k)) + ratio)
            lines.append(f"| {s['label']} | {name} | " + " | ".join(cells) + " |")
    shown = [k for k in (1, 2, 3, 4, 6, 8, 10, 12, 15, 20, 25, 30) if k <= cfg["nfe_max"]]
    for s in result["students"]:
        lines += ["", f"## {s['label']}", "", "Trained with: " + ", ".join(f"{k}={v}" for k, v in s["train"].items()), "",
                  "| NFE | " + " | ".join(map(str, shown)) + " |", "|---|" + "---|" * len(shown)]
        for name, e in s["solvers"].items():
            lines.append(f"| residual, {name} | " + " | ".join(f"{e['residual_mean'][k - 1]:.1e}" for k in shown) + " |")
        for name, e in s["solvers"].items():
            lines.append(f"| PSNR, {name} | " + " | ".join(f"{e['psnr'][k - 1]:.2f}" for k in shown) + " |")
        for name, e in s["solvers"].items():
            if "fd_digits" in e:
                lines.append(f"| FD, {name} | " + " | ".join(f"{e['fd_digits'][k - 1]:.2f}" for k in shown) + " |")
    lines += ["", "![residual and quality against NFE](nfe_study.png)", ""]
    return "\n".join(lines)


def figure(result: dict) -> Any:
    """Residual (log) and quality against NFE: a colour per student, a line style per solver."""
    from matplotlib.figure import Figure

    has_fd = any("fd_digits" in e for s in result["students"] for e in s["solvers"].values())
    panels = [("residual_mean", "relative residual ||f(z)-z|| / ||f(z)|| (mean)", True),
              ("psnr", "teacher-match PSNR (dB, higher is better)", False)]
    if has_fd:
        panels.append(("fd_digits", "FD-digits (lower is better)", True))
    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    styles = ["-", "--", ":", "-."]
    colors = [f"C{i}" for i in range(10)]
    for ax, (key, ylabel, log) in zip(axes, panels):
        for i, s in enumerate(result["students"]):
            for j, (name, e) in enumerate(s["solvers"].items()):
                if key in e:
                    y = np.array(e[key], dtype=float)
                    ax.plot(result["nfe"], y, styles[j % len(styles)], color=colors[i % len(colors)], lw=1.3,
                            label=f"{s['label']}, {name}")
        if log:
            ax.set_yscale("log")
        if key == "residual_mean":
            ax.axhline(result["config"]["residual_target"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("NFE (calls of the equilibrium map f)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"GET students against solver NFE ({result['n']} held-out pairs)")
    fig.tight_layout()
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, NfeStudyConfig)


def _run(config: NfeStudyConfig) -> int:
    result = study(config)
    print(markdown(result))
    print(f"wrote {Path(config.out) / 'nfe_study.md'}, nfe_study.json and nfe_study.png")
    return 0


def preflight(config: NfeStudyConfig) -> None:
    """What a study checks before its work: the device, the held-out pairs, and that every run
    is a GET student trained on pairs these are held out from."""
    from .evaluate import check_heldout

    runtime.check_device(config.device)
    heldout = PairDataset(config.heldout, verify="none")
    for run in config.runs:
        state = checkpoints.load_checkpoint(Path(run) / "checkpoint.pt")
        check_heldout(heldout, run, state)
        model = state.get("config", {}).get("model")
        if models.PRESETS.get(model, {}).get("family") != "GET":
            raise ValueError(f"{run}: nfe-study measures GET students, and {model} is not one")


def main(args: argparse.Namespace) -> int:
    return cli.run(NfeStudyConfig, args, _run, check=preflight)
