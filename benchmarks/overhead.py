#!/usr/bin/env python3
"""Solver cost against its limit (NFE x the cost of f), checked against the targets of
docs/benchmarks.md: per-iteration overhead outside f, the active set on a mixed batch, and
Anderson's NFE against torchdeq's.

1. Overhead: 30 fixed iterations (deqkit ``tol=None``; torchdeq ``tol=1e-30``) of
   ``z = tanh(W z + c)`` with ||W||_2 = 0.9 on a cheap map (d = 256, B = 32) and a costlier one
   (d = 1024, B = 64), each solver of both libraries; the time outside f per call of f, over
   the time of one call (both measured in the same run, the median over repeats; the runs of
   the two libraries are interleaved so that drift in the machine's speed hits both). deqkit
   also runs with ``check_every=5`` (convergence, the loop's one wait for the device, tested
   every 5th iteration).
2. Active set: a mixed batch (28 samples contracting fast, 4 slow), solved to 1e-4 with and
   without ``active_set``, on a cheap map (one token per sample) and on one whose cost grows
   with the samples evaluated (64 tokens per sample).
3. Anderson's NFE to 1e-4 against torchdeq's on the convergence suite (GET-T at
   initialisation excepted: neither library converges on it, see convergence.py).

Writes OUT/results.json (every figure, the machine, the load average) and OUT/overhead.png,
and prints the targets table (met or missed).

    python benchmarks/overhead.py --out runs/bench-overhead
    python benchmarks/overhead.py --quick --out runs/bench-overhead-quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit  # noqa: E402
from _problems import Problem, heterogeneous, linear_ill, mdeq_conv, tanh_layer  # noqa: E402
from _device import add_device_option, describe, header, resolve  # noqa: E402
from convergence import Runner, _Clock, _load, deqkit_runner, torchdeq_runner  # noqa: E402

ITERATIONS = 30
SOLVERS = (  # label, deqkit solver, torchdeq name and options
    ("FixedPoint", deqkit.FixedPoint(), "fixed_point_iter", {}),
    ("Anderson(m=5)", deqkit.Anderson(m=5), "anderson", {"m": 5}),
    ("Broyden", deqkit.Broyden(), "broyden", {}),
)
# overhead per call of f, as a fraction of one call: at most this fraction of torchdeq's ...
RATIO_TO_TORCHDEQ = 0.5
# ... and, on the costlier map, at most this fraction of f
OF_F = {"FixedPoint": 0.05, "Anderson(m=5)": 0.25}
ACTIVE_SET_RATIO = 0.5
CHECK_EVERY = 5  # the sparse-test variant: convergence tested every 5th iteration


def sparse_runner(label: str, solver: Any, every: int) -> Runner:
    """deqkit with ``check_every=every`` (30 fixed iterations: the last is always tested)."""
    def run(problem: Problem, tol: float | None, max_steps: int, traced: bool = False) -> dict:
        clock = _Clock(problem.f, problem.inputs, problem.z0.device)
        clock.start()
        with torch.no_grad():
            sol = deqkit.fixed_point(clock, problem.z0, inputs=problem.inputs, solver=solver, tol=None,
                                     max_steps=max_steps, check_every=every, throw=False)
        return {"nfev": sol.stats.nfev, "wall": clock.elapsed(), "in_f": clock.in_f}

    return Runner(label, "deqkit", run)


def tanh_map(dim: int, batch: int, device: torch.device, seed: int = 0) -> Problem:
    """``z = tanh(W z + c)``, ||W||_2 = 0.9, with the injection ``c`` computed once."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g)
    w = (w * (0.9 / torch.linalg.matrix_norm(w, ord=2))).to(device)
    c = (0.3 * torch.randn(batch, dim, generator=g)).to(device)

    def f(z, c):
        return torch.tanh(z @ w.T + c)

    return Problem(f"tanh_d{dim}_b{batch}", f"tanh(Wz + c), ||W||=0.9, d={dim}, B={batch}", f,
                   torch.zeros(batch, dim, device=device), (c,), budget=ITERATIONS)


