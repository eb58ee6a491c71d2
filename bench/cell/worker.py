"""Entry point of the process that measures one cell.

    python -m bench.cell.worker SPEC.json ROW.json

(or forked_main, in a process forked from the preloaded server: bench.cell.forked).

Reads the spec, measures it (bench.cell.measure), writes the row atomically. The parent
(bench.cell.runner) owns the timeout and writes the row itself if this process dies without one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    spec_path, row_path = Path(argv[0]), Path(argv[1])
    from bench import schema
    from bench.cell import env
    from bench.spec import CellSpec

    spec = CellSpec.from_dict(json.loads(spec_path.read_text()))
    from bench.cell.measure import measure  # imports torch

    status, error, values = measure(spec)
    import torch

    row = schema.new_row(spec.to_dict(), spec.cell_id, status=status, error=error, **values)
    row["env"] = env.collect(cuda_runtime=torch.version.cuda)
    tmp = row_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, row_path)
    return 0


def forked_main(spec_path: str, row_path: str, log_path: str, env: dict[str, str]) -> None:
    """Entry point of a cell forked from the preloaded server (bench.cell.forked): a session of its own,
    the cell's environment, its output to the log, then main(); never returns."""
    os.setsid()
    from bench.cell.procs import die_with_parent

    die_with_parent(check_env=False)  # the parent is the fork server, which exits with the runner
    os.environ.clear()
    os.environ.update(env, FTMEM_FORKED="1")
    if env.get("PYTHONPYCACHEPREFIX"):  # read at start-up by a fresh interpreter; set it here
        sys.pycache_prefix, sys.dont_write_bytecode = env["PYTHONPYCACHEPREFIX"], False
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        code = main([spec_path, row_path])
    except BaseException:  # the parent writes an error row from the log
        import traceback

        traceback.print_exc()
        code = 1
    _exit_now(code)


def _exit_now(code: int) -> None:
    """The row is on disk: skip the interpreter's teardown of a model of many GBs (seconds per cell).
    The driver frees the process's GPU memory at exit all the same, before the parent moves on."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from bench.cell.procs import die_with_parent

    die_with_parent()  # a cell never outlives its runner (bench.cell.procs)
    _exit_now(main(sys.argv[1:]))
