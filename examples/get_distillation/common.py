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
import random
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")

# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
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
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: expected a file at {str(path)!r}")
    return torch.load(path, map_location=map_location, weights_only=True)


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
    with open(path) as f:
        return config_from_dict(cls, json.load(f))


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


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    scale: int = 1) -> None:
    """Save images (N, C, H, W) in [-1, 1] as a PNG grid (atomically); ``scale`` enlarges pixels."""
    from PIL import Image

    grid = image_grid(images, nrow)
    if grid.shape[2] == 1:
        grid = grid[:, :, 0]
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
