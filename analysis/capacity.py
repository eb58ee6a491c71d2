"""Capacity frontier: the largest sequence length per batch size (and batch size per sequence length)
predicted to fit a memory budget, and the GPU check of that frontier. Imports no torch.

`capacity` and `frontier_cells` are pure prediction. `verify` runs the frontier's cells through a
runner passed in (bench.cell.runner.run_cell on a GPU, a fake in tests), at most three runs per point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from analysis.predict import fits_budget, predict
from bench.spec import CellSpec, SpecError

SEQ_LENS: tuple[int, ...] = tuple(2**k for k in range(8, 16))  # 256 ... 32768
BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
MAX_RUNS_PER_POINT = 3


@dataclass(frozen=True)
class Capacity:
    """Largest fitting seq_len per batch size and largest fitting batch size per seq_len (None: none fits)."""

    budget_bytes: int
    max_seq_by_batch: dict[int, int | None]
    max_batch_by_seq: dict[int, int | None]


@dataclass(frozen=True)
class FrontierPoint:
    """One frontier point: along `axis` ("seq_len" for a fixed batch size, "batch_size" for a fixed
    seq_len), the largest spec predicted to fit and the next step up, predicted not to."""

    axis: str
    fixed: int
    fit_spec: dict[str, Any] | None
    next_spec: dict[str, Any] | None


@dataclass
class Verified:
    """What the runs of one frontier point showed: each run's (spec, status) and the measured frontier."""

    point: FrontierPoint
    runs: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    measured_fit: dict[str, Any] | None = None
    agrees: bool | None = None


def cell(base_spec: dict[str, Any], seq_len: int, batch_size: int) -> dict[str, Any]:
    """The base spec at one (seq_len, batch_size)."""
    return {**base_spec, "seq_len": seq_len, "batch_size": batch_size}


def predicted_fit(base_spec: dict[str, Any], budget_bytes: int, seq_len: int, batch_size: int) -> bool:
    """Whether the cell is predicted to fit the budget (an invalid cell, e.g. seq_len past the model's
    context, counts as not fitting; a model the predictor cannot describe is refused, never "none fits")."""
    try:
        return fits_budget(predict(cell(base_spec, seq_len, batch_size), simulate="cached"), budget_bytes)
    except SpecError:
        return False


def _largest(values: Iterable[int], fits: Callable[[int], bool]) -> int | None:
    """Largest value that fits, scanning upwards and stopping at the first miss (memory grows with both
    axes, so nothing past a miss fits)."""
    best = None
    for value in sorted(values):
        if not fits(value):
            break
        best = value
    return best


def capacity(
    base_spec: dict[str, Any],
    budget_bytes: int,
    seq_lens: Iterable[int] = SEQ_LENS,
    batch_sizes: Iterable[int] = BATCH_SIZES,
) -> Capacity:
    """For each batch size the largest seq_len predicted to fit, and for each seq_len the largest batch."""
    seq_lens, batch_sizes = tuple(seq_lens), tuple(batch_sizes)
    by_batch = {
        b: _largest(seq_lens, lambda s, b=b: predicted_fit(base_spec, budget_bytes, s, b))
        for b in batch_sizes
    }
    by_seq = {
        s: _largest(batch_sizes, lambda b, s=s: predicted_fit(base_spec, budget_bytes, s, b))
        for s in seq_lens
    }
    return Capacity(budget_bytes, by_batch, by_seq)


def _next(values: tuple[int, ...], value: int | None) -> int | None:
    """The grid value after `value` (the first one when value is None), None past the end."""
    later = [v for v in values if value is None or v > value]
    return min(later) if later else None


def _budget_spec(base_spec: dict[str, Any], budget_bytes: int) -> dict[str, Any]:
    """The runner caps memory at spec.budget_gb, in decimal GB."""
    return {**base_spec, "budget_gb": budget_bytes / 1e9}


