#!/usr/bin/env python3
"""Where escape detection draws its line: what a relative test that passes looks like on maps
without a fixed point and on maps with one.

For every map, solver and relative tolerance, each sample's calls of f are recorded; at the
call where its relative residual first meets ``tol`` the script takes the two quantities the
rule reads (``deqkit.SolveOptions(escape=...)``, docs/stability.md):

- ``fall``: ``max(||f(z) - z||, eps ||f(z)||)`` over the largest ``||f(z) - z||`` so far (the
  rule: not fallen while at least 0.5);
- ``growth``: ``||f(z)||`` over its value at the first call (the rule: grown past ``escape``, 10).

and the Result deqkit reports with the default rule. Maps without a fixed point: ``z + c`` from 0
and from a Gaussian start, a pre-LayerNorm transformer (GET's block) and GET-T/2 at
initialisation. Maps with one: random linear and ``tanh`` contractions (factors 0.5-0.999, from 0
and from 1000x away), scalar contractions ``L z + c`` (the slowest kind), the benchmark suite's
``mdeq_conv``, ``heterogeneous``, ``linear_ill``; with ``--trained``, the trained maps of
``benchmarks/trained.py`` (the digits MLP and conv classifiers, cached under OUT/checkpoints) and
``--get-student`` checkpoints. Writes OUT/results.json, OUT/escape.png (growth against fall at
each pass, the rule's corner shaded) and prints a table per map.

    python benchmarks/escape.py --quick --out runs/escape-quick
    python benchmarks/escape.py --trained --out runs/escape
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit  # noqa: E402
from _device import add_device_option, describe, header, resolve  # noqa: E402
from _problems import Problem, get_t, heterogeneous, linear_ill, mdeq_conv  # noqa: E402

SOLVERS = {"FixedPoint": deqkit.FixedPoint(), "Anderson": deqkit.Anderson(), "Broyden": deqkit.Broyden()}
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-6)
FALL, GROWTH = 0.5, deqkit.SolveOptions().escape  # the rule's constants (docs/stability.md)


class _PreLN(torch.nn.Module):
    """``z + attn(LN(z)) + mlp(LN(z))``: GET's pre-LayerNorm block, at initialisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.ln1(z)
        z = z + self.attn(h, h, h, need_weights=False)[0]
        return z + self.mlp(self.ln2(z))


def maps(quick: bool, device: torch.device) -> list[tuple[str, bool, Problem]]:
    """(kind, has a fixed point, problem); numbers drawn on the CPU from the seed, then moved."""
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    b, d = (4, 16) if quick else (8, 64)
    c = torch.randn(b, d, generator=g, dtype=f64)
    out: list[tuple[str, bool, Problem]] = []

    def add(kind: str, has: bool, name: str, f: Callable[..., torch.Tensor], z0: torch.Tensor, inputs: tuple, budget: int) -> None:
        out.append((kind, has, Problem(name, name, f, z0.to(device), tuple(t.to(device) for t in inputs), budget=budget)))

    add("drift", False, "z + c, from 0", lambda z, c: z + c, torch.zeros(b, d, dtype=f64), (c,), 3000)
    add("drift", False, "z + c, from randn", lambda z, c: z + c, torch.randn(b, d, generator=g, dtype=f64), (c,), 3000)
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(_PreLN(16), _PreLN(16)).double().eval().to(device)
    x = torch.randn(b, 8, 16, generator=g, dtype=f64)
    add("drift", False, "pre-LN blocks at init", lambda z, x: blocks(z + x), torch.randn(b, 8, 16, generator=g, dtype=f64), (x,), 200)
    if not quick:
        out.append(("drift", False, get_t(batch=4, device=device)))
    w = torch.randn(d, d, generator=g, dtype=f64)
    for rho in ((0.5, 0.99) if quick else (0.5, 0.9, 0.99, 0.999)):
        wr = (rho * w / torch.linalg.matrix_norm(w, ord=2)).to(device)
        add("contraction", True, f"linear {rho}, from 0", lambda z, c, wr=wr: z @ wr.T + c, torch.zeros(b, d, dtype=f64), (c,), 3000)
        add("contraction", True, f"tanh {rho}, from 1000x", lambda z, c, wr=wr: torch.tanh(z @ wr.T + c),
            1000 * torch.randn(b, d, generator=g, dtype=f64), (c,), 3000)
    for rho in ((0.9,) if quick else (0.9, 0.99, 0.999)):
        add("slow", True, f"scalar {rho} z + c, from 0", lambda z, c, rho=rho: rho * z + c, torch.zeros(b, d, dtype=f64), (c,), 20000)
    if not quick:
        for p in (mdeq_conv(device=device), heterogeneous(device=device), linear_ill(device=device)):
            out.append(("suite", True, p))
    return out


def trained_maps(folder: Path, students: list[Path], device: torch.device) -> list[tuple[str, bool, Problem]]:
    import _trained_maps as tm

    out = []
    for name in ("digits_mlp", "mdeq_conv_trained"):
        model, _ = tm.trained_classifier(name, tm.SPECS[name], folder, device, False, lambda x, **k: x, print)
        out.append(("trained", True, tm.classifier_problem(name, model, 200)))
    for path in students:
        problem, _ = tm.get_student(path, batch=8, budget=60, device=device)
        out.append(("trained", True, problem))
    return out


