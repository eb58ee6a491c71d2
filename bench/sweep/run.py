"""Running a sweep: every cell in a fresh process, rows appended and fsynced one by one.

Crash safety: a row is written only when its cell is over, so a killed sweep loses at most the
cell it was running; running the sweep again skips every (cell_id, repeat) already in the file.
`--retry-failed` runs error and timeout cells again: their new row is appended, and the last row
of a (cell_id, repeat) is the one that counts. A lock keeps two runners off one file.

OOM pruning: once a cell OOMs, a cell that differs only by a larger (or equal) seq_len and
batch_size, under the same budget, would OOM too; it is not run but gets a `skipped` row naming
the cell that implies it. Cells run in order of tokens per micro-batch so the small ones go first.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from bench import schema
from bench.cell import artifacts
from bench.cell.procs import cell_env, warm_bytecode_cache
from bench.cell.rows import failure_row
from bench.cell.runner import DEFAULT_TIMEOUT_S, run_cell
from bench.devices import require_cuda
from bench.spec import CellSpec, at_later_default
from bench.store import RESUME_KEYS, append_row, held, read_rows
from bench.sweep.grid import Cell, Sweep, expand

RETRYABLE = ("error", "timeout")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/n' with 0 <= i < n."""
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard: {text!r} is not allowed; write i/n, e.g. 0/4") from None
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard: {text!r} is not allowed; need 0 <= i < n")
        return cls(index, count)

    def owns(self, cell_id: str) -> bool:
        return int(cell_id, 16) % self.count == self.index


@dataclass(frozen=True)
class Only:
    """--only KEY=VALUE (repeatable): run the cells whose spec has, for every key named, one of the
    values given for it (the same key twice: either value). Values are read as YAML scalars."""

    values: tuple[tuple[str, tuple[Any, ...]], ...]

    @classmethod
    def parse(cls, items: Iterable[str]) -> Only:
        fields = sorted(f.name for f in dataclasses.fields(CellSpec))
        chosen: dict[str, tuple[Any, ...]] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--only: {item!r} is not allowed; write KEY=VALUE, e.g. zero_offload=none")
            if key not in fields:
                raise ValueError(f"--only: unknown key {key!r} in {item!r}; allowed: {', '.join(fields)}")
            chosen[key] = (*chosen.get(key, ()), yaml.safe_load(raw))
        return cls(tuple(chosen.items()))

    def matches(self, cell: Cell) -> bool:
        spec = dict(cell.raw) if cell.spec is None else cell.spec.to_dict()
        return all(spec.get(key) in values for key, values in self.values)


@dataclass
class Plan:
    """What a sweep run will do, cell by cell: run, done (already in the file), invalid."""

    sweep: Sweep
    todo: list[tuple[Cell, int]] = field(default_factory=list)
    done: dict[tuple[str, int], dict] = field(default_factory=dict)
    invalid: list[tuple[Cell, int]] = field(default_factory=list)


def _family(spec_dict: dict[str, Any]) -> tuple:
    """Everything but seq_len and batch_size: cells of one family differ only in size. Knobs added
    later count only away from their default, so rows written before they existed still match."""
    return tuple(
        sorted(
            (k, str(v))
            for k, v in spec_dict.items()
            if k not in ("seq_len", "batch_size") and not at_later_default(k, v)
        )
    )


def order_cells(cells: Iterable[Cell]) -> list[Cell]:
    """Small cells first (tokens per micro-batch, then seq_len), so OOM pruning can act."""

    def key(cell: Cell) -> tuple[int, int]:
        values = cell.spec_dict
        seq, batch = values.get("seq_len") or 0, values.get("batch_size") or 0
        return (seq * batch, seq) if isinstance(seq, int) and isinstance(batch, int) else (0, 0)

    return sorted(cells, key=key)


def make_plan(
    sweep: Sweep,
    existing: list[dict],
    shard: Shard | None = None,
    retry_failed: bool = False,
    only: Only | None = None,
) -> Plan:
    plan = Plan(sweep)
    last: dict[tuple[str, int], dict] = {}
    for row in existing:
        last[(row["cell_id"], row.get("repeat") or 0)] = row
    for cell in order_cells(expand(sweep)):
        if shard is not None and not shard.owns(cell.cell_id):
            continue
        if only is not None and not only.matches(cell):
            continue
        for repeat in range(sweep.repeats if cell.spec is not None else 1):
            row = last.get((cell.cell_id, repeat))
            if row is not None and not (retry_failed and row["status"] in RETRYABLE):
                plan.done[(cell.cell_id, repeat)] = row
            elif cell.spec is None:
                plan.invalid.append((cell, repeat))
            else:
                plan.todo.append((cell, repeat))
    return plan


