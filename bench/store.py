"""Results files: JSONL, one row per line, appended and fsynced one by one.

A crash loses at most the row being written: a truncated last line (no newline) is ignored on
read and cut off before the next append. A lock file keeps two runners from interleaving rows.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout


class ResultsLocked(RuntimeError):
    """Another runner holds the results file."""


class MalformedRow(ValueError):
    """A line in the middle of a results file is not a JSON object."""


def lock(path: str | Path) -> FileLock:
    """The lock of a results file (PATH.lock); acquire with `with lock(path).acquire(timeout=0)`."""
    return FileLock(str(path) + ".lock")


def acquire(path: str | Path) -> FileLock:
    file_lock = lock(path)
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        raise ResultsLocked(
            f"{path} is in use by another ftmem runner (lock {file_lock.lock_file})"
        ) from None
    return file_lock


def _repair_tail(path: Path) -> None:
    """Cut a truncated last line (a crash mid-write) so the next row starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    line = json.dumps(row, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def iter_numbered_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a results file; a truncated last line is skipped with a warning,
    a bad line elsewhere raises MalformedRow naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the last line, not newline-terminated: a write cut short
                warnings.warn(f"{path}:{number}: skipped a truncated last line ({exc.msg})", stacklevel=2)
                return
            raise MalformedRow(f"{path}:{number}: not a JSON row ({exc.msg})") from None
        if not isinstance(row, dict):
            raise MalformedRow(f"{path}:{number}: a row must be a JSON object, not {type(row).__name__}")
        yield number, row


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_numbered_rows(path)]


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row of each (cell_id, repeat): a re-run (--retry-failed) supersedes the row before it."""
    last: dict[tuple[Any, Any], dict[str, Any]] = {}
    for row in rows:
        key = (row.get("cell_id"), row.get("repeat") or 0)
        last.pop(key, None)
        last[key] = row
    return list(last.values())
