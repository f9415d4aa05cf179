"""The end-to-end demo on the bundled digits: teacher -> pairs -> GET student (+ ViT) -> report.

    python -m examples.get_distillation demo --out runs/demo           # 17-20 min on 2 CPU cores
    python -m examples.get_distillation demo --quick                   # a smoke test, 15-20 s on 2 shared cores, in runs/demo-quick
    python -m examples.get_distillation demo --quick --student-steps 100   # any size is an option

Every stage writes into OUT and is reused when the demo is rerun (the teacher and the
students resume from their checkpoints, pair generation skips finished shards), so a killed
demo continues where it stopped. The last stage always re-evaluates and writes
OUT/report.md and OUT/report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from pathlib import Path
from typing import Callable

import torch

from . import cli, evaluate, fileio, locks, models, pairs, runtime, teacher, train
from . import config as cfg
from .config import MAX_BATCH, MAX_SEED, MAX_STEPS, option


HELDOUT_SEED_OFFSET = 10_000_000  # held-out pairs never share a seed with training pairs


@cfg.settings
class DemoConfig:
    """Sizes of every stage; ``quick()`` shrinks them for the tests. Each field is one
    command-line option (``cli.add_config_arguments``); ``--quick`` starts from ``quick()``."""

    out: str = option("runs/demo", help="demo folder (rerun to reuse finished stages)",
                      default_text="runs/demo, or runs/demo-quick with --quick, so the two never share stages")
    teacher_preset: str = option("digits", help="teacher backbone size", choices=("tiny", "digits", "cifar-small"))
    teacher_steps: int = option(2000, help="teacher training steps", ge=1, le=MAX_STEPS)
    teacher_batch: int = option(128, help="teacher batch size", ge=1, le=MAX_BATCH)
    num_pairs: int = option(20000, help="training pairs", ge=1, le=MAX_STEPS)
    num_heldout: int = option(500, help="held-out pairs (seeds from 10,000,000)", ge=2, le=HELDOUT_SEED_OFFSET)
    heun_steps: int = option(18, help="the teacher's Heun steps (NFE = 2 steps - 1)", ge=1, le=1000)
    student: str = option("GET-Tiny/4", help="the student preset", choices=lambda: list(models.PRESETS))
    baseline: str = option("ViT-Tiny/4", help="the baseline preset", choices=lambda: list(models.PRESETS))
    output_norm: bool = option(True, help="end the GET student's map with a LayerNorm (train's --output-norm: a map "
                               "with a fixed point that the solvers reach, quality level with GET's own recipe over "
                               "3 seeds); --no-output-norm: GET's own recipe")
    student_steps: int = option(7500, help="student training steps", ge=1, le=MAX_STEPS)
    student_batch: int = option(64, help="student batch size", ge=1, le=MAX_BATCH)
    student_lr: float = option(2e-3, help="students' peak lr: linear warm-up, then cosine decay to 0", gt=0, le=10)
    student_warmup: int = option(200, help="students' warm-up steps", ge=0, le=MAX_STEPS)
    student_grad_clip: float = option(1.0, help="students' gradient-norm clip", gt=0, le=1e6)
    parallel_students: bool = option(True, help="train the GET and the ViT at the same time, in two processes "
                                     "(--sequential: one after the other; the same figures)")
    train_threads: int = option(2, help="torch threads of the teacher's training, the pairs and the evaluation; each "
                                "student trains with one. Fixed, not the machine's core count: training's results "
                                "depend on the thread count", ge=1, le=64)
    hand_over: bool = option(False, help="side by side, the student that finishes first leaves its thread to the "
                             "other (about 25 s sooner on 2 cores; that student's figures then depend on the step at "
                             "which the other finished)")
    ema_decay: float = option(0.999, help="students' EMA decay", ge=0, lt=1)
    eval_samples: int = option(1000, help="samples per model for the quality metrics", ge=2, le=MAX_STEPS)
    sweep_samples: int = option(500, help="samples per point of the NFE sweep's FD", ge=2, le=MAX_STEPS)
    nfe_max: int = option(12, help="largest number of fixed-point iterations in the NFE sweep", ge=1, le=1000)
    seed: int = option(0, help="seed of every stage", ge=0, le=MAX_SEED)

    @classmethod
    def quick(cls, out: str = "runs/demo-quick") -> "DemoConfig":
        return cls(out=out, teacher_preset="tiny", teacher_steps=30, teacher_batch=32, num_pairs=128,
                   num_heldout=32, heun_steps=4, student_steps=15, student_batch=16, student_warmup=3, eval_samples=300,
                   sweep_samples=300, nfe_max=3)


def smoke_test_note(config: DemoConfig) -> str | None:
    """None at the full demo's sizes; else a sentence saying that this run's figures are a smoke
    test of the pipeline, not results, and which sizes are below the full demo's."""
    full = DemoConfig()
    hints = typing.get_type_hints(DemoConfig)
    smaller = [f"{f.name.replace('_', '-')} {getattr(config, f.name)} (full: {getattr(full, f.name)})"
               for f in dataclasses.fields(DemoConfig)
               if hints[f.name] is int and f.name not in ("seed", "train_threads")
               and getattr(config, f.name) < getattr(full, f.name)]
    if config.teacher_preset == "tiny" and full.teacher_preset != "tiny":
        smaller.insert(0, f"teacher-preset tiny (full: {full.teacher_preset})")
    if not smaller:
        return None
    teacher = (" (the teacher is barely trained: expect a class accuracy near chance and FDs in the "
               "hundreds or more)") if config.teacher_steps < full.teacher_steps else ""
    return ("These sizes are below the full demo's, so the numbers and figures only show that every "
            f"stage runs{teacher}. For results run the full demo, "
            "`python -m examples.get_distillation demo`. Smaller than the full demo: " + ", ".join(smaller) + ".")


