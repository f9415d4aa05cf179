#!/usr/bin/env python3
"""The stability toolkit at work: NFE through training without regularisation, with a fixed
Jacobian penalty and with ``AdaptiveJacobianWeight``; and ``Anderson`` alone against
``Fallback(Anderson(), Broyden())`` on the trained maps.

The model is an implicit classifier on the bundled 8x8 digits: ``x = U image``,
``z* = tanh(W z* + x)`` (``W`` orthogonal at initialisation, gain 0.5), ``logits = V z*``;
Anderson(m=5) to a relative residual of 1e-3 (at most 40 calls of f), ``Implicit`` backward,
Adam with a cosine learning-rate decay. Without regularisation its NFE per step (set by the
batch's slowest sample) grows within the first hundred steps, as the model learns, and stays
up. Three arms, each over ``--seeds`` seeds:

- ``none``: the cross-entropy alone;
- ``fixed``: plus ``--fixed-weight`` x ``jacobian_reg(...).mean`` at every step;
- ``adaptive``: plus ``AdaptiveJacobianWeight.value`` x the same penalty, computed only while
  the weight is above 0, the weight updated from a ``Monitor``'s trend after each step
  (``start`` 2, ``factor`` 2, at most ``--max-weight``, default 4).

Every step's ``SolveRecord`` goes to OUT/logs/<arm>-seed<k>.jsonl. For each run: NFE per step,
its mean over the first ``window`` steps (the start, the monitor's baseline) and over the last
tenth of training (the end), test accuracy, wall time of the training loop, forward samples
that did not end SUCCESS (and ESCAPED ones), the monitor's warnings, and on the test set each
sample's iterations and the spectral radius of the map's Jacobian at its fixed point. Then, where ``deqkit.Fallback`` exists, each unregularised model's map solves the
test set in batches with Anderson, Broyden and Fallback(Anderson, Broyden) to a tighter
tolerance on a short budget: samples each finishes, and evaluations on the batches Anderson
finishes alone. The issue's targets are checked and reported (met or missed, with the numbers).

Timings use one torch thread by default; the 1-minute load average before and after is
recorded. Writes OUT/results.json, OUT/stability_nfe.png (and OUT/stability_fallback.png with
Fallback) and prints a markdown table.

    python benchmarks/stability.py --quick --out runs/stability-quick
    python benchmarks/stability.py --out runs/stability
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import deqkit  # noqa: E402
from _device import add_device_option, describe, header, now, resolve  # noqa: E402
from _trained_maps import load_digits  # noqa: E402

ARMS = ("none", "fixed", "adaptive")
CHAIN = "Fallback(Anderson, Broyden)"  # the solver chain compared with each of its solvers alone
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes and recipe of one benchmark run (saved in results.json)."""

    width: int  # state size d
    gain: float  # orthogonal init gain of W: the map's contraction at the start
    steps: int  # optimizer steps per run
    batch: int
    lr: float
    tol: float  # forward and adjoint relative tolerance while training
    max_steps: int  # forward and adjoint budget while training
    window: int  # the Monitor's window: the start of training is its first window
    nfev_factor: float  # the Monitor warns when the NFE grows past this factor
    fixed_weight: float  # the fixed arm's Jacobian weight
    adaptive: dict  # AdaptiveJacobianWeight's arguments
    fallback_tol: float  # the tolerance of the solver comparison
    fallback_steps: int  # its budget per solver
    fallback_batch: int


