#!/usr/bin/env python3
"""Thread settings on a shared CPU: how torch's intra-op threads behave when another process
competes for the cores.

For each setting (torch's default thread count or one thread; OpenMP's default wait policy
or ``OMP_WAIT_POLICY=PASSIVE``) and each load (an otherwise idle machine, or one extra busy
process per ``--competitors``: ``python -c 'while True: pass'``), a fresh process times:
- a training step of the GET example's EDM teacher (the demo's "digits" preset, batch 128,
  Adam), the median over ``--steps`` steps after two warm-up steps;
- a deqkit Anderson(m=5) solve of a small tanh layer (d = 64, B = 8, as in
  ``convergence.py --quick``), the median over 20 solves after a warm-up.

The busy processes are started and killed by this script. Writes OUT/results.json and
prints a markdown table. ``--profile anderson`` (or ``broyden``) instead prints a
``torch.profiler`` table of 10 such solves, in this process, at ``--threads`` threads, beside
``--competitors`` busy processes: where the time goes when the cores are shared.

    python benchmarks/threads.py --out runs/bench-threads
    python benchmarks/threads.py --profile anderson --threads 2 --competitors 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def worker(threads: int | None, steps: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path[:0] = [str(ROOT), str(HERE.parent)]
    import deqkit
    from _problems import tanh_layer
    from examples.get_distillation import teacher

    torch.manual_seed(0)
    model = teacher.build_denoiser(teacher.TeacherConfig(preset="digits"), in_channels=1, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    images, labels = torch.randn(128, 1, 8, 8), torch.arange(128) % 10
    gen = torch.Generator().manual_seed(0)

    def train_step() -> None:
        loss = teacher.edm_loss(model, images, labels, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        train_step()
        if i >= 2:
            step_times.append(time.perf_counter() - t)

    p = tanh_layer(0.9, dim=64, batch=8)
    solve_times = []
    with torch.no_grad():
        for i in range(21):
            t = time.perf_counter()
            deqkit.fixed_point(p.f, p.z0, inputs=p.inputs, solver=deqkit.Anderson(m=5), tol=1e-4, max_steps=p.budget)
            if i:
                solve_times.append(time.perf_counter() - t)
    return {"threads": torch.get_num_threads(), "teacher_step_s": statistics.median(step_times),
            "teacher_step_max_s": max(step_times), "anderson_ms": 1e3 * statistics.median(solve_times),
            "anderson_max_ms": 1e3 * max(solve_times)}


def _solver(name: str):
    import deqkit

    return {"anderson": deqkit.Anderson(m=5), "broyden": deqkit.Broyden(memory=20), "fixed_point": deqkit.FixedPoint()}[name]


def profile(name: str, threads: int | None, rows: int = 8) -> str:
    """The profiler's table (by self CPU time) of 10 solves of the quick tanh layer."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE.parent))
    import deqkit
    from _problems import tanh_layer

    p, solver = tanh_layer(0.9, dim=64, batch=8), _solver(name)

    def solve() -> None:
        with torch.no_grad():
            deqkit.fixed_point(p.f, p.z0, inputs=p.inputs, solver=solver, tol=1e-4, max_steps=p.budget)

    for _ in range(3):
        solve()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            solve()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5 if procs else 0)
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for b in procs:
        b.kill()
        b.wait()


def measure(threads: int | None, passive: bool, competitors: int, steps: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    busy = _busy(competitors)
    try:
        proc = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps({"threads": threads, "steps": steps})],
                              capture_output=True, text=True, env=env, timeout=1800)
    finally:
        _stop(busy)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"torch_threads": threads or "default", "omp_wait_policy": "PASSIVE" if passive else "default",
            "competitors": competitors, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/threads"), help="output folder")
    parser.add_argument("--steps", type=int, default=8, help="timed teacher steps per setting (default 8)")
    parser.add_argument("--competitors", type=int, default=1, help="busy processes in the loaded runs (default 1)")
    parser.add_argument("--profile", choices=("anderson", "broyden", "fixed_point"), default=None,
                        help="print a torch.profiler table of 10 solves with this solver instead")
    parser.add_argument("--threads", type=int, default=None, help="with --profile: torch threads (default torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile:
        busy = _busy(args.competitors)
        try:
            print(profile(args.profile, args.threads))
        finally:
            _stop(busy)
        return 0
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["threads"], job["steps"])))
        return 0
    load_before = os.getloadavg()[0]
    rows = []
    for competitors in (0, args.competitors):
        for threads in (None, 1):
            for passive in (False, True):
                rows.append({**measure(threads, passive, competitors, args.steps), "load_average_1min": os.getloadavg()[0]})
                print(rows[-1], file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"cpus": os.cpu_count(), "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
               "results": rows}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print("| busy processes | torch threads | OMP_WAIT_POLICY | teacher step (s, median / max) | Anderson solve (ms, median / max) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['competitors']} | {r['torch_threads']} ({r['threads']}) | {r['omp_wait_policy']} | "
              f"{r['teacher_step_s']:.3f} / {r['teacher_step_max_s']:.3f} | {r['anderson_ms']:.1f} / {r['anderson_max_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
