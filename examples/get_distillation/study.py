"""The student stage over several seeds: mean and spread of every figure of the report.

On existing pairs, train each student (by default the demo's two: GET-Tiny/4 and ViT-Tiny/4
with the demo's recipe; or the settings of train config files, e.g. a run's ``config.json``)
once per training seed, evaluate each seed's students together (``evaluate``, the same
evaluation settings and sample noise for every seed, so only the training seed varies), then
aggregate: for every figure of the report (each student's FD-digits, class accuracy, PSNR, MSE,
speed, every point of its NFE sweep, its training time; the teacher's), the mean, the sample
standard deviation (n - 1; 0 for one seed), the minimum and maximum, and every seed's value.

    python -m examples.get_distillation study --pairs runs/demo/pairs --heldout runs/demo/pairs-heldout \\
        --teacher runs/demo/teacher/checkpoint.pt --out runs/study --threads 1
    python -m examples.get_distillation study ... --student runs/get-eq/config.json --seeds 5

Writes OUT/study.md (a table per student), OUT/study.json and OUT/study.png, and keeps each
seed's runs and report in OUT/seed-S/. Rerun the same command after a kill: finished runs are
kept, unfinished ones resume, and a seed's evaluation is redone unless its report's key (a
hash of the checkpoints, the teacher, the held-out manifest and the evaluation settings:
``evaluate.evaluation_key``) is that of this run. OUT is locked while the study runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from . import cli, evaluate, fileio, locks, models, runtime, train
from . import config as cfg
from .config import MAX_BATCH, MAX_SEED, MAX_STEPS, option
from .images import save_figure

# report keys that describe a run rather than measure it: left out of the aggregate
NOT_FIGURES = {"config", "key", "image_shape", "num_classes", "teacher_nfe", "run", "model", "label", "backward", "solver",
               "train_steps", "train_max_steps", "n", "nfe", "fd_samples", "floor_kind", "plots", "note",
               "classifier_test_accuracy"}


@cfg.settings
class StudyConfig:
    """A seed study; each field is one command-line option (``cli.add_config_arguments``)."""

    pairs: str = option(help="training pair folder (from the pairs subcommand)")
    heldout: str = option(help="held-out pair folder (same teacher, other seeds)")
    teacher: str = option(help="the teacher checkpoint that made the pairs")
    out: str = option(help="study folder (rerun to resume)")
    students: list[str] = option(help="a train config file (e.g. a run's config.json) whose settings one student "
                                 "takes; its pairs, out and seed are the study's (repeatable)", flag="--student",
                                 default_factory=list, default_text="the demo's GET-Tiny/4 and ViT-Tiny/4 recipe")
    seeds: int = option(3, help="number of training seeds", ge=1, le=1000)
    first_seed: int = option(0, help="the seeds are FIRST_SEED .. FIRST_SEED + SEEDS - 1", ge=0, le=MAX_SEED - 1000)
    steps: Optional[int] = option(None, help="override every student's training steps",
                                  default_text="each student's own", ge=1, le=MAX_STEPS)
    num_samples: int = option(1000, help="evaluation: samples per model for the quality metrics", ge=2, le=MAX_STEPS)
    batch: int = option(250, help="evaluation: batch size", ge=1, le=MAX_BATCH)
    heun_steps: int = option(18, help="evaluation: the teacher's Heun steps for its samples", ge=1, le=1000)
    nfe_max: int = option(12, help="evaluation: largest number of fixed-point iterations in the NFE sweep", ge=1, le=1000)
    sweep_samples: int = option(500, help="evaluation: samples per point of the NFE sweep's FD", ge=2, le=MAX_STEPS)
    speed_repeats: int = option(3, help="evaluation: timed repeats of the speed measurement (median)", ge=1, le=1000)
    device: Optional[str] = option(None, help="torch device of training and evaluation",
                                   default_text="cuda if available, else cpu")

    def __post_init__(self) -> None:
        for path in self.students:
            if not Path(path).is_file():
                raise ValueError(f"--student {path!r}: no such train config file")


def demo_students() -> list[train.TrainConfig]:
    """The demo's student stage: GET-Tiny/4 and ViT-Tiny/4 with its recipe (pairs/out set later)."""
    from .demo import DemoConfig

    d = DemoConfig()
    steps = d.student_steps
    return [train.TrainConfig(pairs="", out=model.replace("/", "_"), model=model, lr=d.student_lr, lr_schedule="cosine",
                              warmup=d.student_warmup, grad_clip=d.student_grad_clip, batch=d.student_batch, steps=steps,
                              ema_decay=d.ema_decay, log_every=max(steps // 100, 1), sample_every=steps,
                              output_norm=d.output_norm and models.PRESETS[model]["family"] == "GET",
                              ckpt_every=max(steps // 6, 1))
            for model in (d.student, d.baseline)]


def student_configs(config: StudyConfig) -> list[tuple[str, train.TrainConfig]]:
    """(folder name, settings) of each student, before its pairs, out and seed are set."""
    if not config.students:
        named = [(c.out, c) for c in demo_students()]
    else:
        named = [(Path(p).parent.name or Path(p).stem, cfg.load(train.TrainConfig, p)) for p in config.students]
    names: list[str] = []
    for name, _ in named:  # unique folder names, in order
        base, i = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "student", 2
        name = base
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return [(name, c) for name, (_, c) in zip(names, named)]


def run_config(base: train.TrainConfig, config: StudyConfig, folder: Path, seed: int) -> train.TrainConfig:
    values = cfg.to_dict(base)
    values.update(pairs=config.pairs, out=str(folder), seed=seed, device=config.device)
    if config.steps is not None:
        values.update(steps=config.steps, log_every=min(base.log_every, config.steps),
                      sample_every=config.steps, ckpt_every=min(base.ckpt_every, config.steps))
    return cfg.from_dict(train.TrainConfig, values)


def _train_seconds(run: Path) -> Optional[float]:
    records = fileio.read_jsonl(run / "log.jsonl")
    return records[-1].get("seconds") if records else None


def eval_config(config: StudyConfig, runs: list[Path], out: Path) -> evaluate.EvalConfig:
    """The evaluation of one seed's runs: the study's settings, the same sample noise for every seed."""
    return evaluate.EvalConfig(run=str(runs[0]), baselines=[str(r) for r in runs[1:]], teacher=config.teacher,
                               heldout=config.heldout, out=str(out), num_samples=config.num_samples,
                               batch=config.batch, heun_steps=config.heun_steps, nfe_max=config.nfe_max,
                               sweep_samples=config.sweep_samples, speed_repeats=config.speed_repeats,
                               seed=0, cache=str(Path(config.out) / "cache"), device=config.device or "cpu")


def run_study(config: StudyConfig, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every seed, aggregate, write the files; returns the study's dict.
    ``config.out`` is locked meanwhile."""
    with locks.folder_lock(config.out):
        return _run_study(config, progress)


def _run_study(config: StudyConfig, progress: bool) -> dict[str, Any]:
    out = Path(config.out)
    cfg.save(out / "study_config.json", config)
    students = student_configs(config)
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    reports = []
    for seed in seeds:
        folder = out / f"seed-{seed}"
        runs = []
        for name, base in students:
            tcfg = run_config(base, config, folder / name, seed)
            print(f"== seed {seed}: training {name} ({tcfg.model}, {tcfg.steps} steps) ==", flush=True)
            train.train(tcfg, progress=progress)
            runs.append(folder / name)
        ecfg = eval_config(config, runs, folder / "eval")
        report_path = folder / "eval" / "report.json"
        report = fileio.read_json(report_path, "seed report") if report_path.exists() else None
        if not isinstance(report, dict) or report.get("key") != evaluate.evaluation_key(ecfg):
            print(f"== seed {seed}: evaluation ==", flush=True)
            report = evaluate.evaluate(ecfg)
        for row, run in zip(report["students"], runs):
            row["train_seconds"] = _train_seconds(run)
        reports.append(report)
    figures, missing = aggregate(reports)
    result = {"config": cfg.to_dict(config), "seeds": seeds,
              "students": [{"name": name, "settings": cfg.to_dict(run_config(c, config, out / name, seeds[0]))}
                           for name, c in students],
              "figures": figures, "missing": missing}
    save_figure(figure(result), out / "study.png")
    fileio.atomic_write_bytes(out / "study.json", json.dumps(result, indent=1, default=str).encode())
    fileio.atomic_write_bytes(out / "study.md", markdown(result).encode())
    return result


# -- aggregation ------------------------------------------------------------------------------
def figures_of(report: dict) -> dict[str, dict[str, float]]:
    """Every figure of one evaluation report: ``{"teacher": {"quality/fd_digits": ...}, "<student
    label>": {"teacher_match/psnr": ..., "nfe_sweep/FixedPoint/psnr/nfe=3": ...}}``. Numbers
    only (not flags); keys that describe the run (``NOT_FIGURES``) are left out."""
    found: dict[str, dict[str, float]] = {}

    def walk(into: dict[str, float], node: Any, path: str, nfe: Optional[list]) -> None:
        if isinstance(node, bool) or node is None:
            return
        if isinstance(node, (int, float)):
            into[path] = float(node)
        elif isinstance(node, dict):
            nfe = node.get("nfe", nfe)
            for key, value in node.items():
                if key not in NOT_FIGURES:
                    walk(into, value, f"{path}/{key}" if path else key, nfe)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(into, value, f"{path}/nfe={nfe[i]}" if nfe is not None and i < len(nfe) else f"{path}/{i}", nfe)

    if "teacher" in report:
        walk(found.setdefault("teacher", {}), report["teacher"], "", None)
    for row in report.get("students", []):
        walk(found.setdefault(row.get("label") or row["model"], {}), row, "", None)
    return found


def spread(values: list[float]) -> dict[str, Any]:
    """mean, sample std (n - 1; 0 for one value), min, max and the values; a non-finite value
    makes every statistic NaN."""
    if not values:
        raise ValueError("spread of no values")
    if not all(math.isfinite(v) for v in values):
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan, "values": values}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def aggregate(reports: list[dict]) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """``({group: {figure: spread over the reports}}, missing)``, one report per seed: every
    figure found in all the reports; ``missing`` names ("group: figure") those that some lack."""
    if not reports:
        raise ValueError("aggregate needs at least one report")
    per_seed = [figures_of(r) for r in reports]
    result: dict[str, dict[str, dict[str, Any]]] = {}
    missing: set[str] = set()
    for f in per_seed:
        for group, figs in f.items():
            for key in figs:
                if all(key in other.get(group, {}) for other in per_seed):
                    result.setdefault(group, {})[key] = None  # type: ignore[assignment]
                else:
                    missing.add(f"{group}: {key}")
    for group, figs in result.items():
        for key in figs:
            figs[key] = spread([f[group][key] for f in per_seed])
    return result, sorted(missing)


# -- writing ----------------------------------------------------------------------------------
def _g(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = ["# GET distillation: the student stage over seeds", "",
             f"Training seeds {', '.join(map(str, seeds))} ({len(seeds)} runs of each student, on the same pairs); "
             "each seed's students evaluated with the same settings and sample noise. std: sample standard "
             "deviation (n - 1).", ""]
    for s in result["students"]:
        c = s["settings"]
        extra = [f"{k}={c[k]}" for k in ("output_norm", "jac_reg", "min_steps") if c.get(k) not in (None, False, 0, 0.0)]
        lines.append(f"- `{s['name']}`: {c['model']}, {c['steps']} steps, batch {c['batch']}, lr {c['lr']} "
                     f"({c['lr_schedule']})" + (f", solver {c['solver']}, {c['max_steps']} iterations, backward "
                                                f"{c['backward']}" if c['model'].startswith("GET") else "")
                     + (", " + ", ".join(extra) if extra else ""))
    for group, figs in result["figures"].items():
        lines += ["", f"## {group}", "", "| figure | mean | std | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|---|---|---|" + "---|" * len(seeds)]
        for key, v in figs.items():
            lines.append(f"| {key} | {_g(v['mean'])} | {_g(v['std'])} | {_g(v['min'])} | {_g(v['max'])} | "
                         + " | ".join(_g(x) for x in v["values"]) + " |")
    if result.get("missing"):
        lines += ["", "Figures not in every seed's report (left out): " + ", ".join(result["missing"])]
    lines += ["", "![seeds](study.png)", ""]
    return "\n".join(lines)


def figure(result: dict) -> Any:
    """Per student: FD-digits and PSNR of every seed (dots) with mean +- std; and each GET's
    mean NFE sweep (FixedPoint PSNR) with its min-max band over the seeds."""
    from matplotlib.figure import Figure

    figures = result["figures"]
    labels = [g for g in figures if g != "teacher"]
    panels = [(m, t) for m, t in (("quality/fd_digits", "FD-digits (lower is better)"),
                                  ("teacher_match/psnr", "teacher-match PSNR (dB)"))
              if any(m in figures[lab] for lab in labels)]
    prefix = "nfe_sweep/FixedPoint/psnr/nfe="
    sweeps = {lab: sorted(((int(k[len(prefix):]), v) for k, v in figures[lab].items() if k.startswith(prefix)),
                          key=lambda t: t[0]) for lab in labels}
    sweeps = {lab: pts for lab, pts in sweeps.items() if pts}
    count = max(len(panels) + bool(sweeps), 1)
    fig = Figure(figsize=(4.6 * count, 4.2))
    axes = fig.subplots(1, count, squeeze=False)[0]
    for ax, (metric, title) in zip(axes, panels):
        for i, lab in enumerate(labels):
            v = figures[lab].get(metric)
            if v is None:
                continue
            ax.plot([i] * len(v["values"]), v["values"], "o", color=f"C{i}", alpha=0.6)
            ax.errorbar([i + 0.15], [v["mean"]], yerr=[[v["std"]], [v["std"]]], fmt="s", color=f"C{i}", capsize=4)
        t = figures.get("teacher", {}).get(metric)
        if t is not None:
            ax.axhline(t["mean"], color="grey", ls=":", lw=0.8, label="teacher")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=15)
        ax.set_title(f"{title}\n(dots: seeds; square: mean +- std)", fontsize=9)
        ax.grid(alpha=0.3)
    if sweeps:
        ax = axes[len(panels)]
        for i, lab in enumerate(labels):
            if lab not in sweeps:
                continue
            nfe = [p[0] for p in sweeps[lab]]
            ax.plot(nfe, [p[1]["mean"] for p in sweeps[lab]], "-o", ms=3, color=f"C{i}", label=lab)
            ax.fill_between(nfe, [p[1]["min"] for p in sweeps[lab]], [p[1]["max"] for p in sweeps[lab]],
                            color=f"C{i}", alpha=0.2)
        ax.set_xlabel("fixed-point iterations (FixedPoint)")
        ax.set_title("teacher-match PSNR against iterations\n(mean, min-max band over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"student stage over {len(result['seeds'])} seeds")
    fig.tight_layout()
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, StudyConfig)


def _run(config: StudyConfig) -> int:
    t0 = time.perf_counter()
    result = run_study(config, progress=False)
    print(markdown(result))
    print(f"study of {len(result['seeds'])} seeds in {time.perf_counter() - t0:.0f} s: "
          f"{Path(config.out) / 'study.md'}, study.json, study.png")
    return 0


def preflight(config: StudyConfig) -> None:
    """What a study checks before its work: the device, the teacher, the pairs and the
    held-out pairs, and every student's settings on these pairs."""
    from .pairs import PairDataset
    from .teacher import load_teacher

    runtime.check_device(config.device)
    load_teacher(config.teacher)
    for folder in (config.pairs, config.heldout):
        PairDataset(folder, verify="none")
    for name, base in student_configs(config):
        train.check_data(run_config(base, config, Path(config.out) / name, config.first_seed),
                         PairDataset(config.pairs, verify="none"))


def main(args: argparse.Namespace) -> int:
    return cli.run(StudyConfig, args, _run, check=preflight)