SETUPS = {
    False: Setup(width=64, gain=0.5, steps=600, batch=64, lr=5e-3, tol=1e-3, max_steps=40, window=10, nfev_factor=1.5,
                 fixed_weight=2.0, adaptive={"start": 2.0, "factor": 2.0, "max_weight": 4.0},
                 fallback_tol=1e-5, fallback_steps=20, fallback_batch=60),
    True: Setup(width=16, gain=0.5, steps=24, batch=16, lr=5e-3, tol=1e-3, max_steps=9, window=3, nfev_factor=1.01,
                fixed_weight=1.0, adaptive={"start": 0.5, "factor": 2.0, "max_weight": 4.0, "raise_above": 1.01, "lower_below": 1.0},
                fallback_tol=1e-5, fallback_steps=6, fallback_batch=30),
}
SEEDS = {False: 3, True: 2}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/stability"), help="output folder (default runs/stability)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a smoke test of seconds")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 600; 24 with --quick)")
    parser.add_argument("--fixed-weight", type=float, default=None,
                        help="the fixed arm's Jacobian weight (default 2.0; 1.0 with --quick)")
    parser.add_argument("--max-weight", type=float, default=None,
                        help="the adaptive arm's largest Jacobian weight (default 4.0, twice the fixed weight)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; 0: torch's choice). More than one makes timings "
                             "fragile on a shared machine (docs/benchmarks.md)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    for name in ("fixed_weight", "max_weight"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("seeds", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} exists and is not a folder")
    args.device = resolve(parser, args.device)
    setup = SETUPS[args.quick]
    if args.steps is not None:
        setup = dataclasses.replace(setup, steps=args.steps)
    if args.fixed_weight is not None:
        setup = dataclasses.replace(setup, fixed_weight=args.fixed_weight)
    if args.max_weight is not None:
        if args.max_weight < setup.adaptive["start"]:
            parser.error(f"--max-weight must be >= the adaptive start weight {setup.adaptive['start']:g}, got {args.max_weight}")
        setup = dataclasses.replace(setup, adaptive={**setup.adaptive, "max_weight": args.max_weight})
    if setup.steps < 2 * setup.window:
        parser.error(f"--steps must be at least {2 * setup.window} (two monitor windows), got {setup.steps}")
    args.setup = setup
    args.seeds = args.seeds or SEEDS[args.quick]
    return args


