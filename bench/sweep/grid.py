"""Sweep files (sweeps/*.yaml): a grid of cells as data, validated and expanded by pure functions.

    name: qwen3-14b-example
    base: {model: qwen3-14b, method: lora, seq_len: 2048, batch_size: 1}
    axes: {gradient_checkpointing: [false, true], batch_size: [1, 2, 4]}   # crossed
    zip: [{seq_len: [512, 1024], batch_size: [8, 4]}]                      # varied together
    include: [{method: qlora, lora_r: 64}]                                 # extra cells on base
    exclude: [{gradient_checkpointing: false, batch_size: 4}]              # dropped cells
    budgets: [rtx4090-24gb, h100-80gb]                                     # -> budget_gb axis
    repeats: 1
    timeout_s: 300                                                         # per cell (default 900)
    claims: [C1]                                                           # guide claims tested
    grids: [{axes: ..., claims: [...]}, ...]   # optional: several grids sharing base/name

Bad keys, types and values are errors naming the file, the key path and what is allowed. A cell
whose combination of values is impossible is not an error: it becomes a row with status invalid.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.spec import CellSpec, SpecError, check_field
from bench.sweep import yaml_strict

SWEEP_KEYS = (
    "name",
    "description",
    "base",
    "axes",
    "zip",
    "include",
    "exclude",
    "budgets",
    "repeats",
    "timeout_s",
    "claims",
    "grids",
)
GRID_KEYS = ("base", "axes", "zip", "include", "exclude", "budgets", "claims", "description")


class SweepError(ValueError):
    """A sweep file that cannot be read: the message names file, key path and what is allowed."""


@dataclass(frozen=True)
class Cell:
    """One expanded cell: a valid spec, or the raw values and why they are invalid."""

    raw: tuple[tuple[str, Any], ...]
    claims: tuple[str, ...]
    spec: CellSpec | None = None
    invalid_reason: str | None = None

    @property
    def cell_id(self) -> str:
        if self.spec is not None:
            return self.spec.cell_id
        canonical = json.dumps(dict(self.raw), sort_keys=True, separators=(",", ":"), default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def spec_dict(self) -> dict[str, Any]:
        return self.spec.to_dict() if self.spec is not None else dict(self.raw)


@dataclass(frozen=True)
class Sweep:
    name: str
    path: str
    grids: tuple[dict[str, Any], ...]
    repeats: int = 1
    description: str = ""
    timeout_s: float | None = None  # per cell; None: the runner's default (--timeout overrides)


def _fail(path: str, key: str, message: str) -> SweepError:
    return SweepError(f"{path}: {key}: {message}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (structure and every value); raises SweepError."""
    path = str(path)
    try:
        data = yaml_strict.load(Path(path).read_text(encoding="utf-8"))
    except yaml_strict.DuplicateKey as exc:
        raise SweepError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SweepError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise SweepError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_sweep(data, path)


def parse_sweep(data: Any, path: str = "<sweep>") -> Sweep:
    if not isinstance(data, dict):
        raise _fail(path, "(top level)", "a sweep is a mapping with keys " + ", ".join(SWEEP_KEYS))
    _known_keys(data, SWEEP_KEYS, path, "")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise _fail(path, "name", f"{data.get('name')!r} is not allowed; a non-empty string is required")
    repeats = data.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise _fail(path, "repeats", f"{repeats!r} is not allowed; an integer >= 1")
    timeout = data.get("timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
    ):
        raise _fail(
            path, "timeout_s", f"{timeout!r} is not allowed; seconds per cell, a number > 0 and not inf"
        )
    top = {k: v for k, v in data.items() if k in GRID_KEYS}
    subgrids = data.get("grids")
    if subgrids is None:
        grids = [top]
    elif not isinstance(subgrids, list) or not subgrids:
        raise _fail(path, "grids", "must be a non-empty list of grids")
    else:
        grids = []
        for i, grid in enumerate(subgrids):
            if not isinstance(grid, dict):
                raise _fail(path, f"grids[{i}]", "each grid is a mapping")
            _known_keys(grid, GRID_KEYS, path, f"grids[{i}].")
            merged = {**top, **grid, "base": {**(top.get("base") or {}), **(grid.get("base") or {})}}
            merged["claims"] = list(top.get("claims") or []) + list(grid.get("claims") or [])
            grids.append(merged)
    for i, grid in enumerate(grids):
        _check_grid(grid, path, f"grids[{i}]." if subgrids is not None else "")
    return Sweep(data["name"], path, tuple(grids), repeats, data.get("description", ""), timeout)


