"""Numerics shared by the loop, the solvers and the diagnostics: per-sample norms and products,
slot writes into a solver's history, and the Arnoldi (modified Gram-Schmidt) step.

Every tensor here is batched along dim 0 and flattened to (B, d) where a product needs it.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of solver arithmetic: float32 or better, whatever the state's dtype."""
    return torch.promote_types(dtype, torch.float32)


def flat_norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-sample L2 norm over all dims but the first, computed in ``dtype``."""
    return cast(Tensor, torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=dtype))


def scaled_norm(x: Tensor) -> Tensor:
    """Per-sample L2 norm in float64 that cannot overflow: ``max|x| * ||x / max|x|||``.

    Finite for every finite ``x`` of a float dtype up to float32 (float64 entries near its own
    maximum can still give Inf); NaN when ``x`` holds Inf or NaN. No graph.
    """
    with torch.no_grad():
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        top = flat.abs().amax(dim=1, keepdim=True)
        safe = torch.where(top > 0, top, torch.ones_like(top))
        norm = torch.linalg.vector_norm(flat / safe, dim=1) * safe.squeeze(1)
        return torch.where(torch.isfinite(top.squeeze(1)), norm, torch.full_like(norm, float("nan")))


# The three products below are written in the forms that hit fast kernels: on CPU,
# einsum("bmd,bd->bm") and einsum("bd,bd->b") fall onto a matrix-times-column-vector path
# that is 10-30x slower for large d than these (measured on torch 2.13).


def batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two (B, d) tensors -> (B,)."""
    return (a * b).sum(dim=1)


def rows_dot(rows: Tensor, v: Tensor) -> Tensor:
    """Inner products of each of m rows with v, per sample: (B, m, d), (B, d) -> (B, m)."""
    return torch.bmm(v.unsqueeze(1), rows.transpose(1, 2)).squeeze(1)


def combine(weights: Tensor, rows: Tensor) -> Tensor:
    """Weighted sum of rows, per sample: (B, m), (B, m, d) -> (B, d)."""
    return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)


def write_slot(buf: Tensor, index: int, value: Tensor, dim: int, inplace: bool) -> Tensor:
    """``buf`` with ``value`` placed at ``index`` along ``dim``: in place (a solver's own history
    buffer, outside autograd), or out of place where autograd records the step (``Unrolled``)."""
    if inplace:
        buf.select(dim, index).copy_(value)
        return buf
    idx = torch.tensor([index], device=buf.device)
    return buf.index_copy(dim, idx, value.unsqueeze(dim))


def arnoldi_step(w: Tensor, basis: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One Arnoldi step by modified Gram-Schmidt, per sample.

    Orthogonalises ``w`` (B, d) against the orthonormal ``basis`` vectors (each (B, d)) one after
    the other and returns ``(w_orth, h, norm)``: the remainder, the coefficients ``h`` (B, j) with
    ``h[:, i] = <w_i, basis[i]>``, and ``||w_orth||`` (B,), the next subdiagonal entry of the
    Hessenberg matrix. Out of place throughout.
    """
    coefficients = []
    for q in basis:
        h = batched_dot(w, q)
        w = w - h.unsqueeze(1) * q
        coefficients.append(h)
    return w, torch.stack(coefficients, dim=1), torch.linalg.vector_norm(w, dim=1)