def frontier_cells(
    base_spec: dict[str, Any],
    budget_bytes: int,
    seq_lens: Iterable[int] = SEQ_LENS,
    batch_sizes: Iterable[int] = BATCH_SIZES,
) -> list[FrontierPoint]:
    """Per frontier point, the largest fitting spec and the next step that does not, budget included."""
    seq_lens, batch_sizes = tuple(sorted(seq_lens)), tuple(sorted(batch_sizes))
    cap, base = (
        capacity(base_spec, budget_bytes, seq_lens, batch_sizes),
        _budget_spec(base_spec, budget_bytes),
    )
    points = []
    for b, s in cap.max_seq_by_batch.items():
        nxt = _next(seq_lens, s)
        points.append(FrontierPoint("seq_len", b, s and cell(base, s, b), nxt and cell(base, nxt, b)))
    for s, b in cap.max_batch_by_seq.items():
        nxt = _next(batch_sizes, b)
        points.append(FrontierPoint("batch_size", s, b and cell(base, s, b), nxt and cell(base, s, nxt)))
    return points


def _step(spec: dict[str, Any], axis: str, grid: tuple[int, ...], up: bool) -> dict[str, Any] | None:
    """The same spec one grid step up or down along `axis`; None off the grid."""
    later = [v for v in grid if (v > spec[axis] if up else v < spec[axis])]
    if not later:
        return None
    return {**spec, axis: min(later) if up else max(later)}


def _run(result: Verified, spec: dict[str, Any], run_cell: Callable) -> str:
    row = run_cell(CellSpec.create(**spec))
    result.runs.append((spec, row["status"]))
    result.rows.append(row)
    return row["status"]


def verify_point(point: FrontierPoint, run_cell: Callable, grid: tuple[int, ...]) -> Verified:
    """Run the fit cell and the next one; if the fit cell OOMs step down once, if the next one fits
    step up once (at most three runs). `agrees` is True when the measured frontier equals the prediction."""
    result, axis = Verified(point), point.axis
    fit_status = _run(result, point.fit_spec, run_cell) if point.fit_spec else None
    if fit_status == "ok":
        next_status = _run(result, point.next_spec, run_cell) if point.next_spec else "oom"
        result.measured_fit, result.agrees = point.fit_spec, {"oom": True, "ok": False}.get(next_status)
        if next_status == "ok":
            result.measured_fit = point.next_spec
            above = _step(point.next_spec, axis, grid, up=True)
            if above and _run(result, above, run_cell) == "ok":
                result.measured_fit = above
    elif fit_status == "oom":
        below, result.agrees = _step(point.fit_spec, axis, grid, up=False), False
        if below and _run(result, below, run_cell) == "ok":
            result.measured_fit = below
    elif point.next_spec is not None and fit_status is None:
        result.agrees = {"oom": True, "ok": False}.get(_run(result, point.next_spec, run_cell))
    return result


def _memoised(run_cell: Callable) -> Callable:
    """The frontiers along both axes share cells: run each distinct spec once."""
    rows: dict[str, dict[str, Any]] = {}

    def run(spec: CellSpec) -> dict[str, Any]:
        if spec.cell_id not in rows:
            rows[spec.cell_id] = run_cell(spec)
        return rows[spec.cell_id]

    return run


def verify(
    frontier: list[FrontierPoint],
    run_cell: Callable,
    seq_lens: Iterable[int] = SEQ_LENS,
    batch_sizes: Iterable[int] = BATCH_SIZES,
) -> list[Verified]:
    """Check every frontier point on the GPU through `run_cell(CellSpec) -> row` (bench.cell.runner.run_cell),
    each distinct cell run once. A status other than ok / oom (error, timeout) leaves `agrees` None."""
    grids = {"seq_len": tuple(sorted(seq_lens)), "batch_size": tuple(sorted(batch_sizes))}
    run = _memoised(run_cell)
    return [verify_point(point, run, grids[point.axis]) for point in frontier]