# -- the model ------------------------------------------------------------------------------
class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)``; ``W`` orthogonal times ``gain`` at initialisation."""

    def __init__(self, width: int, gain: float):
        super().__init__()
        self.lin = nn.Linear(width, width)
        nn.init.orthogonal_(self.lin.weight, gain=gain)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(z) + x)  # (B, d)


class Classifier(nn.Module):
    """image -> x = U image -> z* = cell(z*, x) -> logits = V z*."""

    def __init__(self, setup: Setup, solver: Any = None):
        super().__init__()
        self.inject = nn.Sequential(nn.Flatten(), nn.Linear(64, setup.width))
        self.cell = TanhCell(setup.width, setup.gain)
        self.head = nn.Linear(setup.width, NUM_CLASSES)
        self.deq = deqkit.DEQ(self.cell, solver=solver or deqkit.Anderson(m=5), tol=setup.tol,
                              max_steps=setup.max_steps, throw=False,
                              backward=deqkit.Implicit(tol=setup.tol, max_steps=setup.max_steps))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, deqkit.Solution]:
        """(logits, z*, x, solution)."""
        x = self.inject(images)  # (B, d)
        sol = self.deq(x)
        return self.head(sol.value), sol.value, x, sol


def evaluate(model: Classifier, images: Tensor, labels: Tensor) -> dict:
    """On the test set, solved as in training: the accuracy, the samples whose solve did not
    end SUCCESS (and ESCAPED ones), each sample's iterations (quantiles: the batch's NFE is
    its slowest sample's) and the spectral radius of the map's Jacobian at its fixed point."""
    model.eval()
    with torch.no_grad():
        logits, z, x, sol = model(images)
    radius = deqkit.spectral_radius(lambda z: model.cell(z, x), z, n_iters=20, seed=0)
    model.train()
    record = deqkit.summarize_solves(sol)
    steps = sol.stats.steps.double()
    return {"test_accuracy": float((logits.argmax(dim=1) == labels).double().mean()),
            "test_failed": record.failed, "test_escaped": record.escaped,
            "test_steps": {"median": float(steps.median()), "max": float(steps.max())},
            "spectral_radius": {"median": float(radius.median()), "max": float(radius.max())}}


# -- training -------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def train_run(arm: str, seed: int, setup: Setup, device: torch.device, logs: Path) -> dict:
    """One run of one arm: the record of every step to logs/<arm>-seed<seed>.jsonl; returns
    the run's figures."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Classifier(setup).to(device)
    images, labels = (t.to(device) for t in load_digits("train"))
    test_images, test_labels = (t.to(device) for t in load_digits("test"))
    optimizer = torch.optim.Adam(model.parameters(), lr=setup.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / setup.steps)))
    weight = deqkit.AdaptiveJacobianWeight(**setup.adaptive) if arm == "adaptive" else None
    nfev, weights, failed, escaped, penalty_steps = [], [], 0, 0, 0
    with deqkit.Monitor(jsonl=logs / f"{arm}-seed{seed}.jsonl", window=setup.window,
                        nfev_factor=setup.nfev_factor) as monitor, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = now(device)
        for _ in range(setup.steps):
            index = torch.randint(len(images), (setup.batch,), generator=gen).to(device)
            logits, z, x, sol = model(images[index])
            loss = F.cross_entropy(logits, labels[index])
            w = setup.fixed_weight if arm == "fixed" else (weight.value if weight is not None else 0.0)
            if w > 0:  # the penalty costs a vector-Jacobian product and its backward: only when on
                penalty_steps += 1
                jac = deqkit.jacobian_reg(lambda z: model.cell(z, x), z.detach().requires_grad_()).mean
                loss = loss + w * jac
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]  # this step's
            optimizer.step()
            schedule.step()
            record = monitor.step(sol, loss=loss, jacobian_weight=w, lr=lr)
            if weight is not None:
                weight.update(monitor.trend)
            nfev.append(record.nfev)
            weights.append(w)
            failed += record.failed
            escaped = None if escaped is None or record.escaped is None else escaped + record.escaped
        seconds = now(device) - start
    end = max(1, setup.steps // 10)
    monitor_warnings = [str(w.message) for w in caught if str(w.message).startswith("deqkit: ")]
    return {"arm": arm, "seed": seed, "nfev": nfev, "jacobian_weight": weights,
            "nfe_start": _mean(nfev[: setup.window]), "nfe_end": _mean(nfev[-end:]),
            "nfe_growth": _mean(nfev[-end:]) / _mean(nfev[: setup.window]),
            "train_seconds": seconds, "penalty_steps": penalty_steps, "failed_samples": failed,
            "escaped_samples": escaped, **evaluate(model, test_images, test_labels),
            "monitor_warnings": monitor_warnings, "model": model}


# -- Anderson alone against Fallback --------------------------------------------------------
def solvers_compared() -> dict[str, Any]:
    """The solvers of the comparison; Fallback only where this deqkit has it."""
    solvers = {"Anderson": deqkit.Anderson(m=5), "Broyden": deqkit.Broyden()}
    fallback = getattr(deqkit, "Fallback", None)
    if fallback is not None:
        solvers[CHAIN] = fallback(deqkit.Anderson(m=5), deqkit.Broyden())
    return solvers


def compare_solvers(model: Classifier, setup: Setup, device: torch.device) -> dict:
    """Each solver on the test set in batches: per batch, whether each sample ended SUCCESS,
    the calls of f and the ESCAPED samples."""
    images = load_digits("test")[0].to(device)
    cell = model.cell.eval().requires_grad_(False)
    out: dict[str, dict[str, list]] = {}
    with torch.no_grad():
        for name, solver in solvers_compared().items():
            finished, nfev, escaped = [], [], []
            for i in range(0, len(images) - setup.fallback_batch + 1, setup.fallback_batch):
                x = model.inject(images[i: i + setup.fallback_batch])
                sol = deqkit.fixed_point(cell, torch.zeros_like(x), inputs=(x,), solver=solver, tol=setup.fallback_tol,
                                         max_steps=setup.fallback_steps, throw=False)
                record = deqkit.summarize_solves(sol)
                finished.append((sol.stats.status == int(deqkit.Result.SUCCESS)).tolist())
                nfev.append(record.nfev)
                escaped.append(record.escaped)
            out[name] = {"finished": finished, "nfev": nfev, "escaped": escaped}
    return out



def fallback_summary(per_seed: list[dict]) -> dict:
    """Over every seed's batches: samples each solver finishes; with Fallback, the samples a
    single solver finishes that Fallback does not, and on the batches Anderson finishes
    alone, Fallback's calls of f over the better single solver's."""
    names = list(per_seed[0])
    summary: dict[str, Any] = {
        "samples": sum(len(batch) for s in per_seed for batch in s[names[0]]["finished"]),
        "finished": {n: sum(sum(batch) for s in per_seed for batch in s[n]["finished"]) for n in names},
        "nfev": {n: sum(sum(s[n]["nfev"]) for s in per_seed) for n in names},
    }
    if CHAIN not in names:
        return summary
    missed, ratios, over_first = 0, [], []
    for s in per_seed:
        anderson, broyden, chain = s["Anderson"], s["Broyden"], s[CHAIN]
        for k, done in enumerate(chain["finished"]):
            missed += sum((a or b) and not c for a, b, c in zip(anderson["finished"][k], broyden["finished"][k], done))
            if all(anderson["finished"][k]):
                ratios.append(chain["nfev"][k] / min(anderson["nfev"][k], broyden["nfev"][k]))
                over_first.append(chain["nfev"][k] / anderson["nfev"][k])
    summary.update(missed_by_fallback=missed, easy_batches=len(ratios),
                   easy_batch_nfev_ratio_max=max(ratios) if ratios else None,
                   easy_batch_nfev_ratio_mean=_mean(ratios) if ratios else None,
                   easy_batch_nfev_over_anderson_max=max(over_first) if over_first else None)
    return summary


# -- aggregation and targets -----------------------------------------------------------------
def spread(values: list[float]) -> dict:
    """Mean, standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


SUMMARY_KEYS = ("nfe_start", "nfe_end", "nfe_growth", "test_accuracy", "train_seconds", "failed_samples", "penalty_steps",
                "test_steps.median", "test_steps.max", "spectral_radius.median", "spectral_radius.max")


def _value(run: dict, key: str) -> float:
    """``run[key]``, or ``run[a][b]`` for ``key = "a.b"``."""
    first, _, second = key.partition(".")
    return float(run[first][second] if second else run[first])


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Each arm's spread over its seeds of each of ``SUMMARY_KEYS``."""
    return {arm: {k: spread([_value(r, k) for r in runs if r["arm"] == arm]) for k in SUMMARY_KEYS}
            for arm in ARMS if any(r["arm"] == arm for r in runs)}


def targets(summary: dict[str, dict], fallback: Optional[dict]) -> list[dict]:
    """The issue's targets on the seed means: each with its numbers and whether it is met."""
    none, fixed, adaptive = summary["none"], summary["fixed"], summary["adaptive"]
    rows = [
        {"target": "unregularised NFE grows (end/start > 1.2)", "measured": none["nfe_growth"]["mean"],
         "bound": 1.2, "met": none["nfe_growth"]["mean"] > 1.2},
        {"target": "adaptive NFE end/start <= 1.2", "measured": adaptive["nfe_growth"]["mean"], "bound": 1.2,
         "met": adaptive["nfe_growth"]["mean"] <= 1.2},
        {"target": "adaptive accuracy >= unregularised - 0.5 point", "measured": adaptive["test_accuracy"]["mean"],
         "bound": none["test_accuracy"]["mean"] - 0.005,
         "met": adaptive["test_accuracy"]["mean"] >= none["test_accuracy"]["mean"] - 0.005},
        {"target": "adaptive wall time <= fixed's", "measured": adaptive["train_seconds"]["mean"],
         "bound": fixed["train_seconds"]["mean"], "met": adaptive["train_seconds"]["mean"] <= fixed["train_seconds"]["mean"]},
    ]
    if fallback is not None and "missed_by_fallback" in fallback:
        rows.append({"target": "Fallback finishes every sample a single solver finishes", "measured": fallback["missed_by_fallback"],
                     "bound": 0, "met": fallback["missed_by_fallback"] == 0})
        ratio = fallback["easy_batch_nfev_ratio_max"]
        rows.append({"target": "Fallback NFE <= 1.1x the better single solver's where Anderson succeeds",
                     "measured": ratio, "bound": 1.1, "met": ratio is not None and ratio <= 1.1})
    return rows


# -- outputs --------------------------------------------------------------------------------
def rolling(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def figure_nfe(runs: list[dict], setup: Setup):
    """NFE per step (rolling mean over the window) of each arm, the seeds' mean and their
    min-max band, with 1.2x adaptive's start marked; below, the Jacobian weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, aw) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    for i, arm in enumerate(ARMS):
        curves = [rolling([float(n) for n in r["nfev"]], setup.window) for r in runs if r["arm"] == arm]
        if not curves:
            continue
        steps = range(len(curves[0]))
        mean = [statistics.fmean(c[k] for c in curves) for k in steps]
        color = plt.cm.tab10(i)
        ax.fill_between(steps, [min(c[k] for c in curves) for k in steps], [max(c[k] for c in curves) for k in steps],
                        color=color, alpha=0.2, lw=0)
        ax.plot(steps, mean, color=color, label=f"{arm} ({len(curves)} seeds: mean, band min-max)")
        if arm != "none":
            ws = [r["jacobian_weight"] for r in runs if r["arm"] == arm]
            aw.plot(steps, [statistics.fmean(w[k] for w in ws) for k in steps], color=color, label=arm)
    start = statistics.fmean(r["nfe_start"] for r in runs if r["arm"] == "adaptive")
    ax.axhline(1.2 * start, color="grey", ls=":", lw=1, label="1.2x adaptive's start")
    ax.set_ylabel(f"NFE per step (rolling mean of {setup.window})")
    ax.set_title(f"Forward NFE through training: implicit tanh classifier on the digits (d={setup.width}, "
                 f"rel. tol {setup.tol:g})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    aw.set_ylabel("Jacobian weight\n(mean over seeds)", fontsize=8)
    aw.set_xlabel("training step")
    aw.legend(fontsize=8)
    aw.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_nfe(runs: list[dict], setup: Setup, out: Path) -> str:
    import matplotlib.pyplot as plt

    fig = figure_nfe(runs, setup)
    name = "stability_nfe.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_fallback(summary: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["finished"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.bar(names, [summary["samples"] - summary["finished"][n] for n in names], color="tab:red")
    a1.set_ylabel(f"samples not finished (of {summary['samples']})")
    a2.bar(names, [summary["nfev"][n] for n in names], color="tab:blue")
    a2.set_ylabel("calls of f, all batches")
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=7)
        a.grid(alpha=0.3, axis="y")
    fig.suptitle("Trained unregularised maps, test set: each solver alone and the Fallback chain", fontsize=9)
    fig.tight_layout()
    name = "stability_fallback.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def table(summary: dict[str, dict]) -> str:
    def cell(s: dict, fmt: str) -> str:
        return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"

    lines = ["| arm | NFE start | NFE end | end/start | test accuracy | train s | steps with penalty | failed samples "
             "| test iterations median / max | spectral radius median / max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {cell(s['nfe_start'], '.1f')} | {cell(s['nfe_end'], '.1f')} | "
                     f"{cell(s['nfe_growth'], '.2f')} | {cell(s['test_accuracy'], '.3f')} | "
                     f"{cell(s['train_seconds'], '.1f')} | {s['penalty_steps']['mean']:.0f} | {s['failed_samples']['mean']:.0f} | "
                     f"{s['test_steps.median']['mean']:.1f} / {s['test_steps.max']['mean']:.1f} | "
                     f"{s['spectral_radius.median']['mean']:.2f} / {s['spectral_radius.max']['mean']:.2f} |")
    return "\n".join(lines)


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average on this OS
        return None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup, device = args.setup, args.device
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    runs = []
    for seed in range(args.seeds):
        for arm in ARMS:
            run = train_run(arm, seed, setup, device, logs)
            print(f"{arm:8s} seed {seed}: NFE {run['nfe_start']:.1f} -> {run['nfe_end']:.1f}, accuracy "
                  f"{run['test_accuracy']:.3f}, {run['train_seconds']:.1f} s", flush=True)
            runs.append(run)
    fallback_runs = [compare_solvers(r["model"], setup, device) for r in runs if r["arm"] == "none"]
    load_after = _load()
    summary = summarize(runs)
    fallback = fallback_summary(fallback_runs)
    has_fallback = "missed_by_fallback" in fallback
    info = describe(device)
    plots = [plot_nfe(runs, setup, args.out)] + ([plot_fallback(fallback, args.out)] if has_fallback else [])
    payload = {
        "machine": info, "device": str(device), "quick": args.quick, "seeds": args.seeds,
        "setup": dataclasses.asdict(setup), "load_average_1min": {"before": load_before, "after": load_after},
        "runs": [{k: v for k, v in r.items() if k != "model"} for r in runs],
        "summary": summary, "fallback": fallback,
        "fallback_note": None if has_fallback else "deqkit.Fallback is not in this deqkit: Anderson and Broyden only",
        "targets": targets(summary, fallback), "plots": plots,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(header(info, "Stability toolkit"))
    print(table(summary))
    for t in payload["targets"]:
        measured = "-" if t["measured"] is None else f"{t['measured']:.4g}"
        print(f"- {t['target']}: {measured} (bound {t['bound']:.4g}): {'met' if t['met'] else 'MISSED'}")
    if not has_fallback:
        print(f"note: {payload['fallback_note']}")
    print(f"\nwrote {args.out / 'results.json'} and {', '.join(str(args.out / p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
