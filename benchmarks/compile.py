#!/usr/bin/env python3
"""Eager against compiled solver steps (``deqkit.compiled``) on the overhead benchmark's maps.

30 fixed iterations (``tol=None, max_steps=30``) of ``z = tanh(W z + U x)`` with ||W||_2 = 0.9,
on a cheap map (d = 256, B = 32) and a costlier one (d = 1024, B = 64), for FixedPoint,
Anderson(m=5) and Broyden, each with its plain step and with its step compiled by
``torch.compile`` (default options). Each solve is timed whole (the loop, 30 calls of f, the
steps), the minimum over repeats, eager and compiled runs interleaved so that drift in the
machine's speed hits both; 30 calls of f alone are timed the same way, so that the time
outside f (the steps and the loop's bookkeeping) can be compared. The compile time is reported
apart: the first compiled solve's time, less a steady one, from an empty compiler cache (a
temporary TORCHINDUCTOR_CACHE_DIR unless one is set). Values are checked equal to eager.

Writes OUT/results.json (every figure, the machine, the load average) and prints a markdown table.

Times are the calling thread's CPU time on the CPU with one torch thread (robust to other
processes on a shared machine), wall-clock time otherwise.

    python benchmarks/compile.py --out runs/bench-compile
    python benchmarks/compile.py --quick --out runs/bench-compile-quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold compiles: an empty cache, set before torch loads
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="deqkit-bench-compile-")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deqkit  # noqa: E402
import deqkit._compile  # noqa: E402

ITERATIONS = 30
SOLVERS = {  # name on the command line: (label, solver)
    "fixed_point": ("FixedPoint", deqkit.FixedPoint()),
    "anderson": ("Anderson(m=5)", deqkit.Anderson(m=5)),
    "broyden": ("Broyden", deqkit.Broyden()),
}


def tanh_map(dim: int, batch: int, device: torch.device, seed: int = 0) -> tuple[Callable[..., torch.Tensor], torch.Tensor, tuple]:
    """``f(z, c) = tanh(z W^T + c)`` with ``c = x U^T`` precomputed, ||W||_2 = 0.9; (f, z0, inputs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g)
    w = (0.9 / torch.linalg.matrix_norm(w, ord=2)) * w
    u = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    x = 0.3 * torch.randn(batch, dim, generator=g)
    w, c = w.to(device), (x @ u.T).to(device)

    def f(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + c)

    return f, torch.zeros(batch, dim, device=device), (c,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn`` takes: on the CPU the calling thread's CPU time (with one torch thread all
    the work is done there, and other processes on a shared machine do not count); on a GPU
    wall-clock time between two synchronisations."""
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def measure(dim: int, batch: int, solvers: list[str], repeats: int, device: torch.device, backend: str) -> list[dict]:
    f, z0, inputs = tanh_map(dim, batch, device)

    def solve(solver: Any) -> torch.Tensor:
        with torch.no_grad():
            return deqkit.fixed_point(f, z0, inputs=inputs, solver=solver, tol=None, max_steps=ITERATIONS).value

    def calls() -> None:
        with torch.no_grad():
            z = z0
            for _ in range(ITERATIONS):
                z = f(z, *inputs)

    rows = []
    for name in solvers:
        label, solver = SOLVERS[name]
        # each map compiles from scratch (each compiled record owns its graphs; reset torch's
        # own caches too, so no earlier compilation counts against its recompile limit)
        torch._dynamo.reset()
        fast = deqkit.compiled(solver, backend=backend)
        reference = solve(solver)  # also warms up the eager path
        with warnings.catch_warnings():  # a fallback to eager is reported in the table
            warnings.simplefilter("ignore", RuntimeWarning)
            _sync(device)
            start = time.perf_counter()  # wall-clock: the compiler works in other threads and processes
            solve(fast)
            _sync(device)
            first = time.perf_counter() - start
        value = solve(fast)
        eager, comp, f_only = math.inf, math.inf, math.inf
        for _ in range(repeats):  # interleaved: drift hits both
            eager = min(eager, _timed(lambda: solve(solver), device))
            comp = min(comp, _timed(lambda: solve(fast), device))
            f_only = min(f_only, _timed(calls, device))
        rows.append({
            "map": f"d={dim}, B={batch}", "dim": dim, "batch": batch, "solver": label,
            "eager_ms": 1e3 * eager, "compiled_ms": 1e3 * comp, "f_ms": 1e3 * f_only,
            "eager_outside_f_ms": 1e3 * (eager - f_only), "compiled_outside_f_ms": 1e3 * (comp - f_only),
            "speedup": eager / comp, "compile_s": max(first - comp, 0.0),
            "graphs": fast.compilations, "fell_back": fast.why_eager,
            "max_abs_diff": float((value - reference).abs().max()),
        })
        print(f"  {label} on d={dim}, B={batch}: eager {1e3 * eager:.2f} ms, compiled {1e3 * comp:.2f} ms", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| map | solver | eager (ms) | compiled (ms) | speedup | outside f: eager / compiled (ms) | compile (s) | graphs | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['map']} | {r['solver']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{r['eager_outside_f_ms']:.2f} / {r['compiled_outside_f_ms']:.2f} | {r['compile_s']:.1f} | {r['graphs']} | "
            f"{r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-compile"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="one small map (d=32, B=4) and 2 repeats: a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2 quick, 50 full)")
    parser.add_argument("--solvers", nargs="+", choices=sorted(SOLVERS), default=list(SOLVERS), help="solvers to run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's choice)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--device", default="cpu", help="device to run on (cpu, cuda, cuda:N)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 50)
    maps = [(32, 4)] if args.quick else [(256, 32), (1024, 64)]
    rows = [row for dim, batch in maps for row in measure(dim, batch, args.solvers, repeats, device, args.backend)]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "iterations": ITERATIONS, "repeats": repeats, "device": str(device), "machine": machine(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": list(os.getloadavg()),
        "quick": args.quick, "backend": args.backend, "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
