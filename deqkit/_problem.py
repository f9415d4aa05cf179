"""The map being solved, as the loop and the solver steps see it.

``Problem`` counts calls of f, checks what f returns and that it changed nothing in place,
evaluates only the samples still iterating (``active_set``), holds the working rows once the
loop compacts them, computes Jacobian-vector products, and remembers the loop's last residual
so a solver step can reuse it.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, cast

import numpy as np
import torch
from torch import Tensor

from ._context import host_side, rows_scope
from ._numerics import flat_norm, scaled_norm, work_dtype


@host_side
def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array as a tensor on ``device``: shared memory on the CPU, an asynchronous copy
    from pinned memory on CUDA (so it is not a host synchronisation)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@host_side
def _on_host(pair: Tensor, diff: Tensor, fz: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``pair`` (the two per-sample norms) on the host in float64; where a norm overflowed or
    f(z) holds NaN/Inf, norms that cannot overflow (``scaled_norm``) instead."""
    host = pair.cpu().numpy().astype(np.float64)
    if not np.isfinite(host).all():
        host = torch.stack([scaled_norm(diff), scaled_norm(fz)]).cpu().numpy().astype(np.float64)
    return host[0], host[1]


def _versions(tensors: Sequence[Any]) -> tuple[Optional[int], ...]:
    """Version counters, torch's record of in-place changes; None where a tensor has none
    (not a tensor, or an inference tensor: ``torch.inference_mode`` does not count versions)."""
    return tuple(t._version if isinstance(t, Tensor) and not t.is_inference() else None for t in tensors)


def _check_inputs_per_sample(inputs: tuple[Any, ...], batch: int) -> None:
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            continue
        if x.dim() == 0 or x.shape[0] != batch:
            raise ValueError(
                f"with active_set=True every tensor in inputs= is per-sample and sliced with z, so its "
                f"first dim must be the batch size {batch}; inputs[{i}] has shape {tuple(x.shape)}. "
                "Pass tensors shared by all samples (weights, per-feature vectors) through f's closure "
                "or module instead."
            )
        if x.dim() == 1:
            raise ValueError(
                f"with active_set=True, inputs[{i}] of shape {tuple(x.shape)} is ambiguous: one value per "
                f"sample, or a vector shared by all samples whose length happens to equal the batch size "
                f"{batch}? Pass per-sample values as shape ({batch}, 1) (they are sliced with z), "
                "and shared tensors through f's closure or module."
            )


# What torch says when forward mode has no derivative: an operation without a forward formula
# ("... not implemented", "forward AD"), a custom autograd.Function without ``jvp``
# (NotImplementedError), or an old-style one (no ``setup_context``, refused by torch.func).
_NO_FORWARD_AD = ("forward ad", "forward-mode", "forward mode", "jvp", "setup_context")


