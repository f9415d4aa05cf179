"""Quality against size: GET and ViT students of several sizes, from one or more seed studies.

The paper's architectural claim is that a GET matches a much larger ViT. This subcommand puts
the students of ``study`` runs (same pairs, teacher and evaluation settings; typically the
``--student`` configs of GET and ViT presets at several widths) side by side: for each student
its parameters, its inference multiply-accumulates per image (a GET: its trained iterations),
FD-digits, teacher-match PSNR and class accuracy as mean +- std over the study's seeds, and for
every GET/ViT pair the difference of the mean FD-digits against the spread of the two.

    python -m examples.get_distillation scaling --study runs/scaling/a --study runs/scaling/b \\
        --out runs/scaling

Writes OUT/scaling.md, OUT/scaling.json and OUT/scaling.png (FD-digits and PSNR against
parameters and against MACs, one line per family, error bars one std). Refuses studies that
used other pairs, another teacher or other evaluation settings: their figures do not compare.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import cli, fileio, locks
from . import config as cfg
from .config import option
from .images import save_figure

# the settings every study must share for its figures to compare with another's
SHARED = ("pairs", "heldout", "teacher", "num_samples", "heun_steps")
METRICS = (("fd", "quality/fd_digits"), ("psnr", "teacher_match/psnr"), ("accuracy", "quality/class_accuracy"))


@cfg.settings
class ScalingConfig:
    """Each field is one command-line option (``cli.add_config_arguments``)."""

    out: str = option(help="folder for scaling.md, scaling.json and scaling.png")
    studies: list[str] = option(help="a study folder (holding study.json; repeatable, at least one)", flag="--study",
                                default_factory=list, default_text="none")

    def __post_init__(self) -> None:
        if not self.studies:
            raise ValueError("give at least one --study folder")
        for folder in self.studies:
            if not (Path(folder) / "study.json").is_file():
                raise ValueError(f"--study {folder!r}: no study.json there (run the study subcommand first)")


def collect(results: list[tuple[str, dict]]) -> dict[str, Any]:
    """One row per student of every study: ``{"teacher": {...}, "rows": [...]}``. ``results``
    holds (folder, study.json) pairs. Raises ValueError when the studies do not compare (other
    pairs, teacher or evaluation settings) or a student lacks a figure."""
    first_folder, first = results[0]
    for folder, result in results[1:]:
        for key in SHARED:
            a, b = first["config"].get(key), result["config"].get(key)
            if a != b:
                raise ValueError(f"studies {first_folder!r} and {folder!r} differ in {key} ({a!r} against {b!r}); "
                                 "their figures do not compare")
    teacher = first["figures"].get("teacher", {}).get("quality/fd_digits")
    rows = []
    for folder, result in results:
        models = {s["settings"]["model"]: s for s in result["students"]}
        for label, figures in result["figures"].items():
            if label == "teacher":
                continue
            model = label.split(" (")[0]
            if model not in models:
                raise ValueError(f"{folder}: no student settings for {label!r}")
            settings = models[model]["settings"]
            missing = [key for key in ("params", "macs", *(m for _, m in METRICS)) if key not in figures]
            if missing:
                raise ValueError(f"{folder}: {label} lacks {', '.join(missing)} (a study from before MACs were "
                                 "reported? rerun its evaluations)")
            row: dict[str, Any] = {"study": folder, "label": label, "model": model,
                                   "family": "GET" if model.startswith("GET") else "ViT",
                                   "params": figures["params"]["mean"], "macs": figures["macs"]["mean"],
                                   "steps": settings["steps"], "lr": settings.get("lr"), "seeds": result["seeds"]}
            for name, key in METRICS:
                row[name] = figures[key]
            if "train_seconds" in figures:
                row["train_seconds"] = figures["train_seconds"]["mean"]
            rows.append(row)
    if not rows:
        raise ValueError("the studies hold no students")
    labels = [r["label"] for r in rows]
    for r in rows:  # the same preset in two studies: name the study too
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} [{Path(r['study']).name}]"
    rows.sort(key=lambda r: (r["family"], r["params"]))
    return {"teacher_fd": teacher, "rows": rows, "comparisons": compare(rows)}


def compare(rows: list[dict]) -> list[dict]:
    """Every GET against every ViT: the difference of mean FD-digits (GET - ViT; negative: the
    GET is better), the sum of the two stds, and the verdict: "GET better" / "ViT better" when
    the difference exceeds that sum, else "level"."""
    out = []
    for g in (r for r in rows if r["family"] == "GET"):
        for v in (r for r in rows if r["family"] == "ViT"):
            diff = g["fd"]["mean"] - v["fd"]["mean"]
            noise = g["fd"]["std"] + v["fd"]["std"]
            verdict = "level" if not abs(diff) > noise else ("GET better" if diff < 0 else "ViT better")
            out.append({"get": g["label"], "vit": v["label"], "fd_difference": diff, "std_sum": noise,
                        "param_ratio": v["params"] / g["params"], "mac_ratio": v["macs"] / g["macs"],
                        "verdict": verdict})
    return out


def _pm(s: dict, digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown(table: dict) -> str:
    rows = table["rows"]
    seeds = sorted({len(r["seeds"]) for r in rows})
    lines = ["# GET and ViT against size", "",
             f"Each row: one student preset, trained on the same pairs over "
             f"{' / '.join(map(str, seeds))} seeds; mean +- sample std (min-max) over the seeds. MACs: multiply-"
             "accumulates per image of one network call (a GET's trained iterations included)."
             + (f" The teacher's FD-digits: {table['teacher_fd']['mean']:.2f}." if table.get("teacher_fd") else ""), "",
             "| student | params | MACs / image | steps | peak lr | FD-digits | teacher PSNR (dB) | class accuracy | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.3f}M | {r['macs'] / 1e6:.2f}M | {r['steps']} | {r['lr']:g} | {_pm(r['fd'])} | "
                     f"{_pm(r['psnr'])} | {_pm(r['accuracy'], 3)} | {seconds} |")
    if table["comparisons"]:
        lines += ["", "GET against ViT: the difference of mean FD-digits (GET - ViT; negative: the GET is better) "
                  "against the sum of the two stds; \"level\" when it is not larger.", "",
                  "| GET | ViT | ViT params / GET's | ViT MACs / GET's | FD difference | std sum | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in table["comparisons"]:
            lines.append(f"| {c['get']} | {c['vit']} | {c['param_ratio']:.2f}x | {c['mac_ratio']:.2f}x | "
                         f"{c['fd_difference']:+.2f} | {c['std_sum']:.2f} | {c['verdict']} |")
    lines += ["", "![quality against size](scaling.png)", ""]
    return "\n".join(lines)


def figure(table: dict) -> Any:
    """FD-digits and PSNR against parameters and against MACs: a line per family, error bars of
    one std, the teacher's FD-digits as a dotted line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.6))
    axes = fig.subplots(2, 2)
    for row_axes, (metric, ylabel) in zip(axes, (("fd", "FD-digits (lower is better)"),
                                                 ("psnr", "teacher-match PSNR (dB, higher is better)"))):
        for ax, (size, xlabel) in zip(row_axes, (("params", "parameters"), ("macs", "MACs per image (one call)"))):
            for i, family in enumerate(("GET", "ViT")):
                rows = [r for r in table["rows"] if r["family"] == family]
                if not rows:
                    continue
                ax.errorbar([r[size] for r in rows], [r[metric]["mean"] for r in rows],
                            yerr=[r[metric]["std"] for r in rows], fmt="-o", capsize=4, color=f"C{i}", label=family)
                for r in rows:
                    ax.annotate(r["model"].split("-")[1], (r[size], r[metric]["mean"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
            if metric == "fd" and table.get("teacher_fd"):
                ax.axhline(table["teacher_fd"]["mean"], color="grey", ls=":", lw=1, label="teacher")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    n = sorted({len(r["seeds"]) for r in table["rows"]})
    fig.suptitle(f"GET and ViT students against size (mean +- std over {' / '.join(map(str, n))} seeds)")
    fig.tight_layout()
    return fig


def run(config: ScalingConfig) -> dict[str, Any]:
    """Collect the studies and write the files into ``config.out`` (locked meanwhile)."""
    table = preflight(config)
    out = Path(config.out)
    with locks.folder_lock(out):
        save_figure(figure(table), out / "scaling.png")
        fileio.atomic_write_bytes(out / "scaling.json", json.dumps(table, indent=1, default=str).encode())
        fileio.atomic_write_bytes(out / "scaling.md", markdown(table).encode())
    return table


def preflight(config: ScalingConfig) -> dict[str, Any]:
    """Read the studies and check that they compare; returns the table."""
    results = [(folder, fileio.read_json(Path(folder) / "study.json", "study result")) for folder in config.studies]
    return collect(results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, ScalingConfig)


def _run(config: ScalingConfig) -> int:
    table = run(config)
    print(markdown(table))
    print(f"wrote {Path(config.out) / 'scaling.md'}, scaling.json, scaling.png")
    return 0


def main(args: argparse.Namespace) -> int:
    return cli.run(ScalingConfig, args, _run, check=preflight)
