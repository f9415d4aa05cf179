"""Evaluate one-step students against their teacher: quality, teacher match, speed, NFE sweep.

From the EMA weights of a training run (and, optionally, baseline runs trained on the same
pairs), this measures in one process:

- sample quality on the same seeded noise for every model and the teacher (35-NFE Heun):
  FD-digits and class accuracy for digits, with the real-vs-real floor at the same N
  (standard FID needs the Inception weights, see ``metrics.fid_inception``);
- teacher match on held-out pairs: MSE and PSNR of the one-step output against the teacher's;
- throughput in images/s of each student and of the teacher at the same batch size;
- quality against inference cost for GET: teacher-match PSNR and FD-digits against the
  number of fixed-point iterations (1..12) with FixedPoint and with Anderson.

Writes OUT/report.md, OUT/report.json and PNGs (sample grids, the NFE sweep, loss curves;
drawn and written by ``report.py``).

Held-out pairs must be held out: ``evaluate`` refuses them if their seeds overlap the seeds
a student was trained on, if they were made by another teacher or sampler than the
student's training pairs, or by another teacher than ``--teacher``.

    python -m examples.get_distillation evaluate --run runs/get --teacher runs/teacher/checkpoint.pt \\
        --heldout runs/pairs-heldout --out runs/eval --baseline runs/vit
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

import deqkit

from . import checkpoints, cli, fileio, locks, metrics, models, runtime, sampling
from . import config as cfg
from .config import MAX_BATCH, MAX_SEED, MAX_STEPS, option
from .images import save_image_grid
from .pairs import PairDataset
from .report import markdown, run_labels, slug, write_report
from .teacher import load_teacher
from .train import load_student


@cfg.settings
class EvalConfig:
    """An evaluation; each field is one command-line option (``cli.add_config_arguments``)."""

    run: str = option(help="the student's training run folder")
    teacher: str = option(help="teacher checkpoint (the one that made the pairs)")
    heldout: str = option(help="held-out pair folder: same teacher and sampler, seeds disjoint from training")
    out: str = option(help="report folder")
    baselines: list[str] = option(help="another run on the same pairs (repeatable)", flag="--baseline",
                                  default_factory=list)
    num_samples: int = option(1000, help="samples per model for the quality metrics", ge=2, le=MAX_STEPS)
    batch: int = option(250, help="batch size (also of the speed measurement)", ge=1, le=MAX_BATCH)
    heun_steps: int = option(18, help="the teacher's Heun steps for its samples", ge=1, le=1000)
    nfe_max: int = option(12, help="largest number of fixed-point iterations in the NFE sweep", ge=1, le=1000)
    sweep_samples: int = option(500, help="samples per point of the NFE sweep's FD", ge=2, le=MAX_STEPS)
    speed_repeats: int = option(3, help="timed repeats of the speed measurement (median)", ge=1, le=1000)
    seed: int = option(0, help="seed of the sample noise", ge=0, le=MAX_SEED)
    cache: Optional[str] = option(None, help="the digits classifier's cache", default_text="OUT/cache")
    device: str = option("cpu", help="torch device")

    @property
    def cache_dir(self) -> str:
        return self.cache if self.cache is not None else str(Path(self.out) / "cache")


# the settings that determine an evaluation's figures (beside its checkpoints and pairs)
FIGURE_SETTINGS = ("num_samples", "batch", "heun_steps", "nfe_max", "sweep_samples", "speed_repeats", "seed", "device")


def evaluation_key(config: EvalConfig) -> str:
    """A hash of everything an evaluation's figures depend on: the sha256 of every student
    checkpoint (in order) and of the teacher's, the held-out manifest (which holds the sha256
    of every shard) and the evaluation settings. A report whose key equals this is current;
    file times play no part."""
    runs = [config.run, *config.baselines]
    return fileio.json_sha256({
        "students": [_checkpoint_sha256(Path(run) / "checkpoint.pt") for run in runs],
        "teacher": _checkpoint_sha256(Path(config.teacher)),
        "heldout": fileio.sha256_file(Path(config.heldout) / "manifest.json"),
        "settings": {k: getattr(config, k) for k in FIGURE_SETTINGS},
    })


def _checkpoint_sha256(path: Path) -> str:
    return checkpoints.recorded_sha256(path) or fileio.sha256_file(path)


def check_heldout(heldout: PairDataset, run: str, state: dict) -> None:
    """Raise ValueError unless ``heldout`` is held out for the student of ``state``: made by
    the same teacher and sampler as its training pairs, with seeds disjoint from theirs."""
    data = checkpoints.data_record(state, Path(run) / "checkpoint.pt")
    if data["teacher_id"] != heldout.teacher_id:
        raise ValueError(f"held-out pairs {str(heldout.root)!r} come from another teacher or sampler than the pairs "
                         f"{run} was trained on (teacher id {heldout.teacher_id[:12]}... vs {data['teacher_id'][:12]}...)")
    (a, b), (c, d) = data["seeds"], heldout.seeds
    if max(a, c) < min(b, d):
        raise ValueError(f"held-out pairs {str(heldout.root)!r} use seeds [{c}, {d}), which overlap the seeds "
                         f"[{a}, {b}) that {run} was trained on: they are not held out (make them with another "
                         "--seed-offset)")


def check_teacher(heldout: PairDataset, teacher: torch.nn.Module, path: str) -> None:
    """Raise ValueError unless the held-out pairs were made by the teacher at ``path``."""
    record = heldout.teacher
    same = (record["weights_sha256"] == checkpoints.state_sha256(teacher) if "weights_sha256" in record
            else record["sha256"] == fileio.sha256_file(path))
    if not same:
        raise ValueError(f"held-out pairs {str(heldout.root)!r} were made by another teacher than --teacher {path!r}")


def _run_models(model: torch.nn.Module, noise: torch.Tensor, labels: Optional[torch.Tensor], batch: int,
                seed: int = 0, **kw) -> torch.Tensor:
    """One-step outputs in batches; GET's random start z0 is drawn from a generator seeded
    here, so an evaluation gives the same numbers every time it runs."""
    runtime.seed_everything(seed)
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


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Measure the students of ``config.run`` and ``config.baselines`` against the teacher and
    write the report (see the module docstring); returns the report dict, whose ``key``
    (:func:`evaluation_key`) says what it measured. ``config.out`` is locked meanwhile."""
    inputs = _inputs(config)  # checked before anything is written
    with locks.folder_lock(config.out):
        return _evaluate(config, *inputs)


