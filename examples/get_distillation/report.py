"""The evaluation report: run labels, plots (NFE sweeps, loss curves) and report.md / report.json.

:func:`write_report` takes the dict that :func:`evaluate.evaluate` measures and writes every
file atomically (a temporary name, then a rename), so a kill never leaves half a report.
Measuring lives in ``evaluate.py``; this module only draws and writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import fileio
from .images import save_figure


def write_report(report: dict, runs: list, out: str | Path) -> dict:
    """Plot, then write ``report.json`` and ``report.md`` into ``out``; returns ``report``
    with ``report["plots"]`` (the PNG names) filled in."""
    out = Path(out)
    report["plots"] = plots(report, runs, out)
    fileio.atomic_write_bytes(out / "report.json", json.dumps(report, indent=1, default=str).encode())
    fileio.atomic_write_bytes(out / "report.md", markdown(report).encode())
    return report


def run_labels(runs: list, presets: list[str]) -> list:
    """None for a run whose preset (``presets``, from the checkpoint the run's model is loaded
    from) is unique among ``runs`` (labelled by the preset), else "preset (folder)" (with its
    position when folder names repeat too), so that runs of one preset get their own rows,
    grids and plots."""
    labels = [None if presets.count(p) == 1 else f"{p} ({Path(run).name})" for p, run in zip(presets, runs)]
    return [f"{label} #{i + 1}" if label is not None and labels.count(label) > 1 else label
            for i, label in enumerate(labels)]


def slug(row: dict) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in row["label"]).strip("_")


SOLVERS = ("FixedPoint", "Anderson(m=5)")


def nfe_sweep_figure(row: dict) -> Any:
    """One student's quality against its fixed-point iterations: teacher-match PSNR and (on
    digits) FD-digits, a line per solver; the dotted line marks the iterations it trained with."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    sweep = row["nfe_sweep"]
    panels = [("psnr", "teacher-match PSNR (dB, higher is better)",
               f"match to the teacher on {row['teacher_match']['n']} held-out pairs")]
    if sweep["FixedPoint"]["fd_digits"]:
        panels.append(("fd_digits", "FD-digits (feature units, lower is better)",
                       f"sample quality, N = {sweep['fd_samples']} samples"))
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    trained = row.get("train_max_steps", 6)
    for ax, (key, ylabel, title) in zip(axes, panels):
        for solver in SOLVERS:
            ax.plot(sweep["nfe"], sweep[solver][key], "-o", ms=3, label=f"{solver} solver")
        ax.axvline(trained, color="grey", ls=":", lw=0.8, label=f"trained with {trained} iterations")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xlabel("fixed-point iterations at inference (NFE of the equilibrium part)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{row['label']}: quality against inference cost")
    fig.tight_layout()
    return fig


def _log_records(run: str | Path) -> list[dict]:
    return fileio.read_jsonl(Path(run) / "log.jsonl")


