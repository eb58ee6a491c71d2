"""Where a cell's artifact files go (memory timelines, allocator snapshots). No torch here.

The parent (bench.cell.runner.run_cell) picks an artifacts folder and tells the worker through the
environment: FTMEM_ARTIFACTS_DIR (absolute folder) and FTMEM_ARTIFACTS_STEM (`<cell_id>-r<repeat>`).
The worker writes absolute paths into the row; the parent rewrites them relative to the folder the
results file lives in (`base`), so a results folder moved as a whole keeps its links.

- A sweep or `ftmem run --out X.jsonl`: the folder `X.artifacts/` beside the results file; row paths
  are relative to X's folder (`X.artifacts/<cell_id>-r0.timeline.json`).
- Otherwise: `runs/artifacts/` under the current directory (`runs/` is git-ignored); row paths are
  relative to `runs/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV_DIR = "FTMEM_ARTIFACTS_DIR"
ENV_STEM = "FTMEM_ARTIFACTS_STEM"
DEFAULT_DIR = Path("runs") / "artifacts"
#: Row fields holding artifact paths.
PATH_FIELDS = ("profile_timeline_file", "snapshot_file")


def beside(results_path: str | Path) -> Path:
    """The artifacts folder of a results file: `<name>.artifacts/` in the same folder."""
    path = Path(results_path)
    return path.with_name(path.stem + ".artifacts")


def child_env(cell_id: str, repeat: int, artifacts_dir: str | Path | None) -> dict[str, str]:
    """What run_cell adds to the worker's environment."""
    folder = Path(artifacts_dir) if artifacts_dir is not None else DEFAULT_DIR
    return {ENV_DIR: str(folder.resolve()), ENV_STEM: f"{cell_id}-r{repeat}"}


def artifact_path(suffix: str, cell_id: str) -> Path:
    """In the worker: the file `<stem><suffix>` in the artifacts folder (created), from the environment."""
    folder = Path(os.environ.get(ENV_DIR) or DEFAULT_DIR.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{os.environ.get(ENV_STEM) or cell_id + '-r0'}{suffix}"


def relativise(row: dict[str, Any], artifacts_dir: str | Path | None) -> dict[str, Any]:
    """In the parent: the row's artifact paths made relative to the artifacts folder's parent."""
    base = (Path(artifacts_dir) if artifacts_dir is not None else DEFAULT_DIR).resolve().parent
    for key in PATH_FIELDS:
        value = row.get(key)
        if value:
            row[key] = os.path.relpath(value, base)
    return row


def resolve(value: str | None, source_file: str | None, root: Path | None = None) -> Path | None:
    """An artifact path of a row back to a file: beside the results file, else as given (cwd, root)."""
    if not value:
        return None
    candidates = []
    if source_file:
        candidates.append(Path(source_file).parent / value)
        if root is not None:
            candidates.append(root / Path(source_file).parent / value)
    candidates += [Path(value)] + ([root / value, root / "runs" / value] if root is not None else [])
    candidates.append(Path("runs") / value)
    return next((c for c in candidates if c.is_file()), None)
