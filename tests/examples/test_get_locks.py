"""Folder locks: an OS lock (filelock) per run folder; never two holders, nothing stale to detect."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from examples.get_distillation import locks

WORKERS, TRIALS = 8, 50
# what older versions of this example, crashes and strangers left in .lock: none of it matters
STALE = [json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename}),  # a dead pid on this host
         json.dumps({"pid": 1, "host": "elsewhere"}), "", "not json", "{\"pid\": 1e999}", "[]", "\x00" * 64]


def _contend(root: str, trials: int, start, between, holders, counts, guard) -> None:
    """One of WORKERS processes: in each trial all try to lock the same folder at once (a
    barrier), whoever holds it counts itself in while every other attempt is made (a second
    barrier), then lets go."""
    for trial in range(trials):
        folder = Path(root) / f"trial-{trial}"
        start.wait(timeout=300)  # a broken peer fails the test instead of hanging it
        try:
            path = locks.acquire(folder)
        except locks.FolderLocked:
            path = None
        if path is not None:
            with guard:
                holders.value += 1
                counts[trial] += 1
                counts[trials + trial] = max(counts[trials + trial], holders.value)  # the most at once
        between.wait(timeout=300)  # every process has tried while the holder holds
        if path is not None:
            with guard:
                holders.value -= 1
            locks.release(path)
        between.wait(timeout=300)


def test_eight_processes_on_fifty_stale_locks_never_have_two_holders(tmp_path):
    for trial in range(TRIALS):
        (tmp_path / f"trial-{trial}").mkdir()
        (tmp_path / f"trial-{trial}" / ".lock").write_text(STALE[trial % len(STALE)])
    ctx = multiprocessing.get_context("spawn")
    start, between = ctx.Barrier(WORKERS), ctx.Barrier(WORKERS)
    holders, counts, guard = ctx.Value("i", 0, lock=False), ctx.Array("i", 2 * TRIALS, lock=False), ctx.Lock()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), TRIALS, start, between, holders, counts, guard))
             for _ in range(WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=900)
        assert proc.exitcode == 0
    assert list(counts[:TRIALS]) == [1] * TRIALS  # every stale lock was taken, by exactly one process
    assert list(counts[TRIALS:]) == [1] * TRIALS  # and never by two at once


def test_the_lock_is_reentrant_in_a_process_and_released_by_the_outermost(tmp_path, hold_lock):
    outer = locks.acquire(tmp_path)
    inner = locks.acquire(tmp_path)  # the demo locks its folder, then evaluation locks it again
    locks.release(inner)
    assert locks.holds(tmp_path)
    with pytest.raises(AssertionError):
        hold_lock(tmp_path)  # another process cannot take it while the outer holds it
    locks.release(outer)
    assert not locks.holds(tmp_path) and not (tmp_path / ".lock.json").exists()
    hold_lock(tmp_path)  # free now
    with pytest.raises(locks.FolderLocked):
        locks.acquire(tmp_path)


def test_a_lock_on_an_unwritable_place_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as info:
        locks.acquire(tmp_path / "file" / "run")  # a file where a folder must be
    assert str(tmp_path / "file") in str(info.value) and "\n" not in str(info.value)