def _known_keys(mapping: dict, allowed: tuple[str, ...], path: str, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise _fail(path, f"{prefix}{key}", f"unknown key; allowed: {', '.join(allowed)}")


def _check_value(key: str, value: Any, path: str, where: str) -> None:
    try:
        check_field(key, value)
    except SpecError as exc:
        raise _fail(path, where, str(exc).split(": ", 1)[1]) from None


def _check_values(values: Any, path: str, where: str) -> None:
    if not isinstance(values, dict):
        raise _fail(path, where, "must be a mapping of spec keys to values")
    for key, value in values.items():
        _check_value(key, value, path, f"{where}.{key}")


def _check_axis(axes: Any, path: str, where: str) -> None:
    if not isinstance(axes, dict):
        raise _fail(path, where, "must be a mapping of spec keys to lists of values")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{where}.{key}", f"{values!r} is not allowed; a non-empty list of values")
        for i, value in enumerate(values):
            _check_value(key, value, path, f"{where}.{key}[{i}]")


def _check_grid(grid: dict, path: str, prefix: str) -> None:
    _check_values(grid.get("base") or {}, path, f"{prefix}base")
    _check_axis(grid.get("axes") or {}, path, f"{prefix}axes")
    zips = grid.get("zip") or []
    if not isinstance(zips, list):
        raise _fail(path, f"{prefix}zip", "must be a list of groups (mappings of equal-length lists)")
    for i, group in enumerate(zips):
        _check_axis(group, path, f"{prefix}zip[{i}]")
        if len({len(v) for v in group.values()}) > 1:
            raise _fail(path, f"{prefix}zip[{i}]", "the lists of a zip group must have equal lengths")
    for key in ("include", "exclude"):
        entries = grid.get(key) or []
        if not isinstance(entries, list):
            raise _fail(path, f"{prefix}{key}", "must be a list of partial specs")
        for i, entry in enumerate(entries):
            _check_values(entry, path, f"{prefix}{key}[{i}]")
    budgets = grid.get("budgets") or []
    if not isinstance(budgets, list):
        raise _fail(path, f"{prefix}budgets", "must be a list of card names or numbers of GB")
    for i, budget in enumerate(budgets):
        _check_value("budget_gb", budget, path, f"{prefix}budgets[{i}]")
    claims = grid.get("claims") or []
    if not isinstance(claims, list) or not all(isinstance(c, str) for c in claims):
        raise _fail(path, f"{prefix}claims", "must be a list of claim ids such as C1")


def _grid_factors(grid: dict) -> list[tuple[str, list[dict[str, Any]]]]:
    """The grid's crossed factors, named: each axis, each zip group and the budgets."""
    factors: list[tuple[str, list[dict[str, Any]]]] = []
    for key, values in (grid.get("axes") or {}).items():
        factors.append((key, [{key: v} for v in values]))
    for i, group in enumerate(grid.get("zip") or []):
        keys = list(group)
        combos = [dict(zip(keys, combo, strict=True)) for combo in zip(*group.values(), strict=True)]
        factors.append((f"zip[{i}]", combos))
    if grid.get("budgets"):
        factors.append(("budgets", [{"budget_gb": b} for b in grid["budgets"]]))
    return factors


def _grid_assignments(grid: dict) -> list[dict[str, Any]]:
    """Every assignment of the grid: the product of its axes, its zip groups and its budgets."""
    factors = [values for _, values in _grid_factors(grid)]
    if not factors and grid.get("include"):
        return []  # a grid of includes only: the bare base is not a cell of its own
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*factors)]


#: Most cells a sweep may expand to unless raised (--max-cells): expanding takes about 0.3 ms a cell,
#: and 10,000 cells at a GPU's ~12 s each are already 33 hours.
MAX_CELLS = 10_000


def _grid_size(grid: dict) -> tuple[int, str]:
    """Cells a grid expands to at most (before exclusions and merging), and how they multiply."""
    factors = _grid_factors(grid)
    includes = len(grid.get("include") or [])
    crossed = math.prod(len(values) for _, values in factors) if factors or not includes else 0
    terms = " x ".join(f"{name} {len(values)}" for name, values in factors) or "base"
    return crossed + includes, terms + (f" + {includes} include" if includes else "")


def check_size(sweep: Sweep, max_cells: int = MAX_CELLS) -> int:
    """Count the cells before expanding them; refuse more than `max_cells`, naming what multiplies."""
    sizes = [_grid_size(grid) for grid in sweep.grids]
    total = sum(n for n, _ in sizes) * sweep.repeats
    if total <= max_cells:
        return total
    named = "; ".join(
        f"{'grids[' + str(i) + ']: ' if len(sizes) > 1 else ''}{terms} = {n:,}"
        for i, (n, terms) in enumerate(sizes)
    )
    repeats = f", x {sweep.repeats} repeats" if sweep.repeats > 1 else ""
    raise SweepError(
        f"{sweep.path}: up to {total:,} cells ({named}{repeats}), more than the limit of {max_cells:,}; "
        "take values off the largest axes or split the sweep, or raise the limit with --max-cells"
    )


def _matches(values: dict[str, Any], partial: dict[str, Any]) -> bool:
    return all(values.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in partial.items())


def _make_cell(values: dict[str, Any], claims: tuple[str, ...]) -> Cell:
    raw = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))
    try:
        return Cell(raw, claims, spec=CellSpec.create(**values))
    except SpecError as exc:
        return Cell(raw, claims, invalid_reason=str(exc))


def expand(sweep: Sweep) -> list[Cell]:
    """All cells of a sweep, one per distinct cell id (claims of duplicates merged), in file order."""
    cells: dict[str, Cell] = {}
    for grid in sweep.grids:
        base, claims = dict(grid.get("base") or {}), tuple(grid.get("claims") or ())
        values_list = [{**base, **a} for a in _grid_assignments(grid)]
        values_list = [v for v in values_list if not any(_matches(v, ex) for ex in grid.get("exclude") or [])]
        values_list += [{**base, **inc} for inc in grid.get("include") or []]
        for values in values_list:
            cell = _make_cell(values, claims)
            known = cells.get(cell.cell_id)
            if known is not None:
                merged = tuple(dict.fromkeys(known.claims + cell.claims))
                cell = Cell(known.raw, merged, known.spec, known.invalid_reason)
            cells[cell.cell_id] = cell
    return list(cells.values())
