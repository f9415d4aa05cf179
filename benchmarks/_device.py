"""The benchmarks' device option, clock and machine record, written once for every script.

- ``add_device_option(parser)`` adds ``--device`` (``cpu``, ``cuda`` or ``cuda:N``; default
  ``cpu``); ``resolve(parser, args.device)`` turns it into a ``torch.device`` or stops with a
  one-line error that names the option (CUDA asked for but absent, an index past the last GPU).
- ``sync(device)`` waits for the device's queued work: CUDA kernels run asynchronously, so a
  clock read without it measures the time to *launch* them, not to run them. Every timing of
  the benchmarks reads ``now(device)``, which synchronises first (a no-op on the CPU).
- ``describe(device)`` is what each results.json records (device, its name, torch, CUDA
  version, torch threads); ``header(info)`` is the line printed above each table.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import torch

_SPEC = re.compile(r"^(cpu|cuda(:\d+)?)$")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="where problems, models, inputs and solver state live: cpu (default), cuda or cuda:N; "
                             "timings on CUDA synchronise the device before every clock read")


def resolve(parser: argparse.ArgumentParser, spec: str) -> torch.device:
    """``--device`` as a torch.device; exits with status 2 and one line on stderr (no usage
    text around it) if it cannot be used here."""
    message = device_error(spec)
    if message:
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    return torch.device(spec)


def device_error(spec: str) -> str | None:
    """Why ``--device spec`` cannot be used here, in one line, or None."""
    if not _SPEC.match(spec):
        return f"--device {spec!r}: expected cpu, cuda or cuda:N"
    if spec == "cpu":
        return None
    if not torch.cuda.is_available():
        return f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        return f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..)"
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far."""
    sync(device)
    return time.perf_counter()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} logical cores"


def describe(device: torch.device) -> dict:
    """The record each results.json carries under ``"machine"`` (and ``"device"`` at top level)."""
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(), "cpu": cpu_name()}


def header(info: dict, what: str) -> str:
    """One line above a printed table: what was measured, where, with which torch."""
    cuda = f", CUDA {info['cuda']}" if info.get("cuda") else ""
    threads = info["torch_threads"]
    threads = f"{threads} torch thread(s)" if isinstance(threads, int) else f"torch threads {threads}"
    return f"{what} on {info['device']} ({info['device_name']}), torch {info['torch']}{cuda}, {threads}"