def _no_forward_derivative(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or any(phrase in text for phrase in _NO_FORWARD_AD)


class Problem:
    """The map being solved, as solver steps see it: counted calls, JVPs, the active mask.

    ``f(z, *inputs)`` is called on the whole batch, or with ``active_set=True`` on the rows of
    samples still iterating: every tensor in ``inputs`` is then per-sample (its first dim is the
    batch) and is sliced along with z; shared tensors belong in f's closure or module.
    ``call`` is how each call of f is made (the backward mode's wrapping, e.g. activation
    checkpointing; default f itself); Jacobian-vector products call f directly.

    Every call checks that f left z and the inputs unchanged (tensor version counters; inference
    tensors have none, so under ``torch.inference_mode`` only tensors made outside it are
    checked) and returned z's shape, dtype and device; an exception raised by f reaches the
    caller with its own type.
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        z0: Tensor,
        inputs: Sequence[Any] = (),
        active_set: bool = False,
        call: Optional[Callable[..., Tensor]] = None,
    ):
        self._f = f
        self._call_f = f if call is None else call
        self._inputs = tuple(inputs)
        self._batch = z0.shape[0]
        self._shape, self._dtype, self._device = z0.shape, z0.dtype, z0.device
        self.active_set = active_set
        if active_set:
            _check_inputs_per_sample(self._inputs, self._batch)
        self.nfev = 0
        self.sample_evals = 0
        self._no_forward_ad = False
        self.restart()

    def restart(self) -> None:
        """The whole batch again, every sample active (a loop that continues another's solve);
        the counts of calls go on."""
        self._work: Tensor | None = None  # the working rows (global indices), None for the whole batch
        self._work_inputs = self._inputs  # inputs restricted to the working rows
        self._active = torch.ones(self._batch, dtype=torch.bool, device=self._device)
        self._idx: Tensor | None = None  # positions (in the working rows) still iterating, None when all are
        self._residual: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def active(self) -> Tensor:
        """BoolTensor over the rows a step sees: the samples still iterating."""
        return self._active

    @active.setter
    def active(self, mask: Tensor) -> None:
        self._active = mask
        idx = torch.nonzero(mask).flatten()
        self._idx = None if idx.numel() == mask.shape[0] else idx

    @host_side
    def set_active(self, mask: np.ndarray) -> None:
        """The loop's form of the setter: a host mask over the working rows (no device sync)."""
        self._active = to_device(mask, self._device)
        self._idx = None if mask.all() else to_device(np.flatnonzero(mask), self._device)

    @host_side
    def compact(self, keep: np.ndarray) -> Tensor:
        """Shrink the working rows to positions ``keep`` of the current ones; returns them as a
        device index for the loop to select its own tensors and the solver's state with."""
        local = to_device(keep, self._device)
        self._work = local if self._work is None else self._work.index_select(0, local)
        self._work_inputs = tuple(x.index_select(0, local) if isinstance(x, Tensor) else x for x in self._work_inputs)
        self._active = torch.ones(keep.size, dtype=torch.bool, device=self._device)
        self._idx = None
        return local

    @property
    def work_rows(self) -> Tensor | None:
        """Rows of the original batch the working tensors hold (None: all, in order)."""
        return self._work

    # -- the loop's residual, shared with the solver's next step ------------------------------
    def norms(self, z: Tensor, fz: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample ``||f(z) - z||`` and ``||f(z)||`` on the host, in float64: the loop's one
        wait for the device per test of convergence. The residual and its norm are kept for the
        solver's next step (``residual``). No graph."""
        dtype = work_dtype(z.dtype)
        if torch.is_grad_enabled():
            z, fz = z.detach(), fz.detach()
        diff = fz - z
        pair = torch.stack([flat_norm(diff, dtype), flat_norm(fz, dtype)])
        self._residual = (z, fz, diff, pair[0])
        return _on_host(pair, diff, fz)

    def residual(self, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(z) - z, ||f(z) - z||)`` per sample, flattened to (B, d) and (B,), in float32 or
        better. The loop has usually just computed both for its test of convergence, and then
        they are reused (no graph); otherwise they are computed here."""
        dt = work_dtype(z.dtype)
        b = z.shape[0]
        last = self._residual
        if last is not None and last[2].dtype == dt and not torch.is_grad_enabled():
            lz, lfz, diff, norm = last
            if lz is z and lfz is fz:
                return diff.reshape(b, -1), norm
        g = fz.reshape(b, -1).to(dt) - z.reshape(b, -1).to(dt)
        return g, torch.linalg.vector_norm(g, dim=1)

    # -- evaluation -------------------------------------------------------------------------
    def _call(self, z: Tensor, inputs: tuple[Any, ...]) -> Tensor:
        # the in-place check reads version counters, which torch.compile cannot trace (a graph
        # break per call of f), so under torch.compile an in-place f is not detected
        watch = not torch.compiler.is_compiling()
        before = _versions((z, *inputs)) if watch else ()
        out = self._call_f(z, *inputs)
        after = _versions((z, *inputs)) if watch else ()
        if after != before:
            changed = [name for name, a, b in zip(["z"] + [f"inputs[{i}]" for i in range(len(inputs))], before, after) if a != b]
            raise ValueError(
                f"f changed its argument(s) {changed} in place (e.g. z.mul_(...)); the solver keeps and "
                "reuses its iterates, so f must compute its result out of place (z * 0.5, not z.mul_(0.5))"
            )
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(out).__name__}")
        if out.shape != z.shape or out.dtype != self._dtype or out.device != self._device:
            return self._check(out, z)
        return out

    def _check(self, out: Tensor, z: Tensor) -> Tensor:
        if out.shape != z.shape:  # under the active set, evaluate() adds a note on inputs=
            raise ValueError(
                f"f must return a tensor of the same shape as z: f(z) has shape "
                f"{tuple(out.shape)}, z has shape {tuple(z.shape)}"
            )
        if out.device != self._device:
            raise ValueError(f"f must return a tensor on z0's device: got {out.device}, z0 is on {self._device}")
        if out.dtype != self._dtype:
            if torch.is_autocast_enabled(self._device.type):
                out = out.to(self._dtype)  # f ran under autocast; the state keeps z0's dtype
            else:
                raise ValueError(
                    f"f must return z0's dtype: f(z) is {out.dtype}, z0 is {self._dtype} "
                    "(under autocast the output is cast back automatically)"
                )
        return out

    def f(self, z: Tensor) -> Tensor:
        """One counted call of the map on the working rows (the whole batch unless the active
        set has compacted it)."""
        self.nfev += 1
        self.sample_evals += z.shape[0]
        if self._work is None:
            return self._call(z, self._inputs)
        return self._call_rows(z, self._work_inputs, self._work)

    def evaluate(self, z: Tensor, previous: Tensor | None) -> Tensor:
        """f(z) for the active samples; stopped samples keep ``previous`` (active set only)."""
        idx = self._idx
        if not self.active_set or previous is None or idx is None:
            return self.f(z)
        inputs = tuple(x.index_select(0, idx) if isinstance(x, Tensor) else x for x in self._work_inputs)
        rows = idx if self._work is None else self._work.index_select(0, idx)
        self.nfev += 1
        self.sample_evals += idx.numel()
        return previous.index_copy(0, idx, self._call_rows(z.index_select(0, idx), inputs, rows))

    def _call_rows(self, z: Tensor, inputs: tuple[Any, ...], rows: Tensor) -> Tensor:
        """f on some rows of the batch (active set): the rows are visible to f through
        ``deqkit``'s context, and f's exceptions say where they happened."""
        with rows_scope(rows):
            try:
                return self._call(z, inputs)
            except Exception as err:  # f's own exception, type unchanged, with where it happened
                if hasattr(err, "add_note"):
                    err.add_note(
                        f"deqkit: raised by f called on {rows.numel()} of {self._batch} samples (active_set=True); "
                        "f must treat samples independently, with per-sample inputs passed through inputs=."
                    )
                raise

    def jvp(self, z: Tensor, v: Tensor, fz: Tensor | None = None, method: str = "auto") -> Tensor:
        """``J_f(z) v``, counted as one evaluation of f.

        ``method``: "forward" (forward-mode AD, exact), "finite_difference"
        (``(f(z + h v) - f(z)) / h``, needs ``fz = f(z)``; accurate to about the square root of
        the dtype's epsilon) or "auto" (forward mode; where it fails, for a map with an operation
        or a custom autograd Function that has no forward-mode derivative, finite differences
        from then on; any other error is f's own and reaches the caller).
        """
        if method == "forward" or (method == "auto" and not self._no_forward_ad):
            try:
                return self._forward_jvp(z, v)
            except (NotImplementedError, RuntimeError) as err:
                if method == "forward" or not _no_forward_derivative(err):
                    raise  # asked for explicitly, or f's own error: not swallowed
                self._no_forward_ad = True  # finite differences from now on
        if fz is None:
            raise ValueError("a finite-difference JVP needs fz = f(z)")
        return self._finite_difference_jvp(z, v, fz)

    def _forward_jvp(self, z: Tensor, v: Tensor) -> Tensor:
        inputs, rows = self._work_inputs, self._work
        with warnings.catch_warnings():  # torch's own first-use notice in forward AD
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
            with rows_scope(rows):
                # a primal must not overlap itself (an expanded z0 does): make_dual refuses it
                _, tangent = torch.func.jvp(lambda u: self._f(u, *inputs), (z.contiguous(),), (v.to(z.dtype).contiguous(),))[:2]
        self.nfev += 1
        self.sample_evals += z.shape[0]
        return cast(Tensor, tangent).to(self._dtype)

    def _finite_difference_jvp(self, z: Tensor, v: Tensor, fz: Tensor) -> Tensor:
        b = z.shape[0]
        eps = torch.finfo(work_dtype(z.dtype)).eps
        zn = torch.linalg.vector_norm(z.reshape(b, -1).float(), dim=1)
        vn = torch.linalg.vector_norm(v.reshape(b, -1).float(), dim=1).clamp_min(1e-30)
        h = (eps ** 0.5) * (1 + zn) / vn  # (B,) per-sample step
        hb = h.reshape((-1,) + (1,) * (z.dim() - 1)).to(z.dtype)
        return cast(Tensor, (self.f(z + hb * v.to(z.dtype)) - fz) / hb)
