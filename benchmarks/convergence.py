#!/usr/bin/env python3
"""Convergence against cost: deqkit's solvers beside torchdeq 0.1.0's on a problem suite.

For each problem and solver this records the number of f evaluations (NFE) and the wall time
to reach the tolerance (median of repeats, warm-up excluded), the residual trace against NFE
and against seconds over a fixed budget, the time of one f call, and the solver's overhead:
the time the run spent outside f over the time it spent inside f (per iteration, this is
the overhead as a fraction of one f call; both are measured in the same run). torchdeq is run through its own API
(``torchdeq.solver.get_solver``), not through deqkit's adapter.

Writes OUT/results.json, OUT/residual_vs_nfe.png, OUT/residual_vs_seconds.png and prints a
markdown table.

    python benchmarks/convergence.py --quick --out runs/bench-quick
    python benchmarks/convergence.py --out runs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit  # noqa: E402
from _problems import Problem, suite  # noqa: E402


@dataclasses.dataclass
class Runner:
    """One solver configuration: ``run(problem, tol, max_steps)`` -> (nfev, trace, times)."""

    label: str
    library: str  # "deqkit" or "torchdeq"
    run: Callable[..., dict]
    active_set: bool = False


class _Clock:
    """Wraps f: counts calls and records the time at which each call returned."""

    def __init__(self, f: Callable, inputs: tuple):
        self.f, self.inputs = f, inputs
        self.times: list[float] = []
        self.in_f = 0.0  # seconds spent inside f
        self.t0 = 0.0

    def start(self) -> None:
        self.times.clear()
        self.in_f = 0.0
        self.t0 = time.perf_counter()

    def __call__(self, z, *inputs):
        t = time.perf_counter()
        out = self.f(z, *(inputs or self.inputs))
        now = time.perf_counter()
        self.in_f += now - t
        self.times.append(now - self.t0)
        return out


def deqkit_runner(label: str, solver: Any, active_set: bool = False) -> Runner:
    def run(problem: Problem, tol: float, max_steps: int) -> dict:
        clock = _Clock(problem.f, problem.inputs)
        clock.start()
        with torch.no_grad():
            sol = deqkit.fixed_point(
                clock, problem.z0, inputs=problem.inputs, solver=solver, tol=tol, stop_mode="rel",
                max_steps=max_steps, active_set=active_set, throw=False,
            )
        wall = time.perf_counter() - clock.t0
        trace = sol.stats.trace.max(dim=0).values  # the batch is done when its worst sample is
        return {"nfev": sol.stats.nfev, "wall": wall, "in_f": clock.in_f, "trace": trace.tolist(), "times": clock.times[: len(trace)],
                "converged": bool(sol.stats.converged.all()), "sample_evals": sol.stats.sample_evals}

    return Runner(label, "deqkit", run, active_set)


def torchdeq_runner(label: str, name: str, **kwargs: Any) -> Runner:
    def run(problem: Problem, tol: float, max_steps: int) -> dict:
        from torchdeq.solver import get_solver

        solver = get_solver(name)
        clock = _Clock(problem.f, problem.inputs)
        clock.start()
        with torch.no_grad():
            _, _, info = solver(lambda z: clock(z), problem.z0, max_iter=max_steps, tol=tol, stop_mode="rel", **kwargs)
        wall = time.perf_counter() - clock.t0
        nfev = len(clock.times)
        trace = info["rel_trace"].max(dim=0).values[: nfev]
        converged = bool((info["rel_lowest"] <= tol).all())
        return {"nfev": nfev, "wall": wall, "in_f": clock.in_f, "trace": trace.tolist(), "times": clock.times[: len(trace)],
                "converged": converged, "sample_evals": nfev * problem.z0.shape[0]}

    return Runner(label, "torchdeq", run)


def runners(quick: bool, have_torchdeq: bool) -> list[Runner]:
    out = [
        deqkit_runner("deqkit FixedPoint", deqkit.FixedPoint()),
        deqkit_runner("deqkit Anderson(m=5)", deqkit.Anderson(m=5)),
        deqkit_runner("deqkit Broyden(memory=20)", deqkit.Broyden(memory=20)),
    ]
    if not quick:
        out.append(deqkit_runner("deqkit NewtonKrylov", deqkit.NewtonKrylov(krylov_dim=10)))
    if have_torchdeq:
        out += [
            torchdeq_runner("torchdeq fixed_point_iter", "fixed_point_iter"),
            torchdeq_runner("torchdeq anderson(m=5)", "anderson", m=5),
            torchdeq_runner("torchdeq broyden", "broyden"),
        ]
    return out


def time_f(problem: Problem, repeats: int) -> float:
    with torch.no_grad():
        problem.f(problem.z0, *problem.inputs)
        times = []
        for _ in range(max(repeats, 3)):
            t = time.perf_counter()
            problem.f(problem.z0, *problem.inputs)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(problem: Problem, runner: Runner, tol: float, repeats: int, t_f: float) -> dict:
    runner.run(problem, tol, problem.budget)  # warm-up
    runs = [runner.run(problem, tol, problem.budget) for _ in range(repeats)]
    to_tol = runs[0]
    walls = [r["wall"] for r in runs]
    budget = runner.run(problem, 1e-12, problem.budget)  # fixed budget, for the traces
    # Overhead: the run's time outside f over its time inside f (both measured in the same run).
    overhead = statistics.median((r["wall"] - r["in_f"]) / r["in_f"] for r in runs)
    return {
        "problem": problem.name,
        "solver": runner.label,
        "library": runner.library,
        "active_set": runner.active_set,
        "tol": tol,
        "converged": to_tol["converged"],
        "nfev_to_tol": to_tol["nfev"] if to_tol["converged"] else None,
        "seconds_to_tol": statistics.median(walls) if to_tol["converged"] else None,
        "seconds_all": walls,
        "sample_evals": to_tol["sample_evals"],
        "f_seconds": t_f,
        "overhead_per_iter": overhead,
        "trace_nfev": list(range(1, len(budget["trace"]) + 1)),
        "trace_residual": budget["trace"],
        "trace_seconds": budget["times"],
    }


def plot(results: list[dict], problems: list[Problem], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for x_key, x_label, fname in (("trace_nfev", "f evaluations", "residual_vs_nfe.png"),
                                  ("trace_seconds", "seconds", "residual_vs_seconds.png")):
        cols = min(3, len(problems))
        rows = math.ceil(len(problems) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
        for ax, problem in zip(axes.flat, problems):
            for r in results:
                if r["problem"] != problem.name:
                    continue
                style = "-" if r["library"] == "deqkit" else "--"
                label = r["solver"] + (" (active set)" if r["active_set"] else "")
                n = min(len(r[x_key]), len(r["trace_residual"]))
                ax.semilogy(r[x_key][:n], r["trace_residual"][:n], style, label=label)
            ax.axhline(results[0]["tol"], color="grey", lw=0.8, ls=":")
            ax.set_title(problem.name)
            ax.set_xlabel(x_label)
            ax.set_ylabel("max relative residual")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(problems):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def table(results: list[dict]) -> str:
    lines = ["| problem | solver | NFE to tol | ms to tol | time outside f / time in f |", "|---|---|---|---|---|"]
    for r in results:
        label = r["solver"] + (" (active set)" if r["active_set"] else "")
        nfe = r["nfev_to_tol"] if r["nfev_to_tol"] is not None else "not reached"
        ms = f"{1e3 * r['seconds_to_tol']:.1f}" if r["seconds_to_tol"] is not None else "-"
        ov = f"{100 * r['overhead_per_iter']:.1f}%"
        lines.append(f"| {r['problem']} | {label} | {nfe} | {ms} | {ov} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset, for smoke tests (well under a minute)")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"), help="output folder")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per run (default 1 quick, 5 full)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", nargs="*", default=None, help="problem names to run (default all)")
    parser.add_argument("--get-checkpoint", default=None,
                        help="a GET-T/2 training checkpoint (examples/get_distillation train): adds the trained equilibrium function")
    args = parser.parse_args(argv)
    if args.tol <= 0:
        parser.error(f"--tol must be > 0, got {args.tol}")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    try:
        import torchdeq  # noqa: F401

        have_torchdeq = True
    except ImportError:
        have_torchdeq = False
        print("torchdeq is not installed (pip install 'deqkit[torchdeq]'); running deqkit only", file=sys.stderr)

    every = suite(args.quick, args.get_checkpoint)
    problems = [p for p in every if p.name in args.only] if args.only else every
    if not problems:
        parser.error(f"--only matched no problem; names: {[p.name for p in every]}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    jobs = []
    for problem in problems:
        rs = runners(args.quick, have_torchdeq)
        if not problem.coupled and problem.name == "heterogeneous":
            rs += [deqkit_runner("deqkit FixedPoint", deqkit.FixedPoint(), active_set=True),
                   deqkit_runner("deqkit Anderson(m=5)", deqkit.Anderson(m=5), active_set=True)]
        jobs += [(problem, r) for r in rs]
    f_times = {p.name: time_f(p, repeats) for p in problems}
    for problem, runner in tqdm(jobs, desc="convergence", unit="run"):
        results.append(bench(problem, runner, args.tol, repeats, f_times[problem.name]))

    payload = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tol": args.tol,
        "stop_mode": "rel",
        "repeats": repeats,
        "problems": [{"name": p.name, "description": p.description, "f_seconds": f_times[p.name]} for p in problems],
        "results": results,
    }
    payload["plots"] = plot(results, problems, args.out)
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(table(results))
    print(f"\nwrote {args.out / 'results.json'} and {', '.join(str(args.out / p) for p in payload['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
