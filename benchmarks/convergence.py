#!/usr/bin/env python3
"""Convergence against cost: deqkit's solvers beside torchdeq 0.1.0's on a problem suite.

For each problem and solver this records the number of f evaluations (NFE) and the wall time
to reach the tolerance (median of repeats, warm-up excluded), the residual trace against NFE
and against seconds over a fixed budget, the time of one f call, and the solver's overhead:
the time the run spent outside f over the time it spent inside f (per iteration, this is
the overhead as a fraction of one f call; both are measured in the same run). torchdeq is run through its own API
(``torchdeq.solver.get_solver``), not through deqkit's adapter.

Timings use one torch thread by default (``--threads``): with torch's default of one thread
per core, a single other busy process makes the solvers' small batched linear algebra (the
Anderson least-squares solve, Broyden's batched products) wait for a descheduled OpenMP
thread, 10-100x slower, while plain iteration is barely touched. The 1-minute load average
before and after the run is written with the results.

``--device cuda`` (or ``cuda:N``) puts every problem, start point, input and solver state on
that GPU. CUDA runs asynchronously, so every clock read synchronises the device first: the
wall time to tolerance is read after ``torch.cuda.synchronize`` at the start and the end of a
solve (nothing inside it, so the solve runs as it would in training). The time inside f needs
a synchronisation before and after every call of f (else it is the time to launch f's kernels),
which stops the host from queueing the solver's next work while f runs; on CUDA those runs are
separate: the overhead column and the traces against seconds come from runs with these
synchronisations (a few microseconds each, and the lost overlap), the "ms to tol" column from
runs without them. On the CPU one set of runs serves both (a synchronisation is a no-op).

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
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit  # noqa: E402
from _device import add_device_option, describe, header, now, resolve  # noqa: E402
from _problems import Problem, suite  # noqa: E402


@dataclasses.dataclass
class Runner:
    """One solver configuration: ``run(problem, tol, max_steps, traced=False, time_f=True)`` ->
    a dict with nfev, wall and in-f seconds, convergence; with ``traced``, also the worst
    sample's residual after each call of f that produced an iterate (``trace``), that call's
    number (``trace_nfev``) and its time since the start (``times``). With ``time_f=False`` the
    calls of f are counted but not timed (``in_f`` is NaN): on CUDA, no synchronisation inside
    the solve."""

    label: str
    library: str  # "deqkit" or "torchdeq"
    run: Callable[..., dict]
    active_set: bool = False


class _Clock:
    """Wraps f: counts calls and records the time at which each call returned.

    On CUDA (``device``) each call is bracketed by two synchronisations, so ``in_f`` is the
    time f's kernels ran, not the time to launch them; ``time_f=False`` leaves them out (the
    calls are still counted, ``in_f`` is NaN and ``times`` are launch times)."""

    def __init__(self, f: Callable, inputs: tuple, device: torch.device = torch.device("cpu"), time_f: bool = True):
        self.f, self.inputs, self.device, self.time_f = f, inputs, device, time_f
        self.times: list[float] = []
        self.in_f = 0.0  # seconds spent inside f
        self.t0 = 0.0

    def start(self) -> None:
        self.times.clear()
        self.in_f = 0.0 if self.time_f else math.nan
        self.t0 = now(self.device)

    def elapsed(self) -> float:
        """Seconds since ``start``, the device's queued work included."""
        return now(self.device) - self.t0

    def __call__(self, z, *inputs):
        if not self.time_f:
            out = self.f(z, *(inputs or self.inputs))
            self.times.append(time.perf_counter() - self.t0)
            return out
        t = now(self.device)
        out = self.f(z, *(inputs or self.inputs))
        t_end = now(self.device)
        self.in_f += t_end - t
        self.times.append(t_end - self.t0)
        return out


