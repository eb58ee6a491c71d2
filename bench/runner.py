"""Running one cell in a fresh process with a wall-clock timeout; the parent always gets a row."""

from __future__ import annotations

import json
import os
import re
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
    torch and transformers once (bench.forked); should forked cells fail to initialise CUDA, the
    cell runs again fresh and so does every later one. Artifact files (memory timelines, allocator
    snapshots) go to `artifacts_dir` (bench.artifacts: default runs/artifacts); the row's paths to
    them are relative to that folder's parent."""
    global _fork_usable
    if spec.gpus > 1 or spec.dist != "none":  # multi-GPU cells: torchrun, one JSON per rank
        from bench.launch import run_dist_cell

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
            from bench import forked as fork_server

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
    """A new interpreter running bench.worker; (timed out, exit code)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", str(spec_path), str(row_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        timed_out = wait_or_kill_tree(proc, timeout_s)
    return timed_out, proc.returncode


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
