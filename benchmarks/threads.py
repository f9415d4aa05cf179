#!/usr/bin/env python3
"""Thread settings on a shared CPU: how torch's intra-op threads behave when another process
competes for the cores.

For each setting (torch's default thread count or one thread; OpenMP's default wait policy,
``OMP_WAIT_POLICY=PASSIVE``, or PASSIVE with ``GOMP_SPINCOUNT=3000``, the GET example's default:
GNU OpenMP, which torch's Linux wheels use, then spins for about 3,000 iterations before it
sleeps, while other OpenMP runtimes ignore the variable and sleep at once) and each load (an otherwise idle machine, or one extra busy
process per ``--competitors``: ``python -c 'while True: pass'``), a fresh process times:
- a training step of the GET example's EDM teacher (the demo's "digits" preset, batch 128,
  Adam), the median over ``--steps`` steps after two warm-up steps;
- a deqkit Anderson(m=5) solve of a small tanh layer (d = 64, B = 8, as in
  ``convergence.py --quick``), the median over 20 solves after a warm-up.

The busy processes are started and killed by this script. Writes OUT/results.json and
prints a markdown table. ``--quick`` is a smoke test of the measurement, not a comparison: one
setting (one thread, OpenMP's default wait policy, no busy process) in one fresh process, one
timed teacher step unless ``--steps`` (batch 32, one warm-up step) and 5 solves.

``--device cuda`` (or ``cuda:N``) runs the teacher, its batch and the solve on that GPU (the
loss's random numbers still come from a CPU generator, as in the example's training), each
step and solve timed between two ``torch.cuda.synchronize`` calls: the busy processes then
compete with the host thread that launches the kernels. ``--profile anderson`` (or ``broyden``) instead prints a
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
sys.path.insert(0, str(HERE.parent))
from _device import add_device_option, describe, header, now, resolve, sync  # noqa: E402


def worker(threads: int | None, steps: int, device: str = "cpu", quick: bool = False) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path[:0] = [str(ROOT), str(HERE.parent)]
    import deqkit
    from _problems import tanh_layer
    from examples.get_distillation import teacher

    dev = torch.device(device)
    torch.manual_seed(0)
    model = teacher.build_denoiser(teacher.TeacherConfig(preset="digits"), in_channels=1, num_classes=10).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch, warm_up, solves = (32, 1, 5) if quick else (128, 2, 20)
    images, labels = torch.randn(batch, 1, 8, 8).to(dev), torch.arange(batch, device=dev) % 10
    gen = torch.Generator().manual_seed(0)  # edm_loss draws on the CPU and moves the numbers

    def train_step() -> None:
        loss = teacher.edm_loss(model, images, labels, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_times = []
    for i in range(steps + warm_up):
        t = now(dev)
        train_step()
        if i >= warm_up:
            step_times.append(now(dev) - t)

    p = tanh_layer(0.9, dim=64, batch=8, device=dev)
    solve_times = []
    with torch.no_grad():
        for i in range(solves + 1):
            t = now(dev)
            deqkit.fixed_point(p.f, p.z0, inputs=p.inputs, solver=deqkit.Anderson(m=5), tol=1e-4, max_steps=p.budget)
            if i:
                solve_times.append(now(dev) - t)
    return {"threads": torch.get_num_threads(), "environment": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
            "teacher_step_s": statistics.median(step_times),
            "teacher_step_max_s": max(step_times), "anderson_ms": 1e3 * statistics.median(solve_times),
            "anderson_max_ms": 1e3 * max(solve_times)}


def _solver(name: str):
    import deqkit

    return {"anderson": deqkit.Anderson(m=5), "broyden": deqkit.Broyden(memory=20), "fixed_point": deqkit.FixedPoint()}[name]


def profile(name: str, threads: int | None, rows: int = 8, device: str = "cpu") -> str:
    """The profiler's table (by self CPU time) of 10 solves of the quick tanh layer (on CUDA
    the GPU's kernels are recorded too)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE.parent))
    import deqkit
    from _problems import tanh_layer

    dev = torch.device(device)
    p, solver = tanh_layer(0.9, dim=64, batch=8, device=dev), _solver(name)

    def solve() -> None:
        with torch.no_grad():
            deqkit.fixed_point(p.f, p.z0, inputs=p.inputs, solver=solver, tol=1e-4, max_steps=p.budget)

    for _ in range(3):
        solve()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(10):
            solve()
        sync(dev)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5 if procs else 0)
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for b in procs:
        b.kill()
        b.wait()


#: OpenMP wait settings: name -> the environment variables a fresh process gets (both unset for
#: "default"). "spin 3000" is what ``python -m examples.get_distillation`` sets.
WAIT_SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "PASSIVE + spin 3000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"},
}


def measure(threads: int | None, wait: str, competitors: int, steps: int, device: str = "cpu",
            quick: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    env.update(WAIT_SETTINGS[wait])
    busy = _busy(competitors)
    try:
        job = {"threads": threads, "steps": steps, "device": device, "quick": quick}
        proc = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(job)],
                              capture_output=True, text=True, env=env, timeout=1800)
    finally:
        _stop(busy)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"torch_threads": threads or "default", "omp_wait": wait,
            "competitors": competitors, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/threads"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="timed teacher steps per setting (default 8, --quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="one setting (one thread, default wait policy, no busy process), small: a smoke test")
    parser.add_argument("--competitors", type=int, default=1, help="busy processes in the loaded runs (default 1)")
    parser.add_argument("--profile", choices=("anderson", "broyden", "fixed_point"), default=None,
                        help="print a torch.profiler table of 10 solves with this solver instead")
    parser.add_argument("--threads", type=int, default=None, help="with --profile: torch threads (default torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = resolve(parser, args.device)
    steps = args.steps if args.steps is not None else (1 if args.quick else 8)
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    if args.profile:
        busy = _busy(args.competitors)
        try:
            print(profile(args.profile, args.threads, device=str(device)))
        finally:
            _stop(busy)
        return 0
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["threads"], job["steps"], job.get("device", "cpu"), job.get("quick", False))))
        return 0
    load_before = os.getloadavg()[0]
    rows = []
    for competitors in (0,) if args.quick else (0, args.competitors):
        for threads in (1,) if args.quick else (None, 1):
            for wait in ("default",) if args.quick else tuple(WAIT_SETTINGS):
                row = measure(threads, wait, competitors, steps, str(device), args.quick)
                rows.append({**row, "load_average_1min": os.getloadavg()[0]})
                print(rows[-1], file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe(device)
    machine["torch_threads"] = "per setting"  # each fresh process sets its own
    payload = {"device": str(device), "machine": machine, "cpus": os.cpu_count(), "steps": steps, "quick": args.quick,
               "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "results": rows}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(header(machine, "threads") + "\n")
    print("| busy processes | torch threads | OpenMP wait | teacher step (s, median / max) | Anderson solve (ms, median / max) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['competitors']} | {r['torch_threads']} ({r['threads']}) | {r['omp_wait']} | "
              f"{r['teacher_step_s']:.3f} / {r['teacher_step_max_s']:.3f} | {r['anderson_ms']:.1f} / {r['anderson_max_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