def _inputs(config: EvalConfig) -> tuple[torch.nn.Module, dict, PairDataset, dict[str, dict]]:
    """The teacher, its info, the held-out pairs and each run's checkpoint, checked against
    each other: what an evaluation verifies before it measures anything."""
    runtime.check_device(config.device)
    device = torch.device(config.device)
    teacher, info = load_teacher(config.teacher, device)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    heldout = PairDataset(config.heldout, expect_shape=shape)
    check_teacher(heldout, teacher, config.teacher)
    states = {run: checkpoints.load_checkpoint(Path(run) / "checkpoint.pt") for run in [config.run, *config.baselines]}
    for run, state in states.items():
        check_heldout(heldout, run, state)
    return teacher, info, heldout, states


def preflight(config: EvalConfig) -> None:
    _inputs(config)


def _evaluate(config: EvalConfig, teacher: torch.nn.Module, info: dict, heldout: PairDataset,
              states: dict[str, dict]) -> dict[str, Any]:
    out = Path(config.out)
    device = torch.device(config.device)
    key = evaluation_key(config)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    num_classes = info["num_classes"]
    runs = [config.run, *config.baselines]
    cache = config.cache_dir
    digits = shape == (1, 8, 8)
    gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    noise = torch.randn((config.num_samples, *shape), generator=gen).to(device)  # (N, C, H, W)
    labels = (torch.arange(config.num_samples) % num_classes).to(device) if num_classes else None
    h_items = [heldout[i] for i in range(len(heldout))]
    h_noise = torch.stack([it[0] for it in h_items]).to(device)
    h_target = torch.stack([it[1] for it in h_items]).to(device)
    h_labels = torch.stack([it[2] for it in h_items]).to(device) if num_classes else None

    report: dict[str, Any] = {"config": cfg.to_dict(config), "key": key, "image_shape": list(shape),
                              "num_classes": num_classes, "teacher_nfe": sampling.heun_nfe(config.heun_steps)}
    # the teacher, on the same noise
    t_images = _teacher_samples(teacher, noise, labels, config.heun_steps, config.batch)
    speed_noise = noise[: config.batch]
    speed_labels = labels[: config.batch] if labels is not None else None
    t_seconds = _throughput(lambda: _teacher_samples(teacher, speed_noise, speed_labels, config.heun_steps, config.batch),
                            config.speed_repeats)
    report["teacher"] = {"quality": _quality(t_images, labels, cache, digits),
                         "images_per_second": config.batch / t_seconds}
    save_image_grid(t_images[:100], out / "samples_teacher.png", nrow=10, labels=_first(labels, 100),
                           title=f"teacher: EDM Heun sampler, {report['teacher_nfe']} NFE "
                                 f"(the seeded noise every model gets)")

    rows = []
    students = {run: load_student(Path(run) / "checkpoint.pt", device, state=states[run]) for run in runs}
    for run, label in zip(runs, run_labels(runs, [students[run][1].model for run in runs])):
        model, tcfg = students[run]
        name = tcfg.model
        images = _run_models(model, noise, labels, config.batch)
        h_out = _run_models(model, h_noise, h_labels, config.batch)
        seconds = _throughput(lambda: _run_models(model, speed_noise, speed_labels, config.batch), config.speed_repeats)
        row = {
            "run": str(run), "model": name, "label": label or name, "params": models.count_params(model),
            "macs": models.macs(model),  # per image, one call (a GET: its trained iterations)
            "backward": tcfg.backward, "solver": tcfg.solver, "train_steps": tcfg.steps, "loss": tcfg.loss,
            "quality": _quality(images, labels, cache, digits),
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
        iterations = f", {tcfg.max_steps} fixed-point iterations" if isinstance(model, models.GET) else ""
        save_image_grid(images[:100], out / f"samples_{slug(row)}.png", nrow=10, labels=_first(labels, 100),
                               title=f"{row['label']}: one-step student, 1 NFE (one network call{iterations}), "
                                     f"same noise as the teacher")
    report["students"] = rows
    return write_report(report, runs, out)


def _first(labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if labels is None else labels[:n]


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
                fds.append(metrics.digits_report(imgs, None, cache_dir=config.cache_dir)["fd_digits"])
        sweep[name] = {"psnr": psnrs, "fd_digits": fds or None}
    sweep["fd_samples"] = n
    return sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, EvalConfig)


def _run(config: EvalConfig) -> int:
    report = evaluate(config)
    print(markdown(report))
    print(f"wrote {Path(config.out) / 'report.md'} and report.json")
    return 0


def main(args: argparse.Namespace) -> int:
    return cli.run(EvalConfig, args, _run, check=preflight)
