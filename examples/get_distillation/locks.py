"""Folder locks: one writer per run folder, with an operating-system lock (``filelock``).

``with folder_lock(out):`` takes an exclusive ``flock`` on ``out/.lock`` or raises
:class:`FolderLocked` at once. The kernel releases the lock when its process ends, however
it ends (kill -9 included), so there is no stale lock to detect or replace: a ``.lock`` file
that no live process holds is simply free, whatever it contains (the JSON of older versions
of this example included). Beside it, ``.lock.json`` says who holds it (pid, host, command),
for the message another writer gets; it is informative only, never trusted.

Every command that writes a folder takes this lock: teacher, pairs, train, evaluate, study,
scaling, nfe-study and demo. Within one process the lock is re-entrant (the demo's stages
lock folders inside its own).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import filelock

from . import fileio

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.json"


class FolderLocked(RuntimeError):
    """Another live process is writing the folder."""


_held: dict[str, list[Any]] = {}  # real path of a lock file -> [FileLock, depth] in this process
_guard = threading.Lock()


def _owner(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_NAME).read_text())
        return (f"process {int(owner['pid'])} on {str(owner['host'])!r} "
                f"({' '.join(str(a) for a in owner.get('argv', []))})")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return "another process"


def acquire(folder: str | os.PathLike) -> Path:
    """Lock ``folder`` (created if needed) for this process, or raise FolderLocked naming the
    holder. Re-entrant: each call needs one :func:`release`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        key = os.path.realpath(path)
        with _guard:
            if key in _held:
                _held[key][1] += 1
                return path
            lock = filelock.FileLock(str(path), timeout=0, thread_local=False)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise FolderLocked(f"{str(folder)!r} is being written by {_owner(folder)}; wait for it to finish or "
                                   "use another folder") from None
            _held[key] = [lock, 1]
        me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[:8]}
        fileio.atomic_write_json(folder / OWNER_NAME, me)
        for tmp in folder.glob(".tmp-*"):  # no other writer now: temporaries of killed runs can go
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise fileio.path_error(exc, folder) from exc
    return path


def release(path: Path) -> None:
    key = os.path.realpath(path)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        (path.parent / OWNER_NAME).unlink(missing_ok=True)
        entry[0].release()


def holds(folder: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``folder``."""
    return os.path.realpath(Path(folder) / LOCK_NAME) in _held


class folder_lock:
    """``with folder_lock(out, rank, world_size):`` rank 0 locks ``out`` for the whole run;
    under torchrun every rank learns whether it could, so all stop together if not."""

    def __init__(self, folder: str | os.PathLike, rank: int = 0, world_size: int = 1):
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.path: Path | None = None

    def __enter__(self) -> "folder_lock":
        error: Exception | None = None
        if self.rank == 0:
            try:
                self.path = acquire(self.folder)
            except (FolderLocked, OSError) as exc:
                error = exc
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                import torch

                flag = torch.tensor([0.0 if error is None else 1.0])
                if dist.get_backend() == "nccl":
                    flag = flag.cuda()
                dist.all_reduce(flag)
                if flag.item() and error is None:
                    error = FolderLocked(f"rank 0 could not lock {str(self.folder)!r} (see its message)")
        if error is not None:
            if self.path is not None:
                release(self.path)
            raise error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            release(self.path)