def overhead(problem: Problem, repeats: int, have_torchdeq: bool) -> list[dict]:
    """Per solver and library: the time outside f per call of f, in seconds and over one call."""
    runners = []
    for label, solver, name, kwargs in SOLVERS:
        runners.append((label, "deqkit", deqkit_runner(label, solver), None))
        runners.append((label, f"deqkit check_every={CHECK_EVERY}", sparse_runner(label, solver, CHECK_EVERY), None))
        if have_torchdeq:
            runners.append((label, "torchdeq", torchdeq_runner(label, name, **kwargs), 1e-30))
    samples: dict[tuple[str, str], list[dict]] = {(r[0], r[1]): [] for r in runners}
    for repeat in range(repeats + 1):  # the first round warms up
        for label, library, runner, tol in runners:
            out = runner.run(problem, tol, ITERATIONS)
            if repeat:
                samples[(label, library)].append(out)
    rows = []
    for (label, library), runs in samples.items():
        outside = [(r["wall"] - r["in_f"]) / r["nfev"] for r in runs]
        per_call = [r["in_f"] / r["nfev"] for r in runs]
        rows.append({
            "map": problem.name, "solver": label, "library": library, "nfev": runs[0]["nfev"],
            "outside_f_seconds": statistics.median(outside), "outside_f_spread": [min(outside), max(outside)],
            "f_seconds": statistics.median(per_call),
            "overhead": statistics.median(o / p for o, p in zip(outside, per_call)),
        })
    return rows


def active_set(problem: Problem, repeats: int) -> list[dict]:
    rows = []
    for label, solver in (("FixedPoint", deqkit.FixedPoint()), ("Anderson(m=5)", deqkit.Anderson(m=5))):
        times: dict[bool, list[float]] = {False: [], True: []}
        evals = {}
        for repeat in range(repeats + 1):
            for on in (False, True):
                out = deqkit_runner(label, solver, active_set=on).run(problem, 1e-4, 300)
                if repeat:
                    times[on].append(out["wall"])
                evals[on] = out["sample_evals"]
        whole, active = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"map": problem.description, "solver": label, "whole_seconds": whole, "active_seconds": active,
                     "ratio": active / whole, "sample_evals": [evals[False], evals[True]]})
    return rows


def nfe(problems: list[Problem], have_torchdeq: bool) -> list[dict]:
    rows = []
    for problem in problems:
        ours = deqkit_runner("Anderson(m=5)", deqkit.Anderson(m=5)).run(problem, 1e-4, problem.budget)
        row = {"problem": problem.name, "deqkit": ours["nfev"] if ours["converged"] else None}
        if have_torchdeq:
            theirs = torchdeq_runner("anderson", "anderson", m=5).run(problem, 1e-4, problem.budget)
            row["torchdeq"] = theirs["nfev"] if theirs["converged"] else None
        rows.append(row)
    return rows


def targets(over: list[dict], act: list[dict], nfes: list[dict]) -> list[dict]:
    """Each target with its measurement and whether it is met."""
    out = []
    by = {(r["map"], r["solver"], r["library"]): r for r in over}
    maps = sorted({r["map"] for r in over}, key=lambda m: by[(m, "FixedPoint", "deqkit")]["f_seconds"])
    for m in maps:
        for label, *_ in SOLVERS:
            ours, theirs = by[(m, label, "deqkit")], by.get((m, label, "torchdeq"))
            if theirs is not None:
                ratio = ours["outside_f_seconds"] / theirs["outside_f_seconds"]
                out.append({"target": f"{m}, {label}: overhead <= {RATIO_TO_TORCHDEQ}x torchdeq's",
                            "measured": f"{100 * ours['overhead']:.0f}% vs {100 * theirs['overhead']:.0f}% of f: {ratio:.2f}x",
                            "met": ratio <= RATIO_TO_TORCHDEQ})
            if m == maps[-1] and label in OF_F:
                sparse = by[(m, label, f"deqkit check_every={CHECK_EVERY}")]
                out.append({"target": f"{m}, {label}: overhead <= {100 * OF_F[label]:.0f}% of f",
                            "measured": f"{100 * ours['overhead']:.1f}% ({1e6 * ours['outside_f_seconds']:.0f} us of "
                                        f"{1e6 * ours['f_seconds']:.0f} us); with check_every={CHECK_EVERY}: "
                                        f"{100 * sparse['overhead']:.1f}%",
                            "met": ours["overhead"] <= OF_F[label]})
    for r in act:
        out.append({"target": f"active set, {r['solver']}, {r['map']}: <= {ACTIVE_SET_RATIO}x whole batch",
                    "measured": f"{r['ratio']:.2f}x ({1e3 * r['active_seconds']:.1f} vs {1e3 * r['whole_seconds']:.1f} ms)",
                    "met": r["ratio"] <= ACTIVE_SET_RATIO})
    for r in nfes:
        if "torchdeq" not in r:
            continue
        ours, theirs = r["deqkit"], r["torchdeq"]
        met = None if ours is None and theirs is None else (ours is not None and (theirs is None or ours <= theirs))
        out.append({"target": f"{r['problem']}: Anderson NFE to 1e-4 <= torchdeq's",
                    "measured": f"{ours or 'not reached'} vs {theirs or 'not reached'}", "met": met})
    return out