class _StepLog:
    """Wraps a deqkit solver: after each step, how many calls of f the run has made so far.

    The loop calls f once on z0 before the first step and once on each new iterate after a
    step, so trace entry k (k >= 1) belongs to call ``calls_after_step[k - 1] + 1``; for a solver
    whose steps call f themselves (NewtonKrylov's Jacobian-vector products) this is what puts
    its trace at the right NFE. Only the fixed-budget runs (the traces) use it.
    """

    def __init__(self, solver: Any, clock: _Clock):
        self.solver, self.clock = solver, clock
        self.calls_after_step: list[int] = []

    def init(self, z, fz, problem):
        return self.solver.init(z, fz, problem)

    def step(self, z, fz, state, problem):
        out = self.solver.step(z, fz, state, problem)
        self.calls_after_step.append(len(self.clock.times))
        return out


def deqkit_runner(label: str, solver: Any, active_set: bool = False) -> Runner:
    def run(problem: Problem, tol: float, max_steps: int, traced: bool = False, time_f: bool = True) -> dict:
        clock = _Clock(problem.f, problem.inputs, problem.z0.device, time_f or traced)
        logged = _StepLog(solver, clock) if traced else solver
        clock.start()
        with torch.no_grad():
            sol = deqkit.fixed_point(
                clock, problem.z0, inputs=problem.inputs, solver=logged, tol=tol, stop_mode="rel",
                max_steps=max_steps, active_set=active_set, throw=False,
            )
        wall = clock.elapsed()
        trace = sol.stats.trace.max(dim=0).values.tolist()  # the batch is done when its worst sample is
        out = {"nfev": sol.stats.nfev, "wall": wall, "in_f": clock.in_f,
               "converged": bool(sol.stats.converged.all()), "sample_evals": sol.stats.sample_evals}
        if traced:
            nfe = [1] + [c + 1 for c in logged.calls_after_step][: len(trace) - 1]
            out.update(trace=trace[: len(nfe)], trace_nfev=nfe, times=[clock.times[n - 1] for n in nfe])
        return out

    return Runner(label, "deqkit", run, active_set)


# torchdeq 0.1.0 calls f before its loop without recording a residual (anderson: twice, to
# seed its memory; broyden: once, for g(z0)), then once per iteration with a trace entry; the
# first entry of its trace is a placeholder (1e8), not a residual.
_TORCHDEQ_CALLS_BEFORE_TRACE = {"fixed_point_iter": 0, "broyden": 1, "anderson": 2}


def torchdeq_runner(label: str, name: str, **kwargs: Any) -> Runner:
    def run(problem: Problem, tol: float, max_steps: int, traced: bool = False, time_f: bool = True) -> dict:
        from torchdeq.solver import get_solver

        solver = get_solver(name)
        clock = _Clock(problem.f, problem.inputs, problem.z0.device, time_f or traced)
        clock.start()
        with torch.no_grad():
            _, _, info = solver(lambda z: clock(z), problem.z0, max_iter=max_steps, tol=tol, stop_mode="rel", **kwargs)
        wall = clock.elapsed()
        nfev = len(clock.times)
        converged = bool((info["rel_lowest"] <= tol).all())
        out = {"nfev": nfev, "wall": wall, "in_f": clock.in_f,
               "converged": converged, "sample_evals": nfev * problem.z0.shape[0]}
        if traced:
            before = _TORCHDEQ_CALLS_BEFORE_TRACE[name]
            # entries 1.. are the residuals of calls before+1 .. nfev (later ones pad a converged run)
            trace = info["rel_trace"].max(dim=0).values[1: 1 + nfev - before].tolist()
            nfe = list(range(before + 1, before + 1 + len(trace)))
            out.update(trace=trace, trace_nfev=nfe, times=[clock.times[n - 1] for n in nfe])
        return out

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
    device = problem.z0.device
    with torch.no_grad():
        problem.f(problem.z0, *problem.inputs)
        times = []
        for _ in range(max(repeats, 3)):
            t = now(device)
            problem.f(problem.z0, *problem.inputs)
            times.append(now(device) - t)
    return statistics.median(times)


