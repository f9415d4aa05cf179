"""The evaluation report: run labels, plots (NFE sweeps, loss curves) and report.md / report.json.

:func:`write_report` takes the dict that :func:`evaluate.evaluate` measures and writes every
file atomically (a temporary name, then a rename), so a kill never leaves half a report.
Measuring lives in ``evaluate.py``; this module only draws and writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from . import common
from .train import TrainConfig


def write_report(report: dict, runs: list, out: str | Path) -> dict:
    """Plot, then write ``report.json`` and ``report.md`` into ``out``; returns ``report``
    with ``report["plots"]`` (the PNG names) filled in."""
    out = Path(out)
    report["plots"] = plots(report, runs, out)
    common.atomic_write_bytes(out / "report.json", json.dumps(report, indent=1, default=str).encode())
    common.atomic_write_bytes(out / "report.md", markdown(report).encode())
    return report


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    common.atomic_write_bytes(path, buffer.getvalue())


def run_labels(runs: list) -> list:
    """None for a run whose preset is unique among ``runs`` (labelled by the preset), else
    "preset (folder)" (with its position when folder names repeat too), so that runs of one
    preset get their own rows, grids and plots."""
    def preset(run: str) -> str:
        path = Path(run) / "config.json"
        if path.exists():
            return common.load_config(TrainConfig, path).model
        return common.load_checkpoint(Path(run) / "checkpoint.pt")["config"]["model"]

    presets = [preset(run) for run in runs]
    labels = [None if presets.count(p) == 1 else f"{p} ({Path(run).name})" for p, run in zip(presets, runs)]
    return [f"{label} #{i + 1}" if label is not None and labels.count(label) > 1 else label
            for i, label in enumerate(labels)]


def slug(row: dict) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in row["label"]).strip("_")


def plots(report: dict, runs: list, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for row in report["students"]:
        sweep = row.get("nfe_sweep")
        if not sweep:
            continue
        panels = [("psnr", "teacher-match PSNR (dB)")]
        if sweep["FixedPoint"]["fd_digits"]:
            panels.append(("fd_digits", f"FD-digits (N={sweep['fd_samples']})"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (key, ylabel) in zip(axes[0], panels):
            for solver in ("FixedPoint", "Anderson(m=5)"):
                ax.plot(sweep["nfe"], sweep[solver][key], "-o", ms=3, label=solver)
            ax.axvline(row.get("train_max_steps", 6), color="grey", ls=":", lw=0.8)
            ax.set_xlabel("fixed-point iterations (NFE of the equilibrium part)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{row['label']}: quality against inference cost")
        fig.tight_layout()
        name = f"nfe_sweep_{slug(row)}.png"
        _save_figure(fig, out / name)
        plt.close(fig)
        files.append(name)
    # loss curves of every run
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, row in zip(runs, report["students"]):
        log = Path(run) / "log.jsonl"
        if log.exists():
            recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=row["label"])
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (fixed-point corrected L1)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, out / "loss_curves.png")
    plt.close(fig)
    files.append("loss_curves.png")
    return files


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    t = report["teacher"]
    tq = t["quality"]
    lines = ["# GET distillation: evaluation report", ""]
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
