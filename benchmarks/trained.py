#!/usr/bin/env python3
"""Solvers on trained DEQs: NFE and wall time to a relative residual of 1e-3 and of 1e-4.

The maps (benchmarks/_trained_maps.py):

- ``digits_mlp``: an implicit MLP classifier with a weight-normed cell, trained on the
  bundled 8x8 digits with ``Implicit`` backward and ``jacobian_reg``;
- ``mdeq_conv_trained``: the MDEQ-style conv cell of ``_problems.py`` (``mdeq_conv``) after
  about a minute of the same training, on the digits upsampled to 16x16;
- ``get_student``: the GET distillation demo's student (GET-Tiny/4 by default) when its
  checkpoint exists (``--get-student``; skipped with a note when the default one is absent).

The two classifiers are trained once and cached under ``OUT/checkpoints`` (reused on rerun
when their settings match; ``--retrain`` trains them again); their test accuracy is reported.
Every solver runs through convergence.py's runners (deqkit's solvers; torchdeq 0.1.0's through
its own API) from z0 = 0 (GET: the demo's Gaussian start) with a budget of 100 steps (10 with --quick): NFE and
wall time to each tolerance (median of ``--repeats`` timed runs after a warm-up), and the
residual after every call of f over the whole budget, drawn against NFE, one figure per map.
Timings use one torch thread by default; the 1-minute load average before and after is
recorded. Writes OUT/results.json, OUT/<map>_residual_vs_nfe.png and prints a markdown table.

    python benchmarks/trained.py --quick --out runs/trained-quick
    python benchmarks/trained.py --out runs/trained
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit  # noqa: E402
import _trained_maps as maps  # noqa: E402
from _problems import Problem  # noqa: E402
from convergence import Runner, _load, bench, runners, time_f  # noqa: E402

TOLERANCES = (1e-3, 1e-4)
BUDGET = {False: 100, True: 10}  # max steps per solve, by --quick
DEFAULT_GET_STUDENT = Path("runs/demo/GET-Tiny_4/checkpoint.pt")  # where the demo writes its GET student
GET_BATCH = {False: 4, True: 2}  # by --quick


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/trained"), help="output folder (default runs/trained)")
    parser.add_argument("--quick", action="store_true", help="tiny models and one timed run: a smoke test of seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per solve (default 5; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for training and timing (default 1; 0: torch's choice). More "
                             "than one makes timings fragile on a shared machine (docs/benchmarks.md)")
    parser.add_argument("--device", default="cpu", help="torch device of every model and tensor (default cpu)")
    parser.add_argument("--retrain", action="store_true", help="train the classifiers again even if OUT/checkpoints has them")
    parser.add_argument("--get-student", type=Path, default=None,
                        help=f"a GET student checkpoint of examples/get_distillation (default {DEFAULT_GET_STUDENT}, "
                             "the demo's; skipped with a note when that is absent)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    try:
        args.device = torch.device(args.device)
        torch.zeros(1, device=args.device)
    except (RuntimeError, AssertionError) as exc:
        parser.error(f"--device {args.device!s} is not usable here: {str(exc).splitlines()[0]}")
    if args.get_student is not None and not args.get_student.is_file():
        parser.error(f"--get-student: no checkpoint file at {str(args.get_student)!r}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} exists and is not a folder")
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def synchronised(problem: Problem) -> Problem:
    """On CUDA, f waits for its kernels before returning, so per-call and per-solve times are
    those of finished work, not of queued kernels."""
    if problem.z0.device.type != "cuda":
        return problem
    f = problem.f

    def f_synced(z, *inputs):
        out = f(z, *inputs)
        torch.cuda.synchronize(z.device)
        return out

    return dataclasses.replace(problem, f=f_synced)


def spectral_radius_at_solution(problem: Problem) -> float:
    """The largest spectral radius of J_f over the batch, at the point Anderson reaches (1e-5 or
    twice the budget)."""
    with torch.no_grad():
        z = deqkit.fixed_point(problem.f, problem.z0, inputs=problem.inputs, solver=deqkit.Anderson(m=5), tol=1e-5,
                               max_steps=2 * problem.budget, throw=False).value
    radius = deqkit.spectral_radius(lambda z: problem.f(z, *problem.inputs), z, n_iters=20, seed=0)
    return float(radius.max())


def build_maps(args: argparse.Namespace, progress: Callable[..., Any], log: Callable[[str], None]) -> tuple[list[Problem], dict]:
    """The trained maps and what is known about each (training record, checkpoint)."""
    problems, info = [], {}
    specs = maps.QUICK_SPECS if args.quick else maps.SPECS
    for name, spec in specs.items():
        model, record = maps.trained_classifier(name, spec, args.out / "checkpoints", args.device, args.retrain, progress, log)
        problems.append(maps.classifier_problem(name, model, BUDGET[args.quick]))
        info[name] = record
    path = args.get_student or DEFAULT_GET_STUDENT
    if path.is_file():
        problem, info["get_student"] = maps.get_student(path, GET_BATCH[args.quick], BUDGET[args.quick], args.device)
        problems.append(problem)
    else:
        log(f"note: get_student skipped: no GET student checkpoint at {path} (the full demo, "
            "`python -m examples.get_distillation demo`, writes one there; or pass --get-student PATH)")
    return [synchronised(p) for p in problems], info


def measure_one(problem: Problem, runner: Runner, tol: float, repeats: int, f_seconds: float) -> dict:
    """convergence.py's measurement (warm-up, timed runs, one traced run over the budget), or,
    where the solver raises (torchdeq's anderson can meet a singular least-squares system on
    a trained map), a record of its error: no NFE, no time, no trace."""
    try:
        return {**bench(problem, runner, tol, repeats, f_seconds), "error": None}
    except RuntimeError as exc:
        kind = type(exc).__name__.lstrip("_")  # torch.linalg.LinAlgError's class is _LinAlgError
        error = f"{kind}: {str(exc).splitlines()[0]}"
        print(f"\n{runner.label} failed on {problem.name} at tol {tol:g}: {error}", file=sys.stderr)
        return {"problem": problem.name, "solver": runner.label, "library": runner.library, "active_set": False,
                "tol": tol, "converged": False, "nfev_to_tol": None, "seconds_to_tol": None, "f_seconds": f_seconds,
                "budget_nfe": problem.budget, "trace_nfev": [], "trace_residual": [], "trace_seconds": [], "error": error}


def measure(problems: list[Problem], solvers: list[Runner], repeats: int, progress: Callable[..., Any]) -> list[dict]:
    """Every map x solver x tolerance."""
    jobs = [(p, r, tol) for p in problems for r in solvers for tol in TOLERANCES]
    f_seconds = {p.name: time_f(p, repeats) for p in problems}
    return [measure_one(p, r, tol, repeats, f_seconds[p.name]) for p, r, tol in progress(jobs, desc="solves", unit="run")]


def figure(results: list[dict], problem: Problem):
    """Worst-sample residual against NFE over the budget, one line per solver (deqkit solid,
    torchdeq dashed), both tolerances marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    traced = [r for r in results if r["problem"] == problem.name and r["tol"] == TOLERANCES[-1]]
    for i, r in enumerate(traced):
        label = r["solver"] + (" (raised an error: no trace)" if r["error"] else "")
        ax.semilogy(r["trace_nfev"], r["trace_residual"], color=plt.cm.tab10(i % 10),
                    ls="-" if r["library"] == "deqkit" else "--", lw=1.4, label=label)
    for tol, ls in zip(TOLERANCES, (":", "-.")):
        ax.axhline(tol, color="grey", lw=0.8, ls=ls, label=f"tolerance {tol:g}")
    ax.set_title(f"Residual against f evaluations, trained map {problem.name}:\n{problem.description}", fontsize=9)
    ax.set_xlabel("f evaluations (NFE)")
    ax.set_ylabel("relative residual ||f(z) - z|| / ||f(z)||, worst sample")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="solid: deqkit, dashed: torchdeq 0.1.0", title_fontsize=8,
              loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def plot(results: list[dict], problem: Problem, out: Path) -> str:
    import matplotlib.pyplot as plt

    fig = figure(results, problem)
    name = f"{problem.name}_residual_vs_nfe.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def table(results: list[dict]) -> str:
    def cell(r: dict) -> tuple[str, str]:
        if r["error"]:
            return f"error ({r['error'].split(':')[0]})", "-"
        if r["nfev_to_tol"] is None:
            return "not reached", "-"
        return str(r["nfev_to_tol"]), f"{1e3 * r['seconds_to_tol']:.1f}"

    heads = " | ".join(f"NFE to {t:g} | ms to {t:g}" for t in TOLERANCES)
    lines = [f"| map | solver | {heads} |", "|---|---|" + "---|---|" * len(TOLERANCES)]
    rows: dict[tuple[str, str], dict[float, dict]] = {}
    for r in results:
        rows.setdefault((r["problem"], r["solver"]), {})[r["tol"]] = r
    for (problem, solver), by_tol in rows.items():
        cells = " | ".join(" | ".join(cell(by_tol[t])) for t in TOLERANCES)
        lines.append(f"| {problem} | {solver} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from tqdm import tqdm as progress
    except ImportError:  # pragma: no cover
        def progress(x, **_):
            return x
    try:
        import torchdeq  # noqa: F401

        have_torchdeq = True
    except ImportError:
        have_torchdeq = False
        print("torchdeq is not installed (pip install 'deqkit[torchdeq]'); running deqkit only", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    problems, info = build_maps(args, progress, print)
    load_before = _load()
    if load_before is not None and load_before > 0.5:
        print(f"warning: the 1-minute load average is {load_before:.2f}: other processes are using the CPUs, "
              "so wall times will be inflated (NFE counts are not affected)", file=sys.stderr)
    results = measure(problems, runners(quick=False, have_torchdeq=have_torchdeq), args.repeats, progress)
    load_after = _load()
    for p in problems:
        f_seconds = next(r["f_seconds"] for r in results if r["problem"] == p.name)
        info[p.name].update(name=p.name, description=p.description, f_seconds=f_seconds,
                            spectral_radius=spectral_radius_at_solution(p))
    payload = {
        "torch": torch.__version__,
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "tolerances": list(TOLERANCES),
        "stop_mode": "rel",
        "max_steps": BUDGET[args.quick],
        "repeats": args.repeats,
        "quick": args.quick,
        "load_average_1min": {"before": load_before, "after": load_after},
        "maps": [info[p.name] for p in problems],
        "results": results,
        "plots": [plot(results, p, args.out) for p in problems],
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    for m in payload["maps"]:
        trained = f", test accuracy {m['test_accuracy']:.3f}" if "test_accuracy" in m else ""
        print(f"{m['name']}: {m['description']}; one f call {1e3 * m['f_seconds']:.2f} ms, "
              f"spectral radius at the solution {m['spectral_radius']:.3f}{trained}")
    print(table(results))
    print(f"\nwrote {args.out / 'results.json'} and {', '.join(str(args.out / p) for p in payload['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
