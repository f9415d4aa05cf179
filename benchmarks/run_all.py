#!/usr/bin/env python3
"""Run the benchmark set on one device: every script of ``REGISTRY`` that this checkout has,
each in its own process under a time budget, then OUT/summary.md (each script's table, the
device named) and OUT/summary.json (each stage's status, time, budget and command).

The full set's options and budgets are sized for one GPU: the budgets add up to 450 s, and
``--total-budget`` (480 s) cuts the last stages' limits so that the whole run ends within
8 minutes whatever happens. A script that fails, runs past its budget, or writes a
results.json for another device fails the run (exit status 1, its name on stderr); a script
of the registry that is not in this checkout yet is skipped with a note. Each script writes
into OUT/<name>/, with its stdout and stderr in OUT/<name>/stdout.txt and stderr.txt.

    python benchmarks/run_all.py --device cuda --out runs/bench-gpu        # at most 8 minutes
    python benchmarks/run_all.py --quick --out runs/bench-all-quick        # CPU smoke test (< 1 min)
    python benchmarks/run_all.py --budget-scale 20 --out runs/bench-cpu    # the full set on a CPU

Options the registry gives a script that its source does not define (``"--quick"`` written
in the script) are left out and noted, so that a script that lands with fewer options still
runs; ``--device`` and ``--out`` are required of every script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _device import add_device_option, describe, header, resolve  # noqa: E402

Options = tuple[tuple[str, ...], ...]  # groups: an option and its values


@dataclasses.dataclass(frozen=True)
class Stage:
    """One script, ``benchmarks/<name>.py``, with its options (beside ``--device`` and
    ``--out``) in a full run and a ``--quick`` run, and the wall-clock budget of each."""

    name: str
    full: Options
    quick: Options
    budget_s: float  # a full run on one GPU
    quick_budget_s: float = 120.0  # a --quick run on a CPU
    note: str = ""  # shown when the script is not in this checkout

    @property
    def script(self) -> Path:
        return HERE / f"{self.name}.py"


REGISTRY: tuple[Stage, ...] = (
    Stage("convergence", (("--repeats", "3"),), (("--quick",), ("--repeats", "1")), 100),
    Stage("backward", (), (("--quick",), ("--in-process",), ("--repeats", "1")), 60),
    Stage("compat", (("--repeats", "30"),), (("--quick",), ("--repeats", "1")), 40),
    Stage("threads", (("--steps", "4"),), (("--quick",),), 70),
    Stage("overhead", (("--repeats", "5"),), (("--quick",), ("--repeats", "1")), 60),
    Stage("trained", (), (("--quick",),), 70),
    Stage("compile", (), (("--quick",),), 50),
    Stage("escape", (("--quick",),), (("--quick",),), 20),  # a check of the rule on the device; the figures: --trained
    # training on the device, one seed of the quick setting; the figures: the full run on a CPU
    Stage("stability", (("--quick",), ("--seeds", "1"), ("--steps", "6")), (("--quick",),), 10),
)
TOTAL_BUDGET_S = 480.0


def defines(source: str, option: str) -> bool:
    """Whether a script's source defines ``option``: it names it, quoted (``--device`` also
    through the shared ``_device.add_device_option``)."""
    shared = option == "--device" and "add_device_option(parser)" in source
    return shared or f'"{option}"' in source or f"'{option}'" in source


def supported(script: Path, groups: Options) -> tuple[list[str], list[str]]:
    """The options of ``groups`` that the script defines, as a flat argument list, and the
    options left out."""
    source = script.read_text()
    args, dropped = [], []
    for group in groups:
        if defines(source, group[0]):
            args += group
        else:
            dropped.append(group[0])
    return args, dropped


def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process and every process it started (its own process group: the
    threads benchmark's busy processes, the backward benchmark's workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_stage(stage: Stage, device: str, out: Path, quick: bool, budget: float) -> dict:
    """Run one script under ``budget`` seconds; its status, time and output."""
    record = {"name": stage.name, "script": f"benchmarks/{stage.name}.py", "budget_s": round(budget, 1),
              "out": str(out / stage.name), "dropped_options": [], "note": ""}
    if not stage.script.exists():
        return {**record, "status": "missing", "seconds": 0.0, "command": None,
                "note": f"benchmarks/{stage.name}.py is not in this checkout ({stage.note or 'not written yet'}): skipped"}
    source = stage.script.read_text()
    for required in ("--device", "--out"):
        if not defines(source, required):
            return {**record, "status": "failed", "seconds": 0.0, "command": None,
                    "note": f"benchmarks/{stage.name}.py has no {required} option"}
    args, dropped = supported(stage.script, stage.quick if quick else stage.full)
    command = [sys.executable, str(stage.script), "--device", device, "--out", str(out / stage.name), *args]
    record.update(command=command[1:], dropped_options=dropped)
    if dropped:
        record["note"] = f"left out (not options of the script): {', '.join(dropped)}"
    (out / stage.name).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so a timeout ends all of it
    try:
        stdout, stderr = proc.communicate(timeout=max(budget, 1.0))
        status = "ok" if proc.returncode == 0 else "failed"
        if status == "failed":
            record["note"] = f"exit status {proc.returncode}: {(stderr.strip().splitlines() or [''])[-1]}"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        status = "failed"
        record["note"] = f"ran past its budget of {budget:.0f} s and was stopped"
    seconds = time.perf_counter() - start
    (out / stage.name / "stdout.txt").write_text(stdout)
    (out / stage.name / "stderr.txt").write_text(stderr)
    record.update(status=status, seconds=round(seconds, 2), returncode=proc.returncode, stdout=stdout)
    results = out / stage.name / "results.json"
    if status == "ok" and results.exists():
        written = json.loads(results.read_text()).get("device")
        if written is not None and written != device:
            record.update(status="failed", note=f"its results.json is for device {written!r}, not {device!r}")
    return record


def table_of(stdout: str) -> str:
    """A script's printed output without its closing 'wrote ...' lines."""
    lines = [line for line in stdout.strip().splitlines() if not line.startswith(("wrote ", "redrew "))]
    return "\n".join(lines).strip()