def _recorded(f: Callable[..., torch.Tensor], calls: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., torch.Tensor]:
    def g(z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        out = f(z, *inputs)
        b = z.shape[0]
        calls.append(((out - z).reshape(b, -1).double().norm(dim=1), out.reshape(b, -1).double().norm(dim=1)))
        return out
    return g


def passes(problem: Problem, solver: Any, tol: float) -> dict:
    """The Result counts with the default rule, and (fall, growth) where each sample first passed."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        sol = deqkit.fixed_point(_recorded(problem.f, calls), problem.z0, inputs=problem.inputs, solver=solver, tol=tol,
                                 max_steps=problem.budget, throw=False)
    diff = torch.stack([d for d, _ in calls])
    size = torch.stack([s for _, s in calls])
    eps = torch.finfo(problem.z0.dtype).eps
    peak = torch.cummax(diff.nan_to_num(0.0), dim=0).values
    points = []
    for i in range(diff.shape[1]):
        hit = torch.nonzero(diff[:, i] / (size[:, i] + 1e-9) <= tol).flatten()
        if hit.numel():
            k = int(hit[0])
            fall = float(max(diff[k, i], eps * size[k, i]) / max(float(peak[k, i]), 1e-300))
            points.append((fall, float(size[k, i] / max(float(size[0, i]), 1e-300))))
    counts = {r.name: int((sol.stats.status == r).sum()) for r in deqkit.Result}
    return {"counts": counts, "points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/escape"), help="output folder (default runs/escape)")
    parser.add_argument("--quick", action="store_true", help="small maps, two tolerances: a smoke test")
    parser.add_argument("--trained", action="store_true", help="add the trained classifiers of benchmarks/trained.py")
    parser.add_argument("--get-student", type=Path, action="append", default=[], help="a GET student checkpoint (repeatable)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = resolve(parser, args.device)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = maps(args.quick, device)
    if args.trained or args.get_student:
        suite += trained_maps(args.out / "checkpoints", args.get_student, device)
    tolerances = TOLERANCES[:2] if args.quick else TOLERANCES
    rows = []
    for kind, has_fixed_point, problem in suite:
        for label, solver in SOLVERS.items():
            for tol in tolerances:
                found = passes(problem, solver, tol)
                rows.append({"kind": kind, "fixed_point": has_fixed_point, "map": problem.name, "solver": label, "tol": tol, **found})
    summary = _summary(rows)
    info = describe(device)
    (args.out / "results.json").write_text(json.dumps({"machine": info, "device": str(device), "rows": rows, "summary": summary,
                                                       "fall": FALL, "growth": GROWTH}, indent=1))
    _plot(rows, args.out / "escape.png")
    print(header(info, "where relative tests pass"))
    print(_table(summary))
    return 0


def _summary(rows: list[dict]) -> list[dict]:
    by_map: dict[str, dict] = {}
    for row in rows:
        entry = by_map.setdefault(row["map"], {"map": row["map"], "kind": row["kind"], "fixed_point": row["fixed_point"],
                                               "passes": 0, "fall": [], "growth": [], **{r.name: 0 for r in deqkit.Result}})
        entry["passes"] += len(row["points"])
        entry["fall"] += [p[0] for p in row["points"]]
        entry["growth"] += [p[1] for p in row["points"]]
        for name, n in row["counts"].items():
            entry[name] += n
    out = []
    for entry in by_map.values():
        falls, growths = entry.pop("fall"), entry.pop("growth")
        entry["fall"] = [min(falls), max(falls)] if falls else None
        entry["growth"] = [min(growths), max(growths)] if growths else None
        out.append(entry)
    return out


def _table(summary: list[dict]) -> str:
    lines = ["| map | fixed point | passes of the relative test | fall at the pass | growth at the pass | SUCCESS | ESCAPED | MAX_STEPS |",
             "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        fall = "-" if e["fall"] is None else f"{e['fall'][0]:.2g}-{e['fall'][1]:.2g}"
        growth = "-" if e["growth"] is None else f"{e['growth'][0]:.2g}-{e['growth'][1]:.2g}"
        lines.append(f"| {e['map']} | {'yes' if e['fixed_point'] else 'no'} | {e['passes']} | {fall} | {growth} | "
                     f"{e['SUCCESS']} | {e['ESCAPED']} | {e['MAX_STEPS']} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = {"drift": "tab:red", "contraction": "tab:blue", "slow": "tab:orange", "suite": "tab:green", "trained": "tab:purple"}
    for kind, color in colors.items():
        points = [p for r in rows if r["kind"] == kind for p in r["points"]]
        if points:
            ax.scatter([max(p[0], 1e-12) for p in points], [max(p[1], 1e-4) for p in points], s=10, color=color, label=kind, alpha=0.6)
    ax.fill_between([FALL, 1e2], GROWTH, 1e20, color="grey", alpha=0.15, label="ESCAPED")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-12, 1e2)
    ax.set_ylim(1e-4, 1e20)
    ax.set_xlabel("fall: ||f(z) - z|| (or eps ||f(z)||) over its largest value so far, where the relative test passes")
    ax.set_ylabel("growth: ||f(z)|| over its first value")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Where relative tests pass: maps without a fixed point (drift) and with one")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
