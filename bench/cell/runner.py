"""Running one cell in a fresh process with a wall-clock timeout; the parent always gets a row."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cell import artifacts
from bench.cell.procs import cell_env, parent_env, wait_or_kill_tree
from bench.cell.rows import failure_row
from bench.spec import CellSpec

DEFAULT_TIMEOUT_S = 900.0


#: A forked cell that failed this way means the fork server touched CUDA: run fresh from then on.
_FORK_BROKEN = re.compile(r"CUDA.*(initialization error|re-initialize|forked subprocess)", re.S)
_fork_usable = True


def run_cell(
    spec: CellSpec,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    repeat: int = 0,
    artifacts_dir: str | Path | None = None,
    preload: bool = False,
) -> dict[str, Any]:
    """Measure `spec` in a new process; return its row (status ok/oom/error/timeout).

    The process is a fresh interpreter, or with `preload` one forked from a server that imported
    torch and transformers once (bench.cell.forked); should forked cells fail to initialise CUDA, the
    cell runs again fresh and so does every later one. Artifact files (memory timelines, allocator
    snapshots) go to `artifacts_dir` (bench.cell.artifacts: default runs/artifacts); the row's paths to
    them are relative to that folder's parent."""
    global _fork_usable
    if spec.gpus > 1 or spec.dist != "none":  # multi-GPU cells: torchrun, one JSON per rank
        from bench.multigpu.launch import run_dist_cell

        return {**run_dist_cell(spec, timeout_s=timeout_s, repeat=repeat), "cell_process": "fresh"}
    forked = preload and _fork_usable
    env = {**cell_env(), **parent_env(), **artifacts.child_env(spec.cell_id, repeat, artifacts_dir)}
    row = _measure(spec, env, timeout_s, forked)
    if forked and row["status"] == "error" and _FORK_BROKEN.search(row.get("error") or ""):
        _fork_usable = False
        row = _measure(spec, env, timeout_s, forked=False)
    row["repeat"] = repeat
    return artifacts.relativise(row, artifacts_dir)


def _measure(spec: CellSpec, env: dict[str, str], timeout_s: float, forked: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ftmem-cell-") as tmp:
        spec_path, row_path, log_path = Path(tmp, "spec.json"), Path(tmp, "row.json"), Path(tmp, "log.txt")
        spec_path.write_text(json.dumps(spec.to_dict()))
        start = time.monotonic()
        if forked:
            from bench.cell import forked as fork_server

            timed_out, code = fork_server.run(spec_path, row_path, log_path, env, timeout_s)
        else:
            timed_out, code = _run_fresh(spec_path, row_path, log_path, env, timeout_s)
        wall = time.monotonic() - start
        if row_path.exists():
            row = json.loads(row_path.read_text())
        elif timed_out:
            row = failure_row(spec, "timeout", f"no result within the timeout of {timeout_s:g} s")
        else:
            tail = log_path.read_bytes()[-3000:].decode(errors="replace") if log_path.exists() else ""
            row = failure_row(spec, "error", f"worker exited with code {code} and no row:\n{tail}")
    row["cell_wall_time_s"] = wall
    row["cell_process"] = "forked" if forked else "fresh"
    return row


def _run_fresh(
    spec_path: Path, row_path: Path, log_path: Path, env: dict[str, str], timeout_s: float
) -> tuple[bool, int | None]:
    """A new interpreter running bench.cell.worker; (timed out, exit code)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cell.worker", str(spec_path), str(row_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        timed_out = wait_or_kill_tree(proc, timeout_s)
    return timed_out, proc.returncode
