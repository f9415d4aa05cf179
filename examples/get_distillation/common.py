"""Shared helpers: atomic writes, checkpoints, config <-> JSON, seeding, torchrun init, image grids.

Everything that touches disk writes a temporary file in the destination folder and renames it
into place (``os.replace`` is atomic on POSIX), so a kill never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import random
import socket
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")

# ----------------------------------------------------------------------------- atomic files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 less the
    umask), not ``mkstemp``'s 0600, so group members can read runs on shared storage.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for equal content)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically. Keep it to tensors, numbers, strings, lists and dicts,
    so that :func:`load_checkpoint` can read it with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    A file that is not a torch checkpoint (or holds anything but plain data) is a ValueError
    naming the file, not a raw unpickling traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: expected a file at {str(path)!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{str(path)!r} is not a torch checkpoint (torch.save writes a zip archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable checkpoint of this example "
                         f"(weights-only load failed: {str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a checkpoint of this example (it holds a {type(state).__name__})")
    return state


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a corrupt one is a ValueError naming the file and the place."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is corrupt (not valid JSON: {exc}); "
                         "restore it or regenerate the folder") from exc


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


def json_sha256(obj: Any) -> str:
    """The sha256 of ``obj``'s canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


# ----------------------------------------------------------------------------- folder locks


LOCK_NAME = ".lock"


class FolderLocked(RuntimeError):
    """Another live process is writing the folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def acquire_lock(folder: str | os.PathLike) -> Path | None:
    """Create ``folder/.lock`` holding this process's pid and host, or raise FolderLocked;
    returns its path, or None if this process holds it already (release only the outer one).

    A lock left by a process that is gone (same host, pid not running: a kill -9, a crash)
    is stale: it is replaced, with a note on stderr. A lock from another host cannot be
    checked and counts as held.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[:8]}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if pid == me["pid"] and host == me["host"]:
                return None  # this process holds it already (a nested lock)
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                print(f"removing the stale lock {path} of process {pid}, which is gone", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            if not owner:  # being written this instant, or truncated by a crash: look again
                time.sleep(0.05)
                owner = json.loads(path.read_text() or "{}") if path.exists() else {}
                if not owner:
                    path.unlink(missing_ok=True)
                    continue
            raise FolderLocked(
                f"{str(folder)!r} is being written by process {owner.get('pid')} on {owner.get('host')!r} "
                f"({' '.join(owner.get('argv', []))}); wait for it to finish, use another folder, or delete "
                f"{str(path)!r} if that process is gone")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise FolderLocked(f"could not lock {str(folder)!r}: {str(path)!r} keeps reappearing")


def release_lock(path: Path) -> None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


class folder_lock:
    """``with folder_lock(out, rank, world_size):`` rank 0 locks ``out`` for the whole run;
    under torchrun every rank learns whether it could, so all stop together if not. Once
    locked, the temporary files that killed runs left in ``out`` are removed."""

    def __init__(self, folder: str | os.PathLike, rank: int = 0, world_size: int = 1):
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.path: Path | None = None

    def __enter__(self) -> "folder_lock":
        error: FolderLocked | None = None
        if self.rank == 0:
            try:
                self.path = acquire_lock(self.folder)
            except FolderLocked as exc:
                error = exc
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([0.0 if error is None else 1.0])
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag)
            if flag.item() and error is None:
                error = FolderLocked(f"rank 0 could not lock {str(self.folder)!r} (see its message)")
        if error is not None:
            if self.path is not None:
                release_lock(self.path)
            raise error
        if self.path is not None:  # no other writer now: temporaries of killed runs can go
            for tmp in self.folder.glob(".tmp-*"):
                tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            release_lock(self.path)


# ----------------------------------------------------------------------------- configs


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (paths become strings, tuples lists)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a dataclass config from a dict; unknown keys are an error that names them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown keys for {cls.__name__}: {unknown}")
    return cls(**data)


def save_config(path: str | os.PathLike, config: Any) -> None:
    atomic_write_json(path, config_to_dict(config))


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    return config_from_dict(cls, read_json(path, "config"))


# ----------------------------------------------------------------------------- EMA


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for every parameter (buffers copied)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- distributed


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


# ----------------------------------------------------------------------------- images


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one uint8 array (rows*H, cols*W, C)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = nrow
    nrows = int(np.ceil(n / ncol))
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = x[k].transpose(1, 2, 0)
    return grid


def grid_figure(images: torch.Tensor, *, title: str, labels: torch.Tensor | None = None,
                nrow: int | None = None) -> Any:
    """A matplotlib Figure of images (N, C, H, W) in [-1, 1], ``nrow`` to a row, under ``title``.

    ``labels`` (N,), each image's class: when every column (or every row) holds one class, the
    columns (rows) are labelled "class k"; otherwise each image gets its class in a corner. The
    rows are labelled by the index of their first image (the seeded noise it came from)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    n, c, h, w = images.shape
    ncol = nrow or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncol))
    pad = 1
    grid = image_grid(images, ncol, pad=pad)
    fig = Figure(figsize=(0.55 * ncol + 1.4, 0.55 * nrows + 1.0))
    ax = fig.add_subplot()
    ax.imshow(grid[:, :, 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=255,
              interpolation="nearest")
    col_centres = [pad + q * (w + pad) + (w - 1) / 2 for q in range(ncol)]
    row_centres = [pad + r * (h + pad) + (h - 1) / 2 for r in range(nrows)]
    ax.set_yticks(row_centres, [f"#{r * ncol}" for r in range(nrows)], fontsize=7)
    ax.set_ylabel("sample (noise seed index)")
    ax.set_xticks([])
    ax.set_title(textwrap.fill(title, width=max(int(9 * (0.55 * ncol + 1.4)), 30)), fontsize=9)
    if labels is not None:
        lab = [int(v) for v in labels[:n].tolist()]
        cols = [{lab[k] for k in range(q, n, ncol)} for q in range(ncol)]
        if all(len(col) == 1 for col in cols):
            ax.set_xticks(col_centres, [str(next(iter(col))) for col in cols], fontsize=7)
            ax.set_xlabel("class label (one per column)")
        else:
            for k, v in enumerate(lab):
                r, q = divmod(k, ncol)
                ax.text(col_centres[q] - w / 2, row_centres[r] - h / 2, str(v), color="yellow",
                        fontsize=6, va="top", ha="left", bbox={"facecolor": "black", "pad": 0.3, "lw": 0})
            ax.set_xlabel("class label in each image's corner")
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write a matplotlib Figure as a PNG (atomically)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, title: str,
                    labels: torch.Tensor | None = None, nrow: int | None = None) -> None:
    """Save images (N, C, H, W) in [-1, 1] as a titled, labelled PNG grid (:func:`grid_figure`), atomically."""
    save_figure(grid_figure(images, title=title, labels=labels, nrow=nrow), path)
