"""Entry point of the fresh process that measures one cell.

    python -m bench.worker SPEC.json ROW.json

Reads the spec, measures it (bench.measure), writes the row atomically. The parent
(bench.runner) owns the timeout and writes the row itself if this process dies without one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    spec_path, row_path = Path(argv[0]), Path(argv[1])
    from bench import env, schema
    from bench.procs import die_with_parent

    die_with_parent()  # a cell never outlives its runner (bench.procs)
    from bench.spec import CellSpec

    spec = CellSpec.from_dict(json.loads(spec_path.read_text()))
    from bench.measure import measure  # imports torch

    status, error, values = measure(spec)
    import torch

    row = schema.new_row(spec.to_dict(), spec.cell_id, status=status, error=error, **values)
    row["env"] = env.collect(cuda_runtime=torch.version.cuda)
    tmp = row_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, row_path)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # The row is on disk: skip the interpreter's teardown of a model of many GBs (seconds per cell).
    # The driver frees the process's GPU memory at exit all the same, before the parent moves on.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
