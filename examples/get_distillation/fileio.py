"""Files: atomic writes, checksums, JSON and the append-only ``log.jsonl``.

Everything that touches disk writes a temporary file in the destination folder, flushes and
fsyncs it, and renames it into place (``os.replace`` is atomic on POSIX), so a kill never
leaves a half-written file under the final name. An operating-system error (a read-only
folder, a full disk, a missing permission) is raised naming the path (:func:`path_error`),
which the command line prints as one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def path_error(exc: OSError, path: str | os.PathLike | None = None) -> OSError:
    """``exc`` naming ``path`` if it names no file itself (a full disk fails a write, not a
    path), of the same type (PermissionError stays one); the command line prints it as one
    line, "No space left on device: 'runs/get/checkpoint.pt'"."""
    if exc.filename is not None or path is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and ``os.replace``.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 less the
    umask), not ``mkstemp``'s 0600, so group members can read runs on shared storage. An
    OSError is raised naming ``path`` (:func:`path_error`).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise path_error(exc, path) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(tmp: str | None) -> None:
    if tmp is not None:
        try:
            os.remove(tmp)
        except OSError:
            pass


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for equal content)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Save ``array`` as a .npy file (never pickled) atomically; returns its sha256 hex digest."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                digest.update(block)
    except OSError as exc:
        raise path_error(exc, path) from exc
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    """The sha256 of ``obj``'s canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a corrupt one is a ValueError naming the file and the place."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is corrupt (not valid JSON: {exc}); "
                         "restore it or regenerate the folder") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is corrupt (not UTF-8 text)") from exc
    except OSError as exc:
        raise path_error(exc, path) from exc


# ----------------------------------------------------------------------------- log.jsonl


def _records(path: Path) -> Iterator[tuple[int, dict | None, bytes]]:
    """(line number, record or None if not valid JSON, raw line) for each non-empty line."""
    data = path.read_bytes()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            yield number, record if isinstance(record, dict) else None, raw


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log; none if the file is missing.

    A last line that is not a whole record (an append cut short by a kill or a full disk) is
    dropped with a warning on stderr naming the file; a bad line before the last is a
    ValueError naming the file and the line.
    """
    path = Path(path)
    try:
        if not path.exists():
            return []
        rows = list(_records(path))
        ends_whole = path.read_bytes().endswith(b"\n")
    except OSError as exc:
        raise path_error(exc, path) from exc
    records = []
    for k, (number, record, _) in enumerate(rows):
        last = k == len(rows) - 1
        if record is None or (last and not ends_whole):
            if last:
                print(f"warning: {path}: dropped its torn last line {number} (an append cut short)", file=sys.stderr)
                break
            raise ValueError(f"{str(path)!r}, line {number}: not a JSON record; restore the file or delete the line")
        records.append(record)
    return records


def repair_jsonl(path: str | os.PathLike) -> None:
    """Cut a torn last line off a JSON-lines log (with a warning naming the file), so that the
    next append starts on a line of its own."""
    path = Path(path)
    try:
        if not path.exists():
            return
        data = path.read_bytes()
        rows = list(_records(path))
        if not rows:
            return
        number, record, raw = rows[-1]
        if record is not None and data.endswith(b"\n"):
            return
        keep = data[: data.rfind(raw)]
        print(f"warning: {path}: dropped its torn last line {number} (an append cut short)", file=sys.stderr)
        atomic_write_bytes(path, keep)
    except OSError as exc:
        raise path_error(exc, path) from exc


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one whole line (strict JSON: no NaN), flushed and fsynced."""
    line = (json.dumps(record, allow_nan=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise path_error(exc, path) from exc