def summary_md(stages: list[dict], machine: dict, quick: bool, total: float, budget: float) -> str:
    mode = " (--quick)" if quick else ""
    ran = [s for s in stages if s["status"] != "missing"]
    failed = [s["name"] for s in stages if s["status"] == "failed"]
    lines = [f"# Benchmarks on {machine['device']}: {machine['device_name']}{mode}", "",
             header(machine, "run_all") + f"; {len(ran)} of {len(stages)} scripts run, "
             f"{len(failed)} failed, {total:.0f} s in all (budget {budget:.0f} s).", "",
             "| script | status | seconds | budget (s) | note |", "|---|---|---:|---:|---|"]
    for s in stages:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']:.0f} | {s['note']} |")
    for s in stages:
        if s["status"] == "missing":
            continue
        lines += ["", f"## {s['name']} on {machine['device']} ({machine['device_name']}): {s['status']}, "
                      f"{s['seconds']:.1f} s", ""]
        if s.get("command"):
            lines += ["```", "python " + " ".join(str(c) for c in s["command"]), "```", ""]
        lines.append(table_of(s.get("stdout", "")) or f"(no output; see {s['out']}/stderr.txt)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-all"), help="output folder (one subfolder per script)")
    parser.add_argument("--quick", action="store_true", help="each script's smallest run: a CPU smoke test, under a minute")
    parser.add_argument("--only", nargs="+", default=None, choices=[s.name for s in REGISTRY], help="run these scripts only")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every budget, the total's too (e.g. 20 for the full set on a CPU)")
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S,
                        help=f"seconds for the whole run (default {TOTAL_BUDGET_S:.0f}): a stage gets at most what is left")
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = resolve(parser, args.device)
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    if args.total_budget <= 0:
        parser.error(f"--total-budget must be > 0, got {args.total_budget}")
    stages = [s for s in REGISTRY if args.only is None or s.name in args.only]
    total_budget = args.total_budget * args.budget_scale
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {**describe(device), "torch_threads": "set by each script"}
    print(header(machine, "run_all" + (" --quick" if args.quick else "")), flush=True)
    start = time.perf_counter()
    records = []
    for stage in stages:
        left = total_budget - (time.perf_counter() - start)
        budget = min((stage.quick_budget_s if args.quick else stage.budget_s) * args.budget_scale, left)
        if budget < 1 and stage.script.exists():
            record = {"name": stage.name, "script": f"benchmarks/{stage.name}.py", "status": "failed", "seconds": 0.0,
                      "budget_s": 0.0, "command": None, "out": str(args.out / stage.name), "dropped_options": [],
                      "note": "not started: the total budget was spent"}
        else:
            record = run_stage(stage, str(device), args.out, args.quick, budget)
        records.append(record)
        print(f"[{stage.name}] {record['status']} in {record['seconds']:.1f} s (budget {record['budget_s']:.0f} s)"
              + (f": {record['note']}" if record["note"] else ""), flush=True)
    total = time.perf_counter() - start
    failed = [r for r in records if r["status"] == "failed"]
    (args.out / "summary.md").write_text(summary_md(records, machine, args.quick, total, total_budget))
    payload = {"device": str(device), "machine": machine, "quick": args.quick, "total_seconds": round(total, 2),
               "total_budget_s": total_budget, "failed": [r["name"] for r in failed],
               "stages": [{k: v for k, v in r.items() if k != "stdout"} for r in records]}
    (args.out / "summary.json").write_text(json.dumps(payload, indent=1))
    print(f"{total:.1f} s in all; wrote {args.out / 'summary.md'} and {args.out / 'summary.json'}")
    if failed:
        print("run_all: failed: " + ", ".join(f"{r['name']} ({r['note']})" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
