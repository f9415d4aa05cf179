"""A training monitor for equilibrium solves: one record per training step, a trend, a warning.

The functional core is two pure functions: ``summarize_solves`` turns the ``Stats`` of the
solves of one training step (forward and backward) into a ``SolveRecord``, and
``solve_trend`` compares a window of records from the start of training with the latest
window (a ``Trend``). ``Monitor`` keeps those windows, writes each record to JSONL, CSV and
TensorBoard, and warns once when the trend degrades.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Protocol, Sequence, Union

import torch

from ._checks import above, boolean, integer, is_number
from ._result import Result, Solution, Stats

PathLike = Union[str, "os.PathLike[str]"]


class ScalarWriter(Protocol):
    """What ``Monitor`` needs of a TensorBoard writer (``torch.utils.tensorboard.SummaryWriter``)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...


@dataclasses.dataclass(frozen=True)
class SolveRecord:
    """What the equilibrium solves of one training step did, in plain numbers.

    Counts are summed over the step's solves; fractions and quantiles pool their samples.
    ``escaped``, ``fallbacks`` and ``nfev_by_solver`` are ``None`` when a solve's ``Stats``
    does not record them. ``to_dict`` gives the flat, JSON-ready form that ``Monitor``
    writes; ``from_dict`` reads it back.
    """

    step: int
    """The training step (``Monitor`` counts from 0 unless told)."""
    solves: int
    """Forward solves aggregated in this record."""
    samples: int
    """Samples over those solves (the sum of their batch sizes)."""
    nfev: int
    """Calls of ``f`` in the forward solves (a batched call counts once)."""
    sample_evals: int
    """Rows of the batch passed through ``f`` in the forward solves."""
    steps_mean: float
    """Mean forward iterations per sample."""
    residual_median: float
    """Median of the samples' final forward residuals (each in its solve's ``stop_mode``)."""
    residual_q90: float
    """90th percentile of those residuals."""
    residual_max: float
    """The largest of those residuals."""
    converged: float
    """Fraction of samples that ended with ``Result.SUCCESS``."""
    failed: int
    """Samples that did not end with ``Result.SUCCESS``."""
    escaped: Optional[int]
    """Samples that ended ``ESCAPED`` (a relative test met only because ``|z|`` grew)."""
    fallbacks: Optional[int]
    """Samples whose answer came from a later solver of a ``Fallback`` chain."""
    nfev_by_solver: Optional[tuple[int, ...]]
    """Calls of ``f`` in the forward loop by each solver of the chain (one entry for a plain
    solver), summed by position."""
    backward_passes: int
    """Implicit backward passes (adjoint solves) recorded in the solves' ``Stats.backward``."""
    backward_nfev: int
    """Vector-Jacobian products of those passes."""
    backward_residual_max: Optional[float]
    """The largest final adjoint residual over those passes (``None`` without any)."""
    backward_failed: int
    """Backward passes that did not end with ``Result.SUCCESS``."""
    scalars: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """The caller's own numbers for the step (loss, learning rate, Jacobian weight...)."""

    def to_dict(self) -> dict[str, Any]:
        """The record as one flat dict: the fields above, then ``scalars`` by name."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scalars"}
        if out["nfev_by_solver"] is not None:
            out["nfev_by_solver"] = list(out["nfev_by_solver"])
        out.update(self.scalars)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SolveRecord":
        """The record ``to_dict`` (or a line of ``Monitor``'s JSONL) describes."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "scalars"]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"SolveRecord.from_dict: missing field(s) {missing}")
        values = {n: data[n] for n in names}
        if values["nfev_by_solver"] is not None:
            values["nfev_by_solver"] = tuple(values["nfev_by_solver"])
        scalars = {k: v for k, v in data.items() if k not in values}
        return cls(**values, scalars=scalars)


_FIELDS = frozenset(f.name for f in dataclasses.fields(SolveRecord))


def _stats_of(solve: Any, index: int) -> Stats:
    if isinstance(solve, Solution):
        return solve.stats
    if isinstance(solve, Stats) or hasattr(solve, "status"):  # a Stats, or a record with its fields
        return solve  # type: ignore[no-any-return]
    raise TypeError(f"solve {index} must be a deqkit.Solution or deqkit.Stats, got {type(solve).__name__}")


def _count(values: list[Optional[int]]) -> Optional[int]:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _by_position(chains: list[Optional[tuple[int, ...]]]) -> Optional[tuple[int, ...]]:
    if any(c is None for c in chains):
        return None
    width = max(len(c) for c in chains if c is not None)
    return tuple(sum(c[i] for c in chains if c is not None and i < len(c)) for i in range(width))


def _check_scalars(scalars: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in scalars.items():
        if name in _FIELDS:
            raise ValueError(f"scalar {name!r} has the name of a SolveRecord field; choose another name")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"scalar {name!r} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
            value = value.item()
        if not is_number(value):
            raise TypeError(f"scalar {name!r} must be a number, got {type(value).__name__}")
        out[name] = float(value)
    return out


def summarize_solves(*solves: Union[Solution, Stats], step: int = 0, **scalars: Any) -> SolveRecord:
    """One ``SolveRecord`` for the solves of a training step.

    Call it after ``loss.backward()``: an implicit backward pass appends its ``BackwardStats``
    to the solve's ``Stats.backward`` only when autograd runs it.

    Args:
        *solves: the step's ``Solution``s (or their ``Stats``), one or more; for a model with
            several equilibrium layers, each layer's.
        step: the training step the record is for.
        **scalars: numbers of your own to keep beside the solves' (a float, an int or a
            one-element tensor each), e.g. ``loss=loss``.

    Example:
        >>> import torch, deqkit
        >>> sol = deqkit.fixed_point(lambda z: 0.5 * z + 1.0, torch.zeros(4, 3), tol=1e-6)
        >>> rec = deqkit.summarize_solves(sol, step=7, lr=1e-3)
        >>> rec.step, rec.samples, rec.converged, rec.nfev == sol.stats.nfev, rec.scalars
        (7, 4, 1.0, True, {'lr': 0.001})
    """
    if not solves:
        raise ValueError("summarize_solves needs at least one Solution or Stats")
    step = integer("step", step, minimum=0)
    stats = [_stats_of(s, i) for i, s in enumerate(solves)]
    clean = _check_scalars(scalars)
    residual = torch.cat([s.residual.detach().reshape(-1).to("cpu", torch.float64) for s in stats])
    status = torch.cat([s.status.detach().reshape(-1).cpu() for s in stats])
    steps = torch.cat([s.steps.detach().reshape(-1).to("cpu", torch.float64) for s in stats])
    quantiles = torch.quantile(residual, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
    success = status == int(Result.SUCCESS)
    escaped = [getattr(s, "escaped", None) for s in stats]
    finished_by = [getattr(s, "finished_by", None) for s in stats]
    chains = [getattr(s, "nfev_by_solver", None) for s in stats]
    passes = [b for s in stats for b in s.backward]
    return SolveRecord(
        step=step,
        solves=len(stats),
        samples=int(status.numel()),
        nfev=sum(int(s.nfev) for s in stats),
        sample_evals=sum(int(s.sample_evals) for s in stats),
        steps_mean=float(steps.mean()),
        residual_median=float(quantiles[0]),
        residual_q90=float(quantiles[1]),
        residual_max=float(residual.max()),
        converged=float(success.double().mean()),
        failed=int((~success).sum()),
        escaped=_count([None if e is None else int(e.sum()) for e in escaped]),
        fallbacks=_count([None if b is None else int((b > 0).sum()) for b in finished_by]),
        nfev_by_solver=_by_position([tuple(int(n) for n in c) if c else None for c in chains]),
        backward_passes=len(passes),
        backward_nfev=sum(int(b.nfev) for b in passes),
        backward_residual_max=max((float(b.residual.max()) for b in passes), default=None),
        backward_failed=sum(b.result != Result.SUCCESS for b in passes),
        scalars=clean,
    )


@dataclasses.dataclass(frozen=True)
class Trend:
    """How the solves of the latest window of steps compare with those of the first window."""

    window: int
    """Records in each window."""
    baseline_steps: tuple[int, int]
    """First and last step of the baseline window (the start of training)."""
    recent_steps: tuple[int, int]
    """First and last step of the recent window."""
    baseline_nfev: float
    """Mean forward calls of ``f`` per step over the baseline window."""
    recent_nfev: float
    """The same over the recent window."""
    baseline_converged: float
    """Mean converged fraction over the baseline window."""
    recent_converged: float
    """The same over the recent window."""

    @property
    def nfev_ratio(self) -> float:
        """``recent_nfev / baseline_nfev``: above 1, the solves take more calls of ``f``."""
        return self.recent_nfev / self.baseline_nfev if self.baseline_nfev > 0 else math.inf

    @property
    def converged_drop(self) -> float:
        """``baseline_converged - recent_converged``: above 0, fewer samples converge."""
        return self.baseline_converged - self.recent_converged


def solve_trend(baseline: Sequence[SolveRecord], recent: Sequence[SolveRecord]) -> Trend:
    """Compare two windows of records (each non-empty, of the same length).

    Example:
        >>> import torch, deqkit
        >>> def rec(step, nfev):
        ...     return dataclasses.replace(base, step=step, nfev=nfev)
        >>> import dataclasses
        >>> base = deqkit.summarize_solves(deqkit.fixed_point(lambda z: 0.5 * z, torch.ones(2, 3)))
        >>> t = deqkit.solve_trend([rec(0, 10), rec(1, 12)], [rec(8, 20), rec(9, 24)])
        >>> t.nfev_ratio, t.baseline_steps, t.recent_steps
        (2.0, (0, 1), (8, 9))
    """
    if not baseline or not recent:
        raise ValueError(f"solve_trend needs two non-empty windows, got {len(baseline)} and {len(recent)} records")
    if len(baseline) != len(recent):
        raise ValueError(f"solve_trend's windows must have the same length, got {len(baseline)} and {len(recent)}")

    def mean(records: Sequence[SolveRecord], name: str) -> float:
        return sum(float(getattr(r, name)) for r in records) / len(records)

    return Trend(
        window=len(baseline),
        baseline_steps=(baseline[0].step, baseline[-1].step),
        recent_steps=(recent[0].step, recent[-1].step),
        baseline_nfev=mean(baseline, "nfev"),
        recent_nfev=mean(recent, "nfev"),
        baseline_converged=mean(baseline, "converged"),
        recent_converged=mean(recent, "converged"),
    )


def _threshold(name: str, value: Any, bound: float, hint: str) -> Optional[float]:
    return None if value is None else above(name, value, bound, hint)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return value


class Monitor:
    """Per training step, a ``SolveRecord`` of the equilibrium solves, written where you ask,
    and a ``RuntimeWarning`` (once per kind) when the solves degrade as training goes on.

    The first ``window`` records (after ``warmup`` steps) are the baseline; from then on, once
    another ``window`` records have come, each step compares the last ``window`` records with
    it (``trend``). The warnings fire when the mean NFE per step has grown past ``nfev_factor``
    times the baseline's, and when the mean converged fraction has fallen by more than
    ``converged_drop``: the signs that the map is losing its contraction (see the how-to
    "My DEQ stopped converging"). ``AdaptiveJacobianWeight`` reacts to the same ``trend``.

    Args:
        jsonl: a file to write one JSON object per record to (flushed every step).
        csv: a file to write one CSV row per record to (the columns are fixed by the first
            record; ``nfev_by_solver`` is written as a JSON list).
        tensorboard: a folder for ``torch.utils.tensorboard.SummaryWriter`` (needs the
            ``tensorboard`` package), or a writer of your own with ``add_scalar``; each number
            of the record goes under the tag ``"{name}/{field}"``. A writer you pass stays open
            on ``close()``; one the monitor made is closed.
        window: records per window of the trend, >= 1.
        warmup: steps left out of the baseline (the first steps, while the model leaves its
            initialisation), >= 0.
        nfev_factor: warn when the recent mean NFE exceeds this times the baseline's
            (> 1; None: never).
        converged_drop: warn when the mean converged fraction falls by more than this
            (in (0, 1]; None: never).
        append: add to existing files instead of replacing them (a resumed run; the CSV
            header is then checked against the file's).
        name: the prefix of TensorBoard tags and of the warnings.

    Holds no global state; open files are closed by ``close()`` or by using the monitor as a
    context manager. ``state_dict()`` / ``load_state_dict()`` carry the windows, the step
    count and the warnings already given across a checkpoint.

    Example:
        >>> import torch, deqkit
        >>> cell = torch.nn.Linear(8, 8)
        >>> deq = deqkit.DEQ(lambda z, x: torch.tanh(0.5 * cell(z) + x), tol=1e-5)
        >>> monitor = deqkit.Monitor(window=2)
        >>> for _ in range(5):
        ...     sol = deq(torch.randn(4, 8))
        ...     sol.value.pow(2).mean().backward()
        ...     record = monitor.step(sol, loss=1.0)   # after backward: the adjoint solve is in it
        >>> record.step, record.backward_passes, monitor.trend.window
        (4, 1, 2)
    """

    def __init__(
        self,
        *,
        jsonl: Optional[PathLike] = None,
        csv: Optional[PathLike] = None,
        tensorboard: Union[PathLike, ScalarWriter, None] = None,
        window: int = 50,
        warmup: int = 0,
        nfev_factor: Optional[float] = 1.5,
        converged_drop: Optional[float] = 0.1,
        append: bool = False,
        name: str = "deqkit",
    ):
        self.window = integer("window", window, minimum=1)
        self.warmup = integer("warmup", warmup, minimum=0)
        self.nfev_factor = _threshold("nfev_factor", nfev_factor, 1.0, " or None")
        self.converged_drop = _threshold("converged_drop", converged_drop, 0.0, " or None")
        if self.converged_drop is not None and self.converged_drop > 1:
            raise ValueError(f"converged_drop must be at most 1 (a fraction), got {converged_drop!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self._append = boolean("append", append)
        self._baseline: list[SolveRecord] = []
        self._recent: collections.deque[SolveRecord] = collections.deque(maxlen=self.window)
        self._next_step = 0
        self._seen = 0
        self._closed = False
        self._warned: set[str] = set()
        self.last: Optional[SolveRecord] = None
        """The latest record (None before the first step)."""
        self._files: list[IO[str]] = []
        self._tb: Optional[ScalarWriter] = None
        self._tb_owned = False
        self._csv_columns: Optional[list[str]] = None
        self._csv_writer: Optional[Any] = None
        try:
            self._jsonl = self._open("jsonl", jsonl)
            self._csv_file = self._open("csv", csv)
            self._tb, self._tb_owned = self._writer(tensorboard)
        except BaseException:  # a bad later argument leaves no file open
            self.close()
            raise

    # -- outputs ---------------------------------------------------------------------------

    def _open(self, what: str, path: Optional[PathLike]) -> Optional[IO[str]]:
        if path is None:
            return None
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{what} must be a path (str or os.PathLike) or None, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{what}={str(path)!r} is a folder; give a file path")
        if not path.parent.is_dir():
            raise ValueError(f"{what}={str(path)!r}: the folder {str(path.parent)!r} does not exist")
        handle = open(path, "a" if self._append else "w", newline="" if what == "csv" else None)
        self._files.append(handle)
        return handle

    def _writer(self, tensorboard: Union[PathLike, ScalarWriter, None]) -> tuple[Optional[ScalarWriter], bool]:
        if tensorboard is None:
            return None, False
        if hasattr(tensorboard, "add_scalar"):
            return tensorboard, False  # type: ignore[return-value]
        if not isinstance(tensorboard, (str, os.PathLike)):
            raise TypeError("tensorboard must be a folder (str or os.PathLike), an object with add_scalar "
                            f"(a SummaryWriter), or None; got {type(tensorboard).__name__}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"tensorboard={str(tensorboard)!r} needs the tensorboard package (pip install tensorboard): "
                              f"{exc}") from exc
        return SummaryWriter(log_dir=str(tensorboard)), True

    def _write(self, record: SolveRecord) -> None:
        row = record.to_dict()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._csv_file is not None:
            self._write_csv(row)
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{self.name}/{key}/{i}", v, record.step)
                elif value is not None and key != "step":
                    self._tb.add_scalar(f"{self.name}/{key}", value, record.step)

    def _write_csv(self, row: dict[str, Any]) -> None:
        assert self._csv_file is not None
        if self._csv_columns is None:
            self._csv_columns = list(row)
            existing = self._csv_header() if self._append else None
            if existing is not None and existing != self._csv_columns:
                raise ValueError(f"csv={self._csv_file.name!r}: the file's columns {existing} differ from this "
                                 f"record's {self._csv_columns}; write to a new file or log the same scalars")
            self._csv_writer = csv.DictWriter(self._csv_file, fieldnames=self._csv_columns)
            if existing is None:
                self._csv_writer.writeheader()
        if list(row) != self._csv_columns:
            raise ValueError(f"csv: the record of step {row['step']} has the columns {list(row)}, the file "
                             f"{self._csv_columns}; pass the same scalars at every step")
        assert self._csv_writer is not None
        self._csv_writer.writerow({k: _cell(v) for k, v in row.items()})
        self._csv_file.flush()

    def _csv_header(self) -> Optional[list[str]]:
        assert self._csv_file is not None
        with open(self._csv_file.name, newline="") as handle:
            header = next(csv.reader(handle), None)
        return header or None

    def close(self) -> None:
        """Close the files and the TensorBoard writer the monitor opened (idempotent); no
        step can be recorded after it."""
        self._closed = True
        for handle in self._files:
            handle.close()
        self._files = []
        if self._tb is not None and self._tb_owned:
            self._tb.close()  # type: ignore[attr-defined]
            self._tb = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- records and trend -----------------------------------------------------------------

    def step(self, *solves: Union[Solution, Stats], step: Optional[int] = None, **scalars: Any) -> SolveRecord:
        """Record the solves of one training step (call it after ``loss.backward()``), write
        the record, check the trend, and return the record.

        Args:
            *solves: the step's ``Solution``s or ``Stats``, one or more.
            step: the training step (default: one more than the last, from 0); steps must
                increase.
            **scalars: numbers of your own for the record (``loss=...``).
        """
        if self._closed:
            raise ValueError("Monitor.step: the monitor is closed")
        step = self._next_step if step is None else integer("step", step, self._next_step, " (steps increase)")
        record = summarize_solves(*solves, step=step, **scalars)
        self._next_step = step + 1
        self._seen += 1
        self.last = record
        if self._seen > self.warmup and len(self._baseline) < self.window:
            self._baseline.append(record)
        elif len(self._baseline) == self.window:
            self._recent.append(record)
        self._write(record)
        self._check(stacklevel=3)
        return record

    @property
    def trend(self) -> Optional[Trend]:
        """The recent window against the baseline; None until both are full."""
        if len(self._recent) < self.window:
            return None
        return solve_trend(self._baseline, list(self._recent))

    def _check(self, stacklevel: int) -> None:
        trend = self.trend
        if trend is None:
            return
        b0, b1 = trend.baseline_steps
        r0, r1 = trend.recent_steps
        where = f"(mean of steps {b0}-{b1} against steps {r0}-{r1})"
        advice = ("the map is losing its contraction: see the how-to 'My DEQ stopped converging' "
                  "(jacobian_reg, AdaptiveJacobianWeight, Fallback)")
        if self.nfev_factor is not None and "nfev" not in self._warned and trend.nfev_ratio > self.nfev_factor:
            self._warned.add("nfev")
            warnings.warn(
                f"{self.name}: NFE per step rose {trend.nfev_ratio:.2f}x, from {trend.baseline_nfev:.1f} to "
                f"{trend.recent_nfev:.1f} {where}, past nfev_factor={self.nfev_factor:g}; {advice}",
                RuntimeWarning, stacklevel=stacklevel)
        if (self.converged_drop is not None and "converged" not in self._warned
                and trend.converged_drop > self.converged_drop):
            self._warned.add("converged")
            warnings.warn(
                f"{self.name}: the converged fraction fell from {trend.baseline_converged:.1%} to "
                f"{trend.recent_converged:.1%} {where}, a drop of more than converged_drop={self.converged_drop:g}; "
                f"{advice}", RuntimeWarning, stacklevel=stacklevel)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The windows, the next step and the warnings given, as plain data (JSON- and
        ``torch.save``-ready)."""
        return {"next_step": self._next_step, "seen": self._seen, "warned": sorted(self._warned),
                "baseline": [r.to_dict() for r in self._baseline], "recent": [r.to_dict() for r in self._recent],
                "window": self.window}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()`` (the same ``window``): the trend and the warnings go on
        as if the run had not stopped."""
        if state.get("window") != self.window:
            raise ValueError(f"load_state_dict: the state was saved with window={state.get('window')!r}, "
                             f"this monitor has window={self.window}")
        self._next_step = int(state["next_step"])
        self._seen = int(state["seen"])
        self._warned = set(state["warned"])
        self._baseline = [SolveRecord.from_dict(r) for r in state["baseline"]]
        self._recent = collections.deque((SolveRecord.from_dict(r) for r in state["recent"]), maxlen=self.window)

    def __repr__(self) -> str:
        return (f"Monitor(window={self.window}, warmup={self.warmup}, nfev_factor={self.nfev_factor}, "
                f"converged_drop={self.converged_drop}, records={self._seen}, name={self.name!r})")


def read_records(path: PathLike) -> list[SolveRecord]:
    """The records of a ``Monitor``'s JSONL file, in order."""
    with open(path) as handle:
        return [SolveRecord.from_dict(json.loads(line)) for line in handle if line.strip()]
