"""Image sources, each returning images in [-1, 1] as float32 (N, C, H, W) with int64 labels.

- :func:`load_digits`: scikit-learn's bundled 8x8 digits (1,797 images, no download), with a
  fixed train / held-out split (a seeded permutation, 1,437 / 360).
- :func:`load_cifar10`: CIFAR-10 from a local folder in its python-pickle batch format, parsed
  with a restricted unpickler (no arbitrary classes) and numpy; no torchvision.
- :func:`load_image_folder`: any folder of images (Pillow), resized; labels from subfolders.

:func:`get_dataset` dispatches on a name, for the command line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "folder")
SPLITS = ("train", "test")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageData(NamedTuple):
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    num_classes: int


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def load_digits(split: str = "train") -> ImageData:
    """scikit-learn's digits as (N, 1, 8, 8) in [-1, 1]; ``split`` is "train" (1,437) or "test" (360).

    The split is a fixed permutation (seed 0), the same on every machine.
    """
    _check_split(split)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # values 0..16 -> [-1, 1]
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    n_test = int(np.ceil(len(images) * DIGITS_TEST_FRACTION))  # 360
    index = order[n_test:] if split == "train" else order[:n_test]
    index = np.sort(index)
    return ImageData(torch.from_numpy(images[index][:, None].copy()), torch.from_numpy(labels[index].copy()), 10)


class _SafeUnpickler(pickle.Unpickler):
    """Allows only what CIFAR's batch files contain: dicts, lists, bytes, str, numbers, ndarrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not an allowed CIFAR batch type")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _SafeUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with b'data' and b'labels', got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: expected keys 'data' and 'labels', found {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise ValueError(f"{path}: expected 'data' as uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: expected {data.shape[0]} labels, got shape {labels.shape}")
    return data, labels


def load_cifar10(root: str | Path, split: str = "train") -> ImageData:
    """CIFAR-10 from ``root`` holding the python-version batch files (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``; ``root`` may also be the parent of ``cifar-10-batches-py``).

    Returns (N, 3, 32, 32) float32 in [-1, 1] and int64 labels.
    """
    _check_split(split)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {str(root)!r} (expected the extracted "
                                "'cifar-10-batches-py' folder with data_batch_1..5 and test_batch)")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 {split} split: missing batch files {missing} in {str(root)!r}")
    parts = [_read_cifar_batch(root / n) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = data.reshape(-1, 3, 32, 32).astype(np.float32) / 127.5 - 1.0  # (N, 3, 32, 32)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), 10)


def load_image_folder(root: str | Path, size: int, channels: int = 3) -> ImageData:
    """Every image under ``root``, resized to ``size`` x ``size``, as (N, channels, size, size).

    If ``root`` holds subfolders with images, each subfolder is a class (sorted names -> 0, 1, ..);
    otherwise all labels are 0 and ``num_classes`` is 1.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(root)!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(i, sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)) for i, d in enumerate(subdirs)]
    groups = [g for g in groups if g[1]]
    if not groups:
        groups = [(0, sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))]
        num_classes = 1
    else:
        num_classes = len(subdirs)
    files = [(label, f) for label, fs in groups for f in fs]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {str(root)!r}")
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for k, (_, f) in enumerate(files):
        with Image.open(f) as im:
            im = im.convert(mode).resize((size, size), Image.BICUBIC)
            images[k] = np.asarray(im).reshape(size, size, channels)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0  # (N, C, H, W)
    labels = np.array([label for label, _ in files], dtype=np.int64)
    return ImageData(torch.from_numpy(x), torch.from_numpy(labels), num_classes)


def get_dataset(name: str, root: str | Path | None = None, split: str = "train",
                image_size: int = 32, channels: int = 3) -> ImageData:
    """Dispatch on ``name`` in ("digits", "cifar10", "folder"); ``root`` is needed by the last two.

    A folder has no split of its own: ``split`` is ignored for it.
    """
    if name == "digits":
        return load_digits(split)
    if name in ("cifar10", "folder") and root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (--data-root)")
    if name == "cifar10":
        return load_cifar10(root, split)
    if name == "folder":
        return load_image_folder(root, image_size, channels)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
