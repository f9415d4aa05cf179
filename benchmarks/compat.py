#!/usr/bin/env python3
"""The compat layer's overhead: the same training step on torchdeq and on deqkit.compat.torchdeq.

For each cell (an implicit MLP, ``z = tanh(W z + U x)``, and a small transformer-like block,
``z = LN(z + attn(z) + x)`` then an MLP) and each configuration (Anderson with
``f_max_iter=12``; the GET recipe ``f_max_iter=0, grad=6, sup_gap=1``; IFT with an Anderson
backward solver), one training step is ``get_deq(**flags)`` forward, ``fp_correction`` (MSE)
and ``backward``. Steps of the two libraries alternate (the order flips every repeat), at
one torch thread, after warm-up; the table reports each library's median and the ratio
compat / torchdeq. Writes OUT/results.json and OUT/table.md and prints the table.

``--device cuda`` (or ``cuda:N``) puts the cells, their inputs and both libraries' solver
state on that GPU; each step is timed between two ``torch.cuda.synchronize`` calls, so it is
the time of the step's kernels, not of their launch.

    python benchmarks/compat.py --out runs/bench-compat
    python benchmarks/compat.py --quick --out /tmp/bench-compat
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _device import add_device_option, describe, header, now, resolve  # noqa: E402

CONFIGS = {
    "anderson-12": dict(f_solver="anderson", f_max_iter=12),
    "get-recipe": dict(f_max_iter=0, grad=6, sup_gap=1),
    "ift-anderson": dict(f_solver="anderson", f_max_iter=12, ift=True, b_solver="anderson", b_max_iter=12),
}


class MLPCell(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w, self.u = nn.Linear(d, d), nn.Linear(d, d)
        with torch.no_grad():
            self.w.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.w(z) + self.u(x))


class BlockCell(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, z, x):
        q, k, v = self.qkv(z).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        h = self.ln1(z + self.proj(att) + x)
        return self.ln2(h + self.mlp(h))


def make_problem(cell: str, quick: bool, device: str | torch.device = "cpu"):
    """The cell, its input and target: drawn on the CPU from seed 0, then moved to ``device``."""
    torch.manual_seed(0)
    if cell == "mlp":
        d, shape = (16, (8, 16)) if quick else (128, (64, 128))
        model = MLPCell(d)
    else:
        d, shape = (16, (2, 4, 16)) if quick else (64, (8, 16, 64))
        model = BlockCell(d)
    return model.to(device), torch.randn(shape).to(device), torch.randn(shape).to(device)


def train_step(lib, model, x, y, flags) -> None:
    deq = lib.get_deq(**flags)
    z_out, _ = deq(lambda z: model(z, x), torch.zeros_like(x))
    loss = lib.fp_correction(nn.MSELoss(), (z_out, y))
    model.zero_grad(set_to_none=True)
    loss.backward()


def measure(cell: str, config: str, repeats: int, quick: bool, device: torch.device = torch.device("cpu")) -> dict:
    import torchdeq

    import deqkit.compat.torchdeq as compat

    libs = {"torchdeq": torchdeq, "compat": compat}
    model, x, y = make_problem(cell, quick, device)
    flags = CONFIGS[config]
    times: dict[str, list[float]] = {name: [] for name in libs}
    for name, lib in libs.items():  # warm-up
        for _ in range(2):
            train_step(lib, model, x, y, flags)
    for r in range(repeats):
        for name in (list(libs) if r % 2 == 0 else list(libs)[::-1]):
            t0 = now(device)
            train_step(libs[name], model, x, y, flags)
            times[name].append(now(device) - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"cell": cell, "config": config, "flags": flags, "repeats": repeats,
            "torchdeq_ms": 1e3 * med["torchdeq"], "compat_ms": 1e3 * med["compat"],
            "ratio": med["compat"] / med["torchdeq"]}


def table(rows: list[dict], machine: dict | None = None) -> str:
    """The markdown table, under a line naming the device (``machine``: results.json's)."""
    lines = [header(machine, "compat vs torchdeq") + "\n"] if machine else []
    lines += ["| cell | configuration | torchdeq (ms) | compat (ms) | compat / torchdeq |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['config']} | {r['torchdeq_ms']:.2f} | {r['compat_ms']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per library (default 30, --quick 3)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-compat"), help="output folder")
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = resolve(parser, args.device)
    torch.set_num_threads(1)
    repeats = args.repeats or (3 if args.quick else 30)
    rows = [measure(cell, config, repeats, args.quick, device) for cell in ("mlp", "block") for config in CONFIGS]
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe(device)
    meta = {"quick": args.quick, "repeats": repeats, "threads": 1, "torch": torch.__version__,
            "loadavg": list(os.getloadavg()), "cpus": os.cpu_count()}
    (args.out / "results.json").write_text(json.dumps({"device": str(device), "machine": machine, "meta": meta, "rows": rows},
                                                      indent=2))
    md = table(rows, machine)
    (args.out / "table.md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
