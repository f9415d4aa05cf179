"""Evaluate one-step students against their teacher: quality, teacher match, speed, NFE sweep.

From the EMA weights of a training run (and, optionally, baseline runs trained on the same
pairs), this measures in one process:

- sample quality on the same seeded noise for every model and the teacher (35-NFE Heun):
  FD-digits, KID and class accuracy for digits, with the real-vs-real floor at the same N
  (standard FID needs the Inception weights, see ``metrics.fid_inception``);
- teacher match on held-out pairs: MSE and PSNR of the one-step output against the teacher's;
- throughput in images/s of each student and of the teacher at the same batch size;
- quality against inference cost for GET: teacher-match PSNR and FD-digits against the
  number of fixed-point iterations (1..12) with FixedPoint and with Anderson.

Writes OUT/report.md, OUT/report.json and PNGs (sample grids, the NFE sweep, loss curves).

    python -m examples.get_distillation evaluate --run runs/get --teacher runs/teacher/checkpoint.pt \\
        --heldout runs/pairs-heldout --out runs/eval --baseline runs/vit
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

import deqkit

from . import common, metrics, models, sampling
from .pairs import PairDataset
from .teacher import load_teacher
from .train import TrainConfig, load_student


@dataclasses.dataclass
class EvalConfig:
    run: str                            # the student's training run folder
    teacher: str                        # teacher checkpoint
    heldout: str                        # held-out pair folder (teacher outputs)
    out: str
    baselines: list = dataclasses.field(default_factory=list)  # other runs on the same pairs
    num_samples: int = 1000
    batch: int = 250
    heun_steps: int = 18
    nfe_max: int = 12
    sweep_samples: int = 500
    speed_repeats: int = 3
    seed: int = 0
    cache: str = "runs/cache"
    device: str = "cpu"


def _run_models(model: torch.nn.Module, noise: torch.Tensor, labels: Optional[torch.Tensor], batch: int,
                seed: int = 0, **kw) -> torch.Tensor:
    """One-step outputs in batches; GET's random start z0 is drawn from a generator seeded
    here, so an evaluation gives the same numbers every time it runs."""
    common.seed_everything(seed)
    outs = []
    with torch.no_grad():
        for i in range(0, len(noise), batch):
            lab = labels[i:i + batch] if labels is not None else None
            outs.append(model(noise[i:i + batch], lab, **kw).images)
    return torch.cat(outs)


def _teacher_samples(denoiser, noise, labels, steps: int, batch: int) -> torch.Tensor:
    sigmas = sampling.karras_sigmas(steps)
    outs = []
    with torch.no_grad():
        for i in range(0, len(noise), batch):
            lab = labels[i:i + batch] if labels is not None else None
            outs.append(sampling.sample_heun(denoiser, noise[i:i + batch] * sigmas[0], sigmas, labels=lab))
    return torch.cat(outs)


def _throughput(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _quality(images: torch.Tensor, labels: Optional[torch.Tensor], cache: str, digits: bool) -> dict[str, Any]:
    if not digits:
        return {"note": "FD-digits applies to the digits data; use metrics.fid_inception with local Inception weights"}
    return metrics.digits_report(images, labels, cache_dir=cache)


def evaluate(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    teacher, info = load_teacher(config.teacher, device)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    num_classes = info["num_classes"]
    digits = shape == (1, 8, 8)
    gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    noise = torch.randn((config.num_samples, *shape), generator=gen).to(device)  # (N, C, H, W)
    labels = (torch.arange(config.num_samples) % num_classes).to(device) if num_classes else None
    heldout = PairDataset(config.heldout, expect_shape=shape)
    h_items = [heldout[i] for i in range(len(heldout))]
    h_noise = torch.stack([it[0] for it in h_items]).to(device)
    h_target = torch.stack([it[1] for it in h_items]).to(device)
    h_labels = torch.stack([it[2] for it in h_items]).to(device) if num_classes else None

    report: dict[str, Any] = {"config": common.config_to_dict(config), "image_shape": list(shape),
                              "num_classes": num_classes, "teacher_nfe": sampling.heun_nfe(config.heun_steps)}
    # the teacher, on the same noise
    t_images = _teacher_samples(teacher, noise, labels, config.heun_steps, config.batch)
    speed_noise = noise[: config.batch]
    speed_labels = labels[: config.batch] if labels is not None else None
    t_seconds = _throughput(lambda: _teacher_samples(teacher, speed_noise, speed_labels, config.heun_steps, config.batch),
                            config.speed_repeats)
    report["teacher"] = {"quality": _quality(t_images, labels, config.cache, digits),
                         "images_per_second": config.batch / t_seconds}
    common.save_image_grid(t_images[:100], out / "samples_teacher.png", nrow=10, scale=4)

    rows = []
    runs = [config.run, *config.baselines]
    for run, label in zip(runs, _labels(runs)):
        model, tcfg = load_student(Path(run) / "checkpoint.pt", device)
        name = tcfg.model
        images = _run_models(model, noise, labels, config.batch)
        h_out = _run_models(model, h_noise, h_labels, config.batch)
        seconds = _throughput(lambda: _run_models(model, speed_noise, speed_labels, config.batch), config.speed_repeats)
        row = {
            "run": str(run), "model": name, "label": label or name, "params": models.count_params(model),
            "backward": tcfg.backward, "solver": tcfg.solver, "train_steps": tcfg.steps,
            "quality": _quality(images, labels, config.cache, digits),
            "teacher_match": {"mse": metrics.mse(h_out, h_target), "psnr": metrics.psnr(h_out, h_target),
                              "n": len(h_target)},
            "images_per_second": config.batch / seconds,
            "speedup_vs_teacher": t_seconds / seconds,
        }
        if "fd_digits" in row["quality"] and report["teacher"]["quality"].get("fd_digits"):
            row["fd_ratio_to_teacher"] = row["quality"]["fd_digits"] / report["teacher"]["quality"]["fd_digits"]
        if isinstance(model, models.GET):
            row["train_max_steps"] = tcfg.max_steps
            row["nfe_sweep"] = _nfe_sweep(model, h_noise, h_target, h_labels, noise, labels, config, digits)
        rows.append(row)
        common.save_image_grid(images[:100], out / f"samples_{_slug(row)}.png", nrow=10, scale=4)
    report["students"] = rows
    report["plots"] = _plots(report, runs, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(_markdown(report))
    return report


def _nfe_sweep(model, h_noise, h_target, h_labels, noise, labels, config: EvalConfig, digits: bool) -> dict[str, Any]:
    sweep: dict[str, Any] = {"nfe": list(range(1, config.nfe_max + 1))}
    n = min(config.sweep_samples, len(noise))
    for name, solver in (("FixedPoint", deqkit.FixedPoint()), ("Anderson(m=5)", deqkit.Anderson(m=5))):
        psnrs, fds = [], []
        for nfe in sweep["nfe"]:
            h_out = _run_models(model, h_noise, h_labels, config.batch, solver=solver, max_steps=nfe)
            psnrs.append(metrics.psnr(h_out, h_target))
            if digits:
                imgs = _run_models(model, noise[:n], labels[:n] if labels is not None else None, config.batch,
                                   solver=solver, max_steps=nfe)
                fds.append(metrics.digits_report(imgs, None, cache_dir=config.cache)["fd_digits"])
        sweep[name] = {"psnr": psnrs, "fd_digits": fds or None}
    sweep["fd_samples"] = n
    return sweep


def _labels(runs: list) -> list:
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


def _slug(row: dict) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in row["label"]).strip("_")


def _plots(report: dict, runs: list, out: Path) -> list[str]:
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
        name = f"nfe_sweep_{_slug(row)}.png"
        fig.savefig(out / name, dpi=110)
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
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    files.append("loss_curves.png")
    return files


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _markdown(report: dict) -> str:
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
            lines += ["", f"![NFE sweep](nfe_sweep_{_slug(row)}.png)"]
    lines += ["", "## Samples (same noise)", "", "![teacher](samples_teacher.png)"]
    for row in report["students"]:
        lines.append(f"![{row['label']}](samples_{_slug(row)}.png)")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig(run="", teacher="", heldout="", out="")
    parser.add_argument("--run", required=True, help="the student's training run folder")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--heldout", required=True, help="held-out pair folder")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--baseline", action="append", default=[], help="another run on the same pairs (repeatable)")
    parser.add_argument("--num-samples", type=int, default=d.num_samples)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--heun-steps", type=int, default=d.heun_steps)
    parser.add_argument("--nfe-max", type=int, default=d.nfe_max)
    parser.add_argument("--sweep-samples", type=int, default=d.sweep_samples)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cache", default=d.cache)
    parser.add_argument("--device", default=d.device)


def main(args: argparse.Namespace) -> int:
    config = EvalConfig(run=args.run, teacher=args.teacher, heldout=args.heldout, out=args.out,
                        baselines=args.baseline, num_samples=args.num_samples, batch=args.batch,
                        heun_steps=args.heun_steps, nfe_max=args.nfe_max, sweep_samples=args.sweep_samples,
                        seed=args.seed, cache=args.cache, device=args.device)
    report = evaluate(config)
    print(_markdown(report))
    print(f"wrote {Path(config.out) / 'report.md'} and report.json")
    return 0