def run(config: DemoConfig, progress: bool = True) -> dict:
    """Every stage of the demo into ``config.out`` (locked meanwhile); returns the report."""
    with locks.folder_lock(config.out):
        return _run_stages(config, progress)


def _run_stages(config: DemoConfig, progress: bool) -> dict:
    out = Path(config.out)
    cfg.save(out / "demo_config.json", config)
    timings: dict[str, float] = {}
    cache = str(out / "cache")

    def stage(name: str):
        print(f"\n== {name} ==", flush=True)
        return time.perf_counter()

    t = stage("1/5 teacher (EDM, class-conditional, digits)")
    tcfg = teacher.TeacherConfig(out=str(out / "teacher"), preset=config.teacher_preset, steps=config.teacher_steps,
                                 batch=config.teacher_batch, cond=True, seed=config.seed,
                                 ckpt_every=max(config.teacher_steps // 4, 1), sample_every=config.teacher_steps,
                                 sample_steps=config.heun_steps)
    with runtime.threads(config.train_threads):
        teacher.train(tcfg, progress=progress)
    ckpt = out / "teacher" / "checkpoint.pt"
    timings["teacher"] = time.perf_counter() - t

    t = stage("2/5 pairs (seeded, sharded, resumable)")
    denoiser, info = teacher.load_teacher(ckpt)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    digest = fileio.sha256_file(ckpt)
    for folder, num, offset in (("pairs", config.num_pairs, 0), ("pairs-heldout", config.num_heldout, HELDOUT_SEED_OFFSET)):
        with runtime.threads(config.train_threads):
            pairs.generate_pairs(denoiser, out / folder, num, shard_size=min(1000, num), batch_size=min(250, num),
                                 image_shape=shape, seed_offset=offset, num_classes=info["num_classes"],
                                 num_steps=config.heun_steps, teacher_hash=digest, progress=progress)
    timings["pairs"] = time.perf_counter() - t

    def student_config(model: str) -> train.TrainConfig:
        steps = config.student_steps
        return train.TrainConfig(pairs=str(out / "pairs"), out=str(out / model.replace("/", "_")), model=model,
                                 lr=config.student_lr, lr_schedule="cosine", warmup=config.student_warmup,
                                 grad_clip=config.student_grad_clip, batch=config.student_batch, steps=steps,
                                 ema_decay=config.ema_decay, seed=config.seed, log_every=max(steps // 100, 1),
                                 output_norm=config.output_norm and models.PRESETS[model]["family"] == "GET",
                                 sample_every=max(steps // 3, 1), ckpt_every=max(steps // 6, 1))

    student, baseline = student_config(config.student), student_config(config.baseline)
    _check_earlier_student(student)
    runs = [student.out, baseline.out]
    if config.parallel_students:
        stage(f"3-4/5 students {config.student} and {config.baseline} (same pairs, same budget), "
              "trained at the same time in two processes")
        timings.update(_train_side_by_side(student, baseline, progress, threads=1,
                                           widen_to=config.train_threads if config.hand_over else None))
    else:
        for i, scfg in enumerate((student, baseline)):
            t = stage(f"{3 + i}/5 student {scfg.model} (same pairs, same budget)")
            with runtime.threads(1):  # as side by side: the same figures either way
                train.train(scfg, progress=progress)
            timings[scfg.model] = time.perf_counter() - t

    t = stage("5/5 evaluation")
    ecfg = evaluate.EvalConfig(run=runs[0], baselines=runs[1:], teacher=str(ckpt), heldout=str(out / "pairs-heldout"),
                               out=str(out), num_samples=config.eval_samples, heun_steps=config.heun_steps,
                               nfe_max=config.nfe_max, sweep_samples=config.sweep_samples, cache=cache,
                               seed=config.seed)
    with runtime.threads(config.train_threads):
        report = evaluate.evaluate(ecfg)
    timings["evaluation"] = time.perf_counter() - t
    report["stage_seconds"] = timings
    report["smoke_test"] = smoke_test_note(config)
    fileio.atomic_write_bytes(out / "report.json", json.dumps(report, indent=1, default=str).encode())
    fileio.atomic_write_bytes(out / "report.md", evaluate.markdown(report).encode())
    return report


def _check_earlier_student(student: train.TrainConfig) -> None:
    """A student run in the demo folder that a demo of other defaults trained (before the GET
    student took --output-norm): say how to reuse it or start afresh, before any training."""
    path = Path(student.out) / "config.json"
    if not path.exists():
        return
    earlier = fileio.read_json(path, "student config")
    if earlier.get("output_norm", False) != student.output_norm:
        flag = "--output-norm" if earlier.get("output_norm", False) else "--no-output-norm"
        raise ValueError(f"{student.out} holds a {student.model} trained with output_norm={earlier.get('output_norm', False)} "
                         f"(an earlier demo's recipe); rerun with {flag} to reuse it, or give another --out")


def _exit_with_parent() -> None:
    """In the child: end it as soon as the demo process is gone (even killed with SIGKILL),
    so that no orphan keeps writing the run folder that a rerun of the demo will resume."""
    import multiprocessing
    import os

    parent = multiprocessing.parent_process()
    while parent is not None and parent.is_alive():
        time.sleep(0.5)
    os._exit(1)


def _widen_when(done, threads: int) -> Callable[[int], None]:
    """An ``on_step`` for ``train.train``: once ``done`` (an event) is set, this process trains
    with ``threads`` threads. Called in the training thread: torch's thread count is per thread
    under OpenMP, so another thread cannot change it."""
    widened = False

    def on_step(step: int) -> None:
        nonlocal widened
        if not widened and done.is_set():
            torch.set_num_threads(threads)
            widened = True

    on_step.event = done  # type: ignore[attr-defined]  # what it waits for (tests wait on it too)
    return on_step


def _train_worker(config: dict, threads: int, seconds, parent_done=None, widen_to: int | None = None) -> None:
    import threading

    threading.Thread(target=_exit_with_parent, daemon=True).start()
    torch.set_num_threads(threads)
    on_step = _widen_when(parent_done, widen_to) if widen_to else None
    t = time.perf_counter()
    train.train(cfg.from_dict(train.TrainConfig, config), progress=False, on_step=on_step)
    seconds.value = time.perf_counter() - t


def _train_side_by_side(first: train.TrainConfig, second: train.TrainConfig, progress: bool, threads: int = 1,
                        widen_to: int | None = None) -> dict[str, float]:
    """Train ``second`` in a child process while this one trains ``first``, each with
    ``threads`` threads. The students' steps are many small operations that a second thread
    speeds up little, so two single-threaded runs on two cores finish much sooner than one
    after the other. With ``widen_to``, the run that finishes first leaves its threads to the
    other, which trains with ``widen_to`` threads from its next step on (sooner, but that
    run's figures then depend on the step at which the switch came). Returns each run's seconds.

    If the child fails, this process stops its own run at once and raises an error naming the
    child's model; if this process fails or is interrupted, the child is stopped; if it is
    killed, the child notices within a second and exits. Either way a rerun resumes both runs
    from their last checkpoints.
    """
    import _thread
    import multiprocessing
    import multiprocessing.connection
    import threading

    previous = torch.get_num_threads()
    ctx = multiprocessing.get_context("spawn")
    seconds, parent_done = ctx.Value("d", float("nan")), ctx.Event()
    child = ctx.Process(target=_train_worker, args=(cfg.to_dict(second), threads, seconds, parent_done, widen_to),
                        name=f"train {second.model}", daemon=True)
    child_failed, child_done, finished, lock = threading.Event(), threading.Event(), threading.Event(), threading.Lock()

    def exit_code() -> int:
        # two threads wait for the child; the one that does not reap it sees the code shortly after
        multiprocessing.connection.wait([child.sentinel])
        while child.exitcode is None:
            time.sleep(0.01)
        return child.exitcode

    def watch() -> None:  # stop this process's run as soon as the child fails
        code = exit_code()
        if code == 0:  # the run that finishes first leaves its cores to the other one
            child_done.set()
        with lock:  # interrupt only while the main thread is still inside the try below
            if code != 0 and not finished.is_set():
                child_failed.set()
                _thread.interrupt_main()

    t = time.perf_counter()
    child.start()
    print(f"{second.model} trains in a second process (pid {child.pid}; {threads} thread(s) each); "
          f"its progress: {Path(second.out) / 'log.jsonl'}", flush=True)
    threading.Thread(target=watch, daemon=True).start()
    timings: dict[str, float] = {}
    try:
        torch.set_num_threads(threads)
        train.train(first, progress=progress, on_step=_widen_when(child_done, widen_to) if widen_to else None)
        timings[first.model] = time.perf_counter() - t
        parent_done.set()
        exit_code()
        with lock:
            finished.set()
    except KeyboardInterrupt:
        if not child_failed.is_set():
            raise
    finally:
        with lock:
            finished.set()
        torch.set_num_threads(previous)
        if child.is_alive():  # this process failed or was interrupted: stop the other run too
            child.terminate()
        code = exit_code()
    if code != 0:
        raise RuntimeError(f"training {second.model} in its own process failed (exit code {code}); "
                           f"rerun the demo to resume it, or train it alone: python -m examples.get_distillation "
                           f"train --pairs {second.pairs} --out {second.out} --model {second.model} ...")
    timings[second.model] = seconds.value
    return timings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, DemoConfig)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a smoke test of the whole pipeline (15-20 s measured on a shared 2-core CPU), "
                        "not results; other options override them (default: off)")
    parser.add_argument("--sequential", dest="parallel_students", action="store_false", default=argparse.SUPPRESS,
                        help="train the two students one after the other, as --no-parallel-students does (default: off)")


def main(args: argparse.Namespace) -> int:
    base = DemoConfig.quick() if args.quick else DemoConfig()
    return cli.run(DemoConfig, args, _run, base=base)


def _run(config: DemoConfig) -> int:
    t0 = time.perf_counter()
    report = run(config)
    out = Path(config.out)
    print("\n== summary ==")
    if report.get("smoke_test"):
        print(f"A SMOKE TEST, NOT RESULTS. {report['smoke_test']}")
    tq = report["teacher"]["quality"]
    print(f"teacher ({report['teacher_nfe']} NFE): FD-digits {tq.get('fd_digits', float('nan')):.2f}, "
          f"class accuracy {tq.get('class_accuracy', float('nan')):.3f}")
    for row in report["students"]:
        q = row["quality"]
        print(f"{row['model']} (1 call, {row['params'] / 1e6:.2f}M params): FD-digits {q.get('fd_digits', float('nan')):.2f} "
              f"({row.get('fd_ratio_to_teacher', float('nan')):.2f}x the teacher's), "
              f"class accuracy {q.get('class_accuracy', float('nan')):.3f}, teacher PSNR {row['teacher_match']['psnr']:.2f} dB, "
              f"{row['speedup_vs_teacher']:.1f}x faster than the teacher")
    print(f"total {time.perf_counter() - t0:.0f} s. Report: {out / 'report.md'}, {out / 'report.json'}; "
          f"plots: {', '.join(str(out / p) for p in report['plots'])}")
    return 0
