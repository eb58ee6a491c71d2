"""Rows the parent writes itself, when a cell's process leaves none (timeout, crash, skipped, refused)."""

from __future__ import annotations

from typing import Any

from bench import schema
from bench.cell import env
from bench.spec import CellSpec


def failure_row(spec: CellSpec, status: str, error: str, **values: Any) -> dict[str, Any]:
    """A row written by the parent (timeout, crash, skipped), with the parent's view of the environment."""
    row = schema.new_row(spec.to_dict(), spec.cell_id, status=status, error=error, **values)
    if spec.budget_bytes is not None:
        row["budget_bytes"] = spec.budget_bytes
    row["env"] = env.collect()
    return row
