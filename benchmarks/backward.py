#!/usr/bin/env python3
"""Backward cost: time, peak memory and gradient quality of each backward mode.

For each backward mode (Implicit at several adjoint tolerances, Phantom with k = 1..8 steps,
Unrolled, Unrolled with checkpointing, OneStep) and each number of forward iterations, this
runs one training step of a small DEQ (an MDEQ-style convolutional cell) and records:
- the time of one training step (forward + backward; median of repeats after a warm-up),
- the peak memory of that step, measured in a fresh subprocess per configuration as the rise
  of the process's peak resident set size (Linux: VmHWM, reset before the step),
- the cosine similarity of the parameter gradient to a reference: Implicit at a tightly
  converged forward solve (Anderson, rel. tol 1e-6, the float32 floor) and adjoint
  tolerance 1e-6.

The forward solve is plain iteration with `tol=None`, so exactly N iterations run.

``--device cuda`` (or ``cuda:N``) runs the model, its inputs and the solves on that GPU. There
the peak memory is the rise of the CUDA allocator's peak (``torch.cuda.max_memory_allocated``,
reset before the step) and every configuration runs in this process (the allocator's peak
needs no fresh process, and each would pay CUDA's start-up); each timed step ends with
``torch.cuda.synchronize``, so the time is that of the kernels, not of their launch. On the
CPU, ``--in-process`` does the same for a quick look: times and cosines, no peak memory.

Writes OUT/results.json, OUT/backward_time.png, OUT/backward_memory.png, OUT/backward_cosine.png
and prints a markdown table.

    python benchmarks/backward.py --quick --out runs/backward-quick
    python benchmarks/backward.py --out runs/backward
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import deqkit

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from _device import add_device_option, describe, header, now, resolve, sync  # noqa: E402

MEMORY = {"cpu": "rise of the peak RSS", "cuda": "rise of the CUDA allocator's peak"}


# -- the model ------------------------------------------------------------------------------
class ConvCell(nn.Module):
    """z -> tanh(conv(relu(GN(conv(z)))) + x): a convolutional DEQ cell that contracts
    (spectral radius of the Jacobian about 0.8 at the fixed point with this init)."""

    def __init__(self, channels: int, groups: int = 4, std: float = 0.06):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.gn = nn.GroupNorm(groups, channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=std)
            nn.init.zeros_(conv.bias)

    def forward(self, z, x):
        return torch.tanh(self.conv2(torch.relu(self.gn(self.conv1(z)))) + x)


def build(size: dict, seed: int = 0, device: str | torch.device = "cpu"):
    """The cell, its input and the target, drawn on the CPU from the seed (the same numbers on
    every device) and moved to ``device``."""
    torch.manual_seed(seed)
    cell = ConvCell(size["channels"])
    x = torch.randn(size["batch"], size["channels"], size["hw"], size["hw"])
    target = torch.randn_like(x)
    return cell.to(device), x.to(device), target.to(device)


def make_backward(spec: dict):
    kind = spec["mode"]
    if kind == "implicit":
        return deqkit.Implicit(tol=spec["tol"], max_steps=200)
    if kind == "phantom":
        return deqkit.Phantom(steps=spec["k"], tau=0.5)
    if kind == "unrolled":
        return deqkit.Unrolled(checkpoint=spec.get("checkpoint", False))
    if kind == "onestep":
        return deqkit.OneStep()
    raise ValueError(f"unknown mode {kind!r}")


def label(spec: dict) -> str:
    kind = spec["mode"]
    if kind == "implicit":
        return f"Implicit(tol={spec['tol']:g})"
    if kind == "phantom":
        return f"Phantom(k={spec['k']})"
    if kind == "unrolled":
        return "Unrolled(checkpoint)" if spec.get("checkpoint") else "Unrolled"
    return "OneStep"


def train_step(cell, x, target, backward, solver, iters: int, tol: float | None):
    cell.zero_grad(set_to_none=True)
    sol = deqkit.fixed_point(cell, torch.zeros_like(x), inputs=(x,), solver=solver, backward=backward,
                             tol=tol, max_steps=iters, throw=False)
    loss = (sol.value - target).pow(2).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in cell.parameters()])


# -- worker (one configuration, fresh process) ---------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(job: dict) -> dict:
    import warnings

    with warnings.catch_warnings(record=True) as record:  # e.g. an adjoint solve at max_steps
        warnings.simplefilter("always")
        out = _work(job)
    out["warnings"] = sorted({str(w.message) for w in record})
    return out


def _work(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    size = job["size"]
    device = torch.device(job.get("device", "cpu"))
    cell, x, target = build(size, device=device)
    if job.get("reference"):
        grad = train_step(cell, x, target, deqkit.Implicit(tol=1e-6, max_steps=500), deqkit.Anderson(m=5), 500, 1e-6)
        torch.save(grad, job["reference"])
        return {"ok": True}
    backward = make_backward(job["spec"])
    solver = deqkit.FixedPoint()
    every_step = None  # tol=None: exactly `iters` iterations, no stopping test
    # memory: the rise of the peak RSS in this fresh process (CPU) or of the allocator's peak (CUDA);
    # one short step first, so one-time costs (lazy imports, allocator set-up) are not counted
    train_step(cell, x, target, backward, solver, 2, every_step)
    peak = None
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        grad = train_step(cell, x, target, backward, solver, job["iters"], every_step)
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    elif job.get("in_process"):  # another configuration's peak would be counted: none measured
        grad = train_step(cell, x, target, backward, solver, job["iters"], every_step)
    elif os.path.exists("/proc/self/clear_refs"):
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        grad = train_step(cell, x, target, backward, solver, job["iters"], every_step)
        # the kernel updates VmHWM lazily, so it can lag the current RSS: take the larger
        peak = (max(_rss_kib("VmHWM"), _rss_kib("VmRSS"), before) - before) / 1024
    else:  # pragma: no cover - not Linux
        grad = train_step(cell, x, target, backward, solver, job["iters"], every_step)
    times = []
    for _ in range(job["repeats"]):
        t = now(device)
        train_step(cell, x, target, backward, solver, job["iters"], every_step)
        times.append(now(device) - t)
    ref = torch.load(job["reference_path"], weights_only=True, map_location=device)
    cosine = float(torch.nn.functional.cosine_similarity(grad, ref, dim=0))
    return {"step_seconds": statistics.median(times), "peak_mib": peak, "cosine": cosine,
            "grad_finite": bool(torch.isfinite(grad).all())}


def run_worker(job: dict) -> dict:
    """One configuration: in a fresh process on the CPU (its peak RSS is the step's), in this
    one on CUDA or with ``in_process``."""
    if job.get("in_process") or job.get("device", "cpu").startswith("cuda"):
        return worker(job)
    # A fixed mmap threshold makes glibc return every large block to the OS on free, so the
    # resident set follows the live tensors and its peak measures the step's memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(job)],
                          capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {job}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver -----------------------------------------------------------------------------------
def configurations(quick: bool) -> tuple[list[dict], list[int], dict, int]:
    if quick:
        specs = [{"mode": "implicit", "tol": 1e-4}, {"mode": "phantom", "k": 2}, {"mode": "unrolled"},
                 {"mode": "unrolled", "checkpoint": True}, {"mode": "onestep"}]
        return specs, [5, 20], {"batch": 4, "channels": 8, "hw": 8}, 1
    specs = [{"mode": "implicit", "tol": t} for t in (1e-2, 1e-4, 1e-6)]
    specs += [{"mode": "phantom", "k": k} for k in range(1, 9)]
    specs += [{"mode": "unrolled"}, {"mode": "unrolled", "checkpoint": True}, {"mode": "onestep"}]
    return specs, [10, 30, 100], {"batch": 32, "channels": 32, "hw": 16}, 3


def plot(results: list[dict], iters: list[int], out: Path, memory: str = MEMORY["cpu"], where: str = "") -> list[str]:
    """The three figures; ``memory`` says how peak memory was measured, ``where`` names the device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    size = results[0]["size"] if results and "size" in results[0] else None
    on = f", on {where}" if where else ""
    where = f" (conv DEQ cell, B={size['batch']}, C={size['channels']}, {size['hw']}x{size['hw']}{on})" if size else ""
    for key, ylabel, fname, logy, title in (
            ("step_seconds", "time per training step, forward + backward (s)", "backward_time.png", True,
             "Time of one training step"),
            ("peak_mib", "peak memory of the step (MiB)", "backward_memory.png", True,
             f"Peak memory of one training step ({memory})"),
            ("cosine", "cosine of the parameter gradient to the reference", "backward_cosine.png", False,
             "Gradient quality: cosine to Implicit(tol=1e-6) at a converged forward")):
        if all(r.get(key) is None for r in results):  # peak memory with --in-process on the CPU
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.set_title(title + "\n" + where.strip(" ()"), fontsize=10)
        for i, name in enumerate(dict.fromkeys(r["mode"] for r in results)):
            rows = [r for r in results if r["mode"] == name and r[key] is not None]
            style = "-o" if not name.startswith("Phantom") else ":."
            ax.plot([r["iters"] for r in rows], [r[key] for r in rows], style, label=name, ms=4,
                    color=plt.cm.tab20(i % 20))
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xticks(iters, [str(i) for i in iters])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured N are ticked
        ax.set_xlabel("forward iterations N (plain iteration, exactly N)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="backward mode", title_fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def table(results: list[dict], iters: list[int], machine: dict | None = None, memory: str = MEMORY["cpu"]) -> str:
    """The markdown table, under a line naming the device (``machine``: results.json's)."""
    lines = [header(machine, "backward") + f"; memory: {memory}\n"] if machine else []
    head = "| mode | " + " | ".join(f"N={n}: ms / MiB / cos" for n in iters) + " |"
    lines += [head, "|---|" + "---|" * len(iters)]
    for name in dict.fromkeys(r["mode"] for r in results):
        cells = []
        for n in iters:
            r = next(r for r in results if r["mode"] == name and r["iters"] == n)
            mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            cells.append(f"{1e3 * r['step_seconds']:.0f} / {mem} / {r['cosine']:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset, for smoke tests")
    parser.add_argument("--out", type=Path, default=Path("runs/backward"), help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 1 quick, 3 full)")
    parser.add_argument("--replot", action="store_true", help="redraw the plots from OUT/results.json without measuring")
    parser.add_argument("--in-process", action="store_true",
                        help="every configuration in this process: faster, but no peak memory on the CPU")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = resolve(parser, args.device)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.replot:
        payload = json.loads((args.out / "results.json").read_text())
        for r in payload["results"]:
            r.setdefault("size", payload["size"])
        where = payload["machine"]["device_name"] if "machine" in payload else ""
        payload["plots"] = plot(payload["results"], payload["iters"], args.out, payload.get("memory", MEMORY["cpu"]), where)
        print(f"redrew {', '.join(str(args.out / p) for p in payload['plots'])} from {args.out / 'results.json'}")
        return 0
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    specs, iters, size, repeats = configurations(args.quick)
    repeats = args.repeats or repeats
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = str(Path(tmp) / "reference.pt")
        common = {"size": size, "threads": args.threads, "device": str(device), "in_process": args.in_process}
        run_worker({"reference": ref_path, **common})
        results = []
        jobs = [(spec, n) for spec in specs for n in iters]
        for spec, n in tqdm(jobs, desc="backward", unit="config"):
            out = run_worker({"spec": spec, "iters": n, "repeats": repeats, "reference_path": ref_path, **common})
            results.append({"mode": label(spec), "spec": spec, "iters": n, "size": size, **out})
    machine = describe(device)
    measured = None if args.in_process and device.type == "cpu" else MEMORY[device.type]
    payload = {"device": str(device), "machine": machine, "memory": measured,
               "torch": torch.__version__, "threads": args.threads, "size": size, "iters": iters,
               "load_average_1min": {"before": load_before, "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
               "repeats": repeats, "reference": "Implicit(tol=1e-6) at Anderson rel. tol 1e-6",
               "results": results}
    payload["plots"] = plot(results, iters, args.out, measured or "not measured: --in-process", machine["device_name"])
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(table(results, iters, machine, measured or "not measured (--in-process)"))
    print(f"\nwrote {args.out / 'results.json'} and {', '.join(str(args.out / p) for p in payload['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
