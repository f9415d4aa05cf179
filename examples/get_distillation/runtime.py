"""The process: seeding, threads, devices and torchrun's process group."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def check_threads(threads: object, option: str = "--threads") -> int:
    """``threads`` if it is an integer from 1 to the usable CPUs (more threads than cores only
    slow a CPU-bound run, and OpenMP cannot start tens of thousands of them), else a
    ValueError naming ``option``."""
    top = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= top:
        raise ValueError(f"{option} must be an integer from 1 to {top} (the CPUs this process may use), got {threads!r}")
    return threads


def set_threads(threads: int | None, option: str = "--threads") -> None:
    """``torch.set_num_threads(threads)`` after :func:`check_threads`; None leaves torch's choice."""
    if threads is not None:
        torch.set_num_threads(check_threads(threads, option))


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads (this thread's), then restore the count.

    Training on the CPU gives results that depend on the number of threads (reductions split
    differently): a stage whose results must not depend on the machine runs under a fixed count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_device(device: str | None, option: str = "--device") -> None:
    """Raise ValueError naming ``option`` if ``device`` is not usable on this machine."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{option}: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {device!r}: this torch build or machine has no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{option} {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and start the process group if needed.

    Uses nccl when CUDA is available (one GPU per local rank), gloo on CPU. Without torchrun
    (no WORLD_SIZE, or WORLD_SIZE=1) nothing is initialised and rank 0 of 1 is returned.
    Call :func:`cleanup_distributed` with the result at the end.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu" if device is None else device)
    initialized_here = False
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
        initialized_here = True
    return DistInfo(rank, world_size, local_rank, dev, initialized_here)


def barrier(world_size: int) -> None:
    """A collective barrier when running distributed; a no-op otherwise."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