def table(rows: list[dict]) -> str:
    mark = {True: "met", False: "**missed**", None: "n/a (neither converges)"}
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['measured']} | {mark[r['met']]} |" for r in rows]
    return "\n".join(lines)


def plot(over: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = list(dict.fromkeys(r["map"] for r in over))
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 4), squeeze=False)
    for ax, m in zip(axes[0], maps):
        rows = [r for r in over if r["map"] == m]
        labels = [label for label, *_ in SOLVERS]
        libraries = ("deqkit", f"deqkit check_every={CHECK_EVERY}", "torchdeq")
        for k, library in enumerate(libraries):
            vals = [next((100 * r["overhead"] for r in rows if r["solver"] == lab and r["library"] == library), math.nan)
                    for lab in labels]
            ax.bar([i + 0.27 * (k - 1) for i in range(len(labels))], vals, width=0.27, label=library)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("time outside f per iteration (% of one f call)")
        ax.set_title(f"{m}: f = {1e3 * rows[0]['f_seconds']:.3f} ms")
        ax.legend()
    fig.suptitle("Solver overhead per iteration (30 fixed iterations; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-overhead"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="small maps and 2 repeats: a smoke test (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2 quick, 15 full)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's choice)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 15)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    device = resolve(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torchdeq  # noqa: F401

        have_torchdeq = True
    except ImportError:
        have_torchdeq = False
        print("torchdeq is not installed (pip install 'deqkit[torchdeq]'); measuring deqkit only", file=sys.stderr)

    sizes = [(64, 8), (128, 16)] if args.quick else [(256, 32), (1024, 64)]
    load_before = _load()
    with torch.no_grad():
        over = [row for d, b in sizes for row in overhead(tanh_map(d, b, device), repeats, have_torchdeq)]
        mixed = [heterogeneous(dim=64 if args.quick else 256, batch=32, tokens=t, device=device)
                 for t in ((1, 4) if args.quick else (1, 64))]
        act = [row for p in mixed for row in active_set(p, repeats)]
        suite = ([tanh_layer(0.9, dim=64, batch=8, device=device), linear_ill(dim=64, batch=4, device=device)]
                 if args.quick else
                 [tanh_layer(0.5, device=device), tanh_layer(0.9, device=device), tanh_layer(0.99, device=device),
                  heterogeneous(tokens=64, device=device), linear_ill(device=device), mdeq_conv(device=device)])
        nfes = nfe(suite, have_torchdeq)
    rows = targets(over, act, nfes)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(over, args.out / "overhead.png")
    info = describe(device)
    payload: dict[str, Any] = {
        "machine": info, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "repeats": repeats, "iterations": ITERATIONS, "load_average_1min": {"before": load_before, "after": _load()},
        "overhead": over, "active_set": act, "anderson_nfe": nfes, "targets": rows,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(header(info, "solver overhead") + f"; load average {load_before} -> {_load()}")
    print(table(rows))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