def within_budget(traces: dict, budget: int) -> dict:
    """The traces up to ``budget`` evaluations of f: the same budget for every solver (a
    solver whose steps call f several times, as NewtonKrylov's do, runs past it in its
    fixed-budget run, which counts steps)."""
    keep = sum(1 for n in traces["trace_nfev"] if n <= budget)
    return {k: v[:keep] for k, v in traces.items()}


def bench(problem: Problem, runner: Runner, tol: float, repeats: int, t_f: float) -> dict:
    runner.run(problem, tol, problem.budget)  # warm-up
    runs = [runner.run(problem, tol, problem.budget) for _ in range(repeats)]
    if problem.z0.device.type == "cuda":  # wall times from solves with no synchronisation inside
        walls = [runner.run(problem, tol, problem.budget, time_f=False)["wall"] for _ in range(repeats)]
    else:  # a synchronisation is a no-op: the same runs serve both
        walls = [r["wall"] for r in runs]
    to_tol = runs[0]
    budget = runner.run(problem, 1e-12, problem.budget, traced=True)  # fixed budget, for the traces
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
        "budget_nfe": problem.budget,
        **within_budget({"trace_nfev": budget["trace_nfev"], "trace_residual": budget["trace"],
                         "trace_seconds": budget["times"]}, problem.budget),
    }


def _label(r: dict) -> str:
    return r["solver"] + (" (active set)" if r["active_set"] else "")


PLOTS = (  # x key, x label, file, what the figure shows
    ("trace_nfev", "f evaluations (NFE)", "residual_vs_nfe.png", "against f evaluations"),
    ("trace_seconds", "wall time since the solve started (s, log scale)", "residual_vs_seconds.png", "against wall time"),
)


