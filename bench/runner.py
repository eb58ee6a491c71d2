"""Running one cell in a fresh process with a wall-clock timeout; the parent always gets a row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import artifacts, env, schema
from bench.procs import bytecode_cache_env, parent_env, wait_or_kill_tree
from bench.spec import CellSpec

DEFAULT_TIMEOUT_S = 900.0


def run_cell(
    spec: CellSpec,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    repeat: int = 0,
    artifacts_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Measure `spec` in a new process; return its row (status ok/oom/error/timeout).

    Artifact files (memory timelines, allocator snapshots) go to `artifacts_dir` (bench.artifacts:
    default runs/artifacts); the row's paths to them are relative to that folder's parent."""
    if spec.gpus > 1 or spec.dist != "none":  # multi-GPU cells: torchrun, one JSON per rank
        from bench.launch import run_dist_cell

        return run_dist_cell(spec, timeout_s=timeout_s, repeat=repeat)
    with tempfile.TemporaryDirectory(prefix="ftmem-cell-") as tmp:
        spec_path, row_path, log_path = Path(tmp, "spec.json"), Path(tmp, "row.json"), Path(tmp, "log.txt")
        spec_path.write_text(json.dumps(spec.to_dict()))
        start = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.worker", str(spec_path), str(row_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={
                    **cell_env(),
                    **parent_env(),
                    **artifacts.child_env(spec.cell_id, repeat, artifacts_dir),
                },
            )
            timed_out = wait_or_kill_tree(proc, timeout_s)
        wall = time.monotonic() - start
        if row_path.exists():
            row = json.loads(row_path.read_text())
        elif timed_out:
            row = failure_row(spec, "timeout", f"no result within the timeout of {timeout_s:g} s")
        else:
            tail = log_path.read_bytes()[-3000:].decode(errors="replace")
            row = failure_row(spec, "error", f"worker exited with code {proc.returncode} and no row:\n{tail}")
    row["cell_wall_time_s"] = wall
    row["repeat"] = repeat
    return artifacts.relativise(row, artifacts_dir)


def cell_env() -> dict[str, str]:
    """The environment of a cell's process: this one's, with ftmem importable, offline, and a
    bytecode cache where Python keeps none (bench.procs.bytecode_cache_env)."""
    child = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    child["PYTHONPATH"] = os.pathsep.join(p for p in (root, child.get("PYTHONPATH")) if p)
    child.setdefault("TOKENIZERS_PARALLELISM", "false")
    child.setdefault("HF_HUB_OFFLINE", "1")
    return bytecode_cache_env(child)


def failure_row(spec: CellSpec, status: str, error: str, **values: Any) -> dict[str, Any]:
    """A row written by the parent (timeout, crash, skipped), with the parent's view of the environment."""
    row = schema.new_row(spec.to_dict(), spec.cell_id, status=status, error=error, **values)
    if spec.budget_bytes is not None:
        row["budget_bytes"] = spec.budget_bytes
    row["env"] = env.collect()
    return row
