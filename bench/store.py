"""Results files: JSONL, one row per line, appended and fsynced one by one.

A crash loses at most the row being written: a last line that does not parse (a write cut short)
is ignored on read and cut off before the next append; a complete last row that only lacks its
newline is kept and gets one. ftmem never rewrites any other line. A lock file keeps two writers
from interleaving rows, and a results file is checked before any cell runs (`held`), so a
measurement is never made only to find it cannot be kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

#: Refuse to start writing on a filesystem with less free space than this: a row is a few KiB.
MIN_FREE_BYTES = 1 << 20
#: Keys a runner needs in every row it resumes from (bench.sweep.run.make_plan).
RESUME_KEYS = ("cell_id", "status")


class ResultsError(Exception):
    """A results file that cannot be read or written: the message names it and what to do."""


class ResultsLocked(ResultsError, RuntimeError):
    """Another runner holds the results file."""


class MalformedRow(ResultsError, ValueError):
    """A line in the middle of a results file is not a result row."""


class ResultsUnwritable(ResultsError, OSError):
    """The results file cannot take rows (a directory, a device, a read-only or full filesystem)."""


def lock(path: str | Path) -> FileLock:
    """The lock of a results file (PATH.lock); acquire with `with lock(path).acquire(timeout=0)`."""
    return FileLock(str(path) + ".lock")


def acquire(path: str | Path) -> FileLock:
    file_lock = lock(path)
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        # filelock reports a lock file it cannot create as a timeout too: tell the two apart.
        try:
            with open(file_lock.lock_file, "a"):
                pass
        except OSError as exc:
            raise ResultsUnwritable(
                f"{path}: cannot create its lock file {file_lock.lock_file} ({exc.strerror}); "
                "choose an --out in a folder you can write"
            ) from None
        raise ResultsLocked(
            f"{path} is in use by another ftmem runner (lock {file_lock.lock_file}); wait for it to "
            "finish or choose another --out"
        ) from None
    return file_lock


def check_regular(path: str | Path) -> None:
    """A results path must be a regular file or not exist yet: never a directory or a device
    (reading /dev/full, say, would never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ResultsUnwritable(f"{path}: cannot be used as a results file ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ResultsUnwritable(f"{path}: is {kind}; a results file is a regular file or a new path")


def check_writable(path: str | Path) -> None:
    """Fail now, before a cell runs, if rows could not be appended to `path`."""
    path = Path(path)
    check_regular(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):
                pass
        else:  # probe the folder without leaving an empty results file behind
            tempfile.TemporaryFile(dir=path.parent).close()
        free = shutil.disk_usage(path.parent).free
    except OSError as exc:
        raise ResultsUnwritable(f"{path}: cannot be written ({exc.strerror}); choose another --out") from None
    if free < MIN_FREE_BYTES:
        raise ResultsUnwritable(
            f"{path}: its filesystem has {free} bytes free (at least {MIN_FREE_BYTES} needed); free some space"
        )


@contextmanager
def held(path: str | Path) -> Iterator[Path]:
    """Check that `path` can take rows and hold its lock while the block runs (one writer per file)."""
    check_writable(path)
    file_lock = acquire(path)
    try:
        yield Path(path)
    finally:
        file_lock.release()


def _parses(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _repair_tail(path: Path) -> None:
    """End the file with a newline before appending: a complete last row gets its newline, a last
    line that does not parse (a write cut short by a crash) is cut off."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        if _parses(data[start:]):
            f.write(b"\n")
        else:
            f.truncate(start)


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row and fsync it. If the file takes no more (a full disk), the file is left as it
    was, the row is kept in a rescue file and ResultsUnwritable says where."""
    path = Path(path)
    line = (json.dumps(row, separators=(",", ":")) + "\n").encode("utf-8")
    check_regular(path)
    size = _size(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(path)
        size = _size(path)
        _write_synced(path, line)
    except OSError as exc:
        _cut_back(path, size)
        raise ResultsUnwritable(
            f"{path}: cannot append the row of cell {row.get('cell_id')} ({exc.strerror}); {_rescue(path, line)}"
        ) from None


def _write_synced(path: Path, data: bytes) -> None:
    """Append and fsync: once this returns, the bytes survive a crash of the machine."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _cut_back(path: Path, size: int) -> None:
    """Drop the part of a row a failed write left behind (truncating needs no free space)."""
    try:
        if _size(path) > size:
            os.truncate(path, size)
    except OSError:
        pass  # the next append cuts a line that does not parse anyway (_repair_tail)


def rescue_path(path: Path) -> Path:
    """Where rows go that `path` could not take: the temp folder, one file per results file."""
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "ftmem-rescued" / f"{path.stem}-{tag}{path.suffix}"


def _rescue(path: Path, line: bytes) -> str:
    """Save a row the results file could not take; say where (or, failing that, print the row)."""
    rescue = rescue_path(path)
    try:
        rescue.parent.mkdir(parents=True, exist_ok=True)
        _write_synced(rescue, line)
    except OSError:
        return f"it could not be saved elsewhere either; the row: {line.decode().strip()}"
    return f"the row is saved in {rescue}: once {path} can be written, `cat {rescue} >> {path}` and run again"


def _bad_line(path: Path, number: int, why: str) -> MalformedRow:
    return MalformedRow(
        f"{path}:{number}: {why}. ftmem never rewrites a results file: fix or delete line {number} "
        "(or move the file aside) and run again"
    )


def iter_numbered_rows(
    path: str | Path, required: tuple[str, ...] = ()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a results file; a last line cut short (no newline, does not parse) is
    skipped with a warning, a bad line elsewhere raises MalformedRow naming the file and the line.
    Every key of `required` must hold a string."""
    path = Path(path)
    if not path.exists():
        return
    check_regular(path)
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = f"{exc.reason} at byte {exc.start}" if isinstance(exc, UnicodeDecodeError) else exc.msg
            if number == len(lines):  # the last line, not newline-terminated: a write cut short
                warnings.warn(f"{path}:{number}: skipped a truncated last line ({why})", stacklevel=2)
                return
            if isinstance(exc, UnicodeDecodeError):
                raise _bad_line(path, number, f"not a JSON row (not UTF-8: {why})") from None
            raise _bad_line(path, number, f"not a JSON row ({why})") from None
        if not isinstance(row, dict):
            raise _bad_line(path, number, f"a row must be a JSON object, not {type(row).__name__}")
        for key in required:
            if not isinstance(row.get(key), str):
                raise _bad_line(path, number, f"the row has no {key!r} string")
        yield number, row


def read_rows(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [row for _, row in iter_numbered_rows(path, required)]


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row of each (cell_id, repeat): a re-run (--retry-failed) supersedes the row before it."""
    last: dict[tuple[Any, Any], dict[str, Any]] = {}
    for row in rows:
        key = (row.get("cell_id"), row.get("repeat") or 0)
        last.pop(key, None)
        last[key] = row
    return list(last.values())