def figure(results: list[dict], problems: list[Problem], x_key: str, x_label: str, what: str):
    """One panel per problem, one line per solver; a solver keeps its colour in every panel
    (deqkit solid, torchdeq dashed, active set dotted with markers), and one legend, in a cell
    of its own, names every line of every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tol = results[0]["tol"]
    colour = {b: plt.cm.tab10(i % 10) for i, b in enumerate(dict.fromkeys(r["solver"] for r in results))}

    def style(r: dict) -> dict:
        if r["active_set"]:
            return {"color": colour[r["solver"]], "ls": ":", "marker": ".", "markevery": 5, "lw": 1.6}
        return {"color": colour[r["solver"]], "ls": "-" if r["library"] == "deqkit" else "--", "lw": 1.3}

    cols = min(3, len(problems) + 1)
    rows = math.ceil((len(problems) + 1) / cols)  # + 1: a cell for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    handles: dict[str, Line2D] = {}
    for ax, problem in zip(axes.flat, problems):
        for r in results:
            if r["problem"] != problem.name:
                continue
            n = min(len(r[x_key]), len(r["trace_residual"]))
            (line,) = ax.semilogy(r[x_key][:n], r["trace_residual"][:n], **style(r))
            handles.setdefault(_label(r), line)
        ax.axhline(tol, color="grey", lw=0.8, ls=":")
        if x_key == "trace_seconds":  # solvers differ by orders of magnitude in time per step
            ax.set_xscale("log")
        ax.set_title(f"{problem.name}: {problem.description}", fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_ylabel("relative residual, worst sample")
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(problems):]
    for ax in spare:
        ax.axis("off")
    handles[f"tolerance ({tol:g})"] = Line2D([], [], color="grey", lw=0.8, ls=":")
    spare[0].legend(handles.values(), handles.keys(), loc="center", fontsize=8, frameon=False,
                    title="solid: deqkit, dashed: torchdeq 0.1.0", title_fontsize=8)
    fig.suptitle(f"Residual {what}: max over the batch of ||f(z) - z|| / ||f(z)||, same budget of f evaluations per problem",
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot(results: list[dict], problems: list[Problem], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    files = []
    for x_key, x_label, fname, what in PLOTS:
        fig = figure(results, problems, x_key, x_label, what)
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def table(results: list[dict], machine: dict | None = None) -> str:
    """The markdown table, under a line naming the device (``machine``: results.json's)."""
    lines = [header(machine, "convergence") + "\n"] if machine else []
    lines += ["| problem | solver | NFE to tol | ms to tol | time outside f / time in f |", "|---|---|---|---|---|"]
    for r in results:
        label = _label(r)
        nfe = r["nfev_to_tol"] if r["nfev_to_tol"] is not None else "not reached"
        ms = f"{1e3 * r['seconds_to_tol']:.1f}" if r["seconds_to_tol"] is not None else "-"
        ov = f"{100 * r['overhead_per_iter']:.1f}%"
        lines.append(f"| {r['problem']} | {label} | {nfe} | {ms} | {ov} |")
    return "\n".join(lines)


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset, for smoke tests (well under a minute)")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"), help="output folder")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per run (default 3 quick, 5 full)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; 0: torch's choice, one per core). With more than one, "
                             "any other busy process on the machine can slow the solvers' small batched ops 10-100x "
                             "(docs/benchmarks.md, 'Timing on a shared machine')")
    parser.add_argument("--only", nargs="*", default=None, help="problem names to run (default all)")
    parser.add_argument("--replot", action="store_true",
                        help="redraw the plots from OUT/results.json (of the same --quick/--only/--get-checkpoint) without measuring")
    parser.add_argument("--get-checkpoint", default=None,
                        help="a GET-T/2 training checkpoint (examples/get_distillation train): adds the trained equilibrium function")
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = resolve(parser, args.device)
    if args.tol <= 0:
        parser.error(f"--tol must be > 0, got {args.tol}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    try:
        import torchdeq  # noqa: F401

        have_torchdeq = True
    except ImportError:
        have_torchdeq = False
        print("torchdeq is not installed (pip install 'deqkit[torchdeq]'); running deqkit only", file=sys.stderr)

    every = suite(args.quick, args.get_checkpoint, device)
    problems = [p for p in every if p.name in args.only] if args.only else every
    if not problems:
        parser.error(f"--only matched no problem; names: {[p.name for p in every]}")
    if args.replot:
        payload = json.loads((args.out / "results.json").read_text())
        budgets = {p.name: p.budget for p in problems}
        for r in payload["results"]:
            r.update(within_budget({k: r[k] for k in ("trace_nfev", "trace_residual", "trace_seconds")}, budgets[r["problem"]]))
            r["budget_nfe"] = budgets[r["problem"]]
        payload["plots"] = plot(payload["results"], [p for p in problems if p.name in budgets], args.out)
        (args.out / "results.json").write_text(json.dumps(payload, indent=1))
        print(f"redrew {', '.join(str(args.out / p) for p in payload['plots'])} from {args.out / 'results.json'}")
        return 0
    load_before = _load()
    if load_before is not None and load_before > 0.5:
        print(f"warning: the 1-minute load average is {load_before:.2f}: other processes are using the CPUs, "
              "so wall times will be inflated (NFE counts are not affected)", file=sys.stderr)
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

    machine = describe(device)
    payload = {
        "device": str(device),
        "machine": machine,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tol": args.tol,
        "stop_mode": "rel",
        "repeats": repeats,
        "load_average_1min": {"before": load_before, "after": _load()},
        "problems": [{"name": p.name, "description": p.description, "f_seconds": f_times[p.name]} for p in problems],
        "results": results,
    }
    payload["plots"] = plot(results, problems, args.out)
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(table(results, machine))
    print(f"\nwrote {args.out / 'results.json'} and {', '.join(str(args.out / p) for p in payload['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
