"""Cells forked from a server that imported torch and transformers once (`ftmem sweep --preload`).

A fresh interpreter per cell spends seconds importing torch and transformers (about 5 s of a 14B
cell's start-up on an H200 host). With preloading, the runner starts Python's fork server once, with
bench.cell.preload imported, and forks each cell from it: still a new process per cell, with its own CUDA
context and allocator, but its imports are done. The server never touches CUDA (bench.cell.preload).
Each forked cell starts a session of its own (its timeout kills its whole tree), takes the cell's
environment, and dies with the server, which exits when the runner does.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from bench.cell.procs import bytecode_cache_env, kill_pid_tree

_CONTEXT: multiprocessing.context.BaseContext | None = None


def context() -> multiprocessing.context.BaseContext:
    """The fork-server context, its server preloading bench.cell.preload (started on first use)."""
    global _CONTEXT
    if _CONTEXT is None:
        # The server is a new interpreter with this process's environment: give it the cells'
        # bytecode cache too (bench.cell.procs.bytecode_cache_env), so it does not compile its imports.
        cached = bytecode_cache_env(dict(os.environ))
        if cached.get("PYTHONPYCACHEPREFIX") and not os.environ.get("PYTHONPYCACHEPREFIX"):
            os.environ["PYTHONPYCACHEPREFIX"] = cached["PYTHONPYCACHEPREFIX"]
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["bench.cell.preload"])
    return _CONTEXT


def run(
    spec_path: Path, row_path: Path, log_path: Path, env: dict[str, str], timeout_s: float
) -> tuple[bool, int | None]:
    """Measure a cell in a process forked from the server; (timed out, exit code)."""
    from bench.cell.worker import forked_main

    proc = context().Process(target=forked_main, args=(str(spec_path), str(row_path), str(log_path), env))
    proc.start()
    try:
        proc.join(timeout_s)
    finally:  # past its timeout, or the runner interrupted (Ctrl-C, SIGTERM): the cell goes
        timed_out = proc.is_alive()
        if timed_out:
            kill_pid_tree(proc.pid)
            proc.join()
    return timed_out, proc.exitcode
