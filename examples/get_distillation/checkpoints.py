"""Checkpoints: written with a sha256 record, verified before use, loaded with ``weights_only=True``.

:func:`save_checkpoint` writes ``NAME`` atomically and, before it, ``NAME.sha256``: the digest
of the new file (and of the one it replaces, so that a kill between the two renames leaves
a pair that still verifies). :func:`load_checkpoint` checks the file against that record
before torch reads a byte of it; a file without a record (written before checkpoints had
one, or by hand with ``torch.save``) has the CRCs of its zip members checked instead.
Nothing here ever unpickles code: a file that needs more than tensors and plain data is
refused, and no message suggests a way to load it that would run code.

Checkpoints of older versions of this example are read in one place, the last section of
this module (:func:`student_record`, :func:`data_record`).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from . import fileio

RECORD_SUFFIX = ".sha256"
ZIP_MAGIC = b"PK\x03\x04"


def record_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


def file_kind(path: str | os.PathLike) -> str:
    """"zip" (what ``torch.save`` writes, whole or truncated), "pickle" (a pickle stream, as
    EDM's .pkl networks) or "other", from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise fileio.path_error(exc, path) from exc
    if head == ZIP_MAGIC:
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return "pickle"
    return "other"


def _read_record(path: Path) -> Optional[dict]:
    rec = record_path(path)
    if not rec.exists():
        return None
    record = fileio.read_json(rec, "checkpoint record")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ValueError(f"checkpoint record {str(rec)!r} is corrupt (no sha256); restore it, or delete it to "
                         "check the checkpoint by its zip CRCs alone")
    return record


def recorded_sha256(path: str | os.PathLike) -> Optional[str]:
    """The sha256 recorded for the checkpoint at ``path`` when it was written (None: no record)."""
    record = _read_record(Path(path))
    return None if record is None else record["sha256"]


def verify(path: str | os.PathLike) -> str:
    """Check the checkpoint file at ``path``; returns its sha256. Raises FileNotFoundError if
    it is missing and ValueError naming the file if it is not an intact checkpoint: another
    digest than the one recorded when it was written, a truncated or corrupt zip, a member
    whose CRC fails, or not a zip archive at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: expected a file at {str(path)!r}")
    kind = file_kind(path)
    if kind == "pickle":
        raise ValueError(f"{str(path)!r} is a Python pickle, not a checkpoint of this example (torch.save writes a "
                         "zip archive); a pickle is never loaded here")
    if kind != "zip":
        raise ValueError(f"{str(path)!r} is not a torch checkpoint (torch.save writes a zip archive)")
    digest = fileio.sha256_file(path)
    record = _read_record(path)
    if record is not None:
        if digest not in (record["sha256"], record.get("previous")):
            raise ValueError(f"{str(path)!r} does not match the sha256 recorded when it was written (corrupted, "
                             "truncated or modified since); it is not loaded: restore it from a copy, or retrain")
        return digest
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is a truncated or corrupt torch checkpoint ({exc}); it is not loaded: "
                         "restore it from a copy, or retrain") from exc
    if bad is not None:
        raise ValueError(f"{str(path)!r} is a corrupt torch checkpoint (the CRC of its member {bad!r} fails); it is "
                         "not loaded: restore it from a copy, or retrain")
    return digest


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Save a checkpoint dict atomically with its sha256 record; returns the digest. Keep it to
    tensors, numbers, strings, lists and dicts, so that :func:`load_checkpoint` can read it
    with ``weights_only=True``."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    previous = None
    if path.is_file():  # the file being replaced stays valid until the rename below
        try:
            previous = verify(path)
        except ValueError:
            previous = None
    fileio.atomic_write_json(record_path(path), {"sha256": digest, "previous": previous, "bytes": len(data)})
    fileio.atomic_write_bytes(path, data)
    return digest


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify (:func:`verify`) and load a checkpoint written by :func:`save_checkpoint`, with
    ``weights_only=True``: no code stored in the file runs. Raises ValueError naming the file
    for anything but an intact checkpoint dict of tensors and plain data."""
    path = Path(path)
    verify(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, KeyError, TypeError) as exc:
        # torch's message suggests loading the file with weights_only=False, which runs the
        # code in it: never repeated here
        raise ValueError(f"{str(path)!r} is not a checkpoint of this example: it holds objects other than tensors "
                         "and plain data, or is damaged; it is not loaded") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a checkpoint of this example (it holds a {type(state).__name__})")
    return state


def state_sha256(module_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """The sha256 of a model's weights: names, dtypes, shapes and bytes of its state dict in
    name order. Independent of the file they came from (optimizer state, step, ...)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ----------------------------------------------------------------------------- older formats
# Student checkpoints written before they described themselves lack "student" (the image
# shape and classes), "data" (the provenance of their pairs) and "format"; their pair folder
# (config["pairs"]) still says both. These two functions are the only place that knows.


def student_record(state: dict, path: str | os.PathLike) -> dict:
    """``{"model", "image_shape", "num_classes"}`` of a student checkpoint."""
    if "student" in state:
        return state["student"]
    dataset = _old_pairs(state, path, "its image shape")
    return {"model": state["config"]["model"], "image_shape": list(dataset.image_shape),
            "num_classes": dataset.num_classes}


def data_record(state: dict, path: str | os.PathLike) -> dict:
    """The provenance of the pairs a student checkpoint was trained on (``PairDataset.provenance``)."""
    if "data" in state:
        return state["data"]
    return _old_pairs(state, path, "its training pairs").provenance(state["config"].get("num_pairs"))


def _old_pairs(state: dict, path: str | os.PathLike, what: str) -> Any:
    from .pairs import PairDataset

    pairs = state.get("config", {}).get("pairs")
    try:
        return PairDataset(pairs, verify="none")
    except (FileNotFoundError, TypeError) as exc:
        raise ValueError(f"{str(path)!r} predates self-describing checkpoints and its pair folder {pairs!r} is gone, "
                         f"so {what} is unknown; resume it once with the pairs present (or retrain)") from exc