def implied_oom(spec_dict: dict[str, Any], ooms: list[dict[str, Any]]) -> str | None:
    """cell_id of an OOM row whose family matches and whose size is <= this cell's, if any."""
    family = _family(spec_dict)
    for row in ooms:
        other = row["spec"]
        if (
            _family(other) == family
            and other["seq_len"] <= spec_dict["seq_len"]
            and other["batch_size"] <= spec_dict["batch_size"]
        ):
            return row["cell_id"]
    return None


def _sweep_info(sweep: Sweep, cell: Cell) -> dict[str, Any]:
    return {"name": sweep.name, "file": sweep.path, "claims": list(cell.claims)}


def invalid_row(sweep: Sweep, cell: Cell) -> dict[str, Any]:
    row = schema.new_row(cell.spec_dict, cell.cell_id, status="invalid", error=cell.invalid_reason)
    row["sweep"] = _sweep_info(sweep, cell)
    return row


RunCell = Callable[..., dict[str, Any]]
OnRow = Callable[[dict[str, Any], int, int], None]


def run_plan(
    plan: Plan,
    out_path: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prune: bool = True,
    runner: RunCell = run_cell,
    on_row: OnRow | None = None,
    stop_after_s: float | None = None,
    preload: bool = False,
) -> list[dict[str, Any]]:
    """Run every cell still to do, appending each row at once. Returns the rows written.
    With `preload`, cells are forked from a server that imported torch and transformers once
    (bench.cell.forked).

    With `stop_after_s`, no cell starts once that many seconds have passed (the one running
    finishes, within its timeout); running the sweep again resumes with the rest."""
    started = time.monotonic()
    written: list[dict[str, Any]] = []
    ooms = [r for r in plan.done.values() if r["status"] == "oom"]
    real_cells = runner is run_cell
    if real_cells:  # artifact files (bench.cell.artifacts) beside the results file
        runner = functools.partial(run_cell, artifacts_dir=artifacts.beside(out_path), preload=preload)
    total = len(plan.todo) + len(plan.invalid)

    def emit(row: dict[str, Any]) -> None:
        append_row(out_path, row)
        written.append(row)
        if on_row is not None:
            on_row(row, len(written), total)

    for cell, _ in plan.invalid:
        emit(invalid_row(plan.sweep, cell))
    if plan.todo and real_cells:
        warm_bytecode_cache(cell_env())  # once per machine, outside every cell's start-up
    for cell, repeat in plan.todo:
        if stop_after_s is not None and time.monotonic() - started >= stop_after_s:
            break
        implied_by = implied_oom(cell.spec_dict, ooms) if prune else None
        if implied_by is not None:
            row = failure_row(
                cell.spec,
                "skipped",
                f"implied OOM: cell {implied_by} is no larger and ran out of memory",
                implied_by=implied_by,
            )
        else:
            row = runner(cell.spec, timeout_s=timeout_s, repeat=repeat)
        row["repeat"] = repeat
        row["sweep"] = _sweep_info(plan.sweep, cell)
        if row["status"] == "oom":
            ooms.append(row)
        emit(row)
    return written


def run_sweep(
    sweep: Sweep,
    out_path: str,
    shard: Shard | None = None,
    retry_failed: bool = False,
    prune: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    runner: RunCell = run_cell,
    on_plan: Callable[[Plan], None] | None = None,
    on_row: OnRow | None = None,
    stop_after_s: float | None = None,
    preload: bool = False,
    only: Only | None = None,
) -> list[dict[str, Any]]:
    """Check the results file can take rows and lock it, plan against what it holds, run the rest.
    Everything that would stop the sweep (an unwritable file, a bad row, no CUDA for real cells) is
    raised before the first row is written."""
    with held(out_path):
        plan = make_plan(sweep, read_rows(out_path, RESUME_KEYS), shard, retry_failed, only)
        if runner is run_cell:
            require_cuda(cell.spec for cell, _ in plan.todo)
        if on_plan is not None:
            on_plan(plan)
        return run_plan(plan, out_path, timeout_s, prune, runner, on_row, stop_after_s, preload)