def loss_figure(runs: list, rows: list[dict]) -> Any:
    """Every run's loss on its output image alone (the last iterate, the image it returns) against
    the training step: the one training quantity that is the same for a GET and a ViT. (The
    objective a GET optimises is the fixed-point-corrected sum over its iterates, a different
    scale; it stays in each run's log.jsonl as ``loss``.)"""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    kinds, missing = set(), []
    for run, row in zip(runs, rows):
        recs = _log_records(run)
        kind = row.get("loss", "l1")  # the loss of the checkpoint's config
        points = [(r["step"], r["output_loss"]) for r in recs if "output_loss" in r]  # older logs lack it
        if not points:
            missing.append(row["label"])
            continue
        kinds.add(kind.upper())
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{row['label']} ({kind.upper()} of its output)")
    kind = "/".join(sorted(kinds)) or "L1"
    ax.set_xlabel("training step (optimizer updates)")
    ax.set_ylabel(f"{kind} of the output image to the teacher's\n(pixel values in [-1, 1], log scale)")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_title("training loss of the output image (same quantity for every model)"
                 + (f"\nnot logged: {', '.join(missing)}" if missing else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plain_log_ticks(ax: Any) -> None:
    """Tick labels of a log y axis as plain numbers ("0.5", not "5 x 10^-1"); within one decade
    every minor tick is labelled, over more only 2x and 5x the powers of ten."""
    import math

    from matplotlib import ticker

    low, high = ax.get_ylim()
    narrow = low > 0 and high / low < 10

    def minor(value: float, _pos: Any) -> str:
        if value <= 0:
            return ""
        lead = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if narrow or lead in (2, 5) else ""

    ax.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def plots(report: dict, runs: list, out: Path) -> list[str]:
    files = []
    for row in report["students"]:
        if not row.get("nfe_sweep"):
            continue
        name = f"nfe_sweep_{slug(row)}.png"
        save_figure(nfe_sweep_figure(row), out / name)
        files.append(name)
    save_figure(loss_figure(runs, report["students"]), out / "loss_curves.png")
    files.append("loss_curves.png")
    return files


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    t = report["teacher"]
    tq = t["quality"]
    lines = ["# GET distillation: evaluation report", ""]
    if report.get("smoke_test"):
        lines += [f"> **A smoke test, not results.** {report['smoke_test']}", ""]
    lines += [f"Images {tuple(report['image_shape'])}, classes: {report['num_classes']}. "
              f"Teacher: EDM Heun, {report['teacher_nfe']} NFE. Samples: {tq.get('n', '-')} per model, same seeded noise.", ""]
    lines += ["| model | params | NFE | FD-digits | FD / teacher's | class acc. | teacher PSNR (dB) | images/s | speed-up |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| teacher (Heun) | - | {report['teacher_nfe']} | {_fmt(tq.get('fd_digits'))} | 1.00 | "
                 f"{_fmt(tq.get('class_accuracy'), '.3f')} | - | {_fmt(t['images_per_second'], '.0f')} | 1.0x |")
    for row in report["students"]:
        q = row["quality"]
        lines.append(f"| {row['label']} | {row['params'] / 1e6:.2f}M | 1 | {_fmt(q.get('fd_digits'))} | "
                     f"{_fmt(row.get('fd_ratio_to_teacher'))} | "
                     f"{_fmt(q.get('class_accuracy'), '.3f')} | {_fmt(row['teacher_match']['psnr'])} | "
                     f"{_fmt(row['images_per_second'], '.0f')} | {_fmt(row['speedup_vs_teacher'], '.1f')}x |")
    if "fd_floor" in tq:
        lines += ["", f"Real-vs-real floor at the same N ({tq['floor_kind']}): FD-digits {tq['fd_floor']:.2f}. "
                  f"Feature classifier test accuracy {tq['classifier_test_accuracy']:.3f}. "
                  "Frechet distances are comparable only at equal N."]
    for row in report["students"]:
        sweep = row.get("nfe_sweep")
        if sweep:
            lines += ["", f"## {row['label']}: quality against fixed-point iterations", "",
                      f"PSNR against the teacher on the {row['teacher_match']['n']} held-out pairs; FD-digits "
                      f"on {sweep.get('fd_samples', '-')} samples (compare it only with FDs at that N). "
                      f"The student was trained with {row.get('train_max_steps', '-')} iterations.", "",
                      "| NFE | " + " | ".join(str(n) for n in sweep["nfe"]) + " |",
                      "|---|" + "---|" * len(sweep["nfe"])]
            for solver in ("FixedPoint", "Anderson(m=5)"):
                lines.append(f"| PSNR, {solver} | " + " | ".join(f"{v:.2f}" for v in sweep[solver]["psnr"]) + " |")
                if sweep[solver]["fd_digits"]:
                    lines.append(f"| FD, {solver} | " + " | ".join(f"{v:.2f}" for v in sweep[solver]["fd_digits"]) + " |")
            lines += ["", f"![NFE sweep](nfe_sweep_{slug(row)}.png)"]
    lines += ["", "## Samples (same noise)", "", "![teacher](samples_teacher.png)"]
    for row in report["students"]:
        lines.append(f"![{row['label']}](samples_{slug(row)}.png)")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)
