"""Images: tiled sample grids and matplotlib figures, written atomically as PNGs."""

from __future__ import annotations

import io
import os
import textwrap
from typing import Any

import numpy as np
import torch

from . import fileio

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
    fileio.atomic_write_bytes(path, buffer.getvalue())


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, title: str,
                    labels: torch.Tensor | None = None, nrow: int | None = None) -> None:
    """Save images (N, C, H, W) in [-1, 1] as a titled, labelled PNG grid (:func:`grid_figure`), atomically."""
    save_figure(grid_figure(images, title=title, labels=labels, nrow=nrow), path)
