"""The shipped CPU smoke sweep, end to end, as CI runs it: every method on a tiny Qwen3."""

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.store import read_rows

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_cpu_sweep_runs_every_method(tmp_path):
    out = tmp_path / "smoke.jsonl"
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftmem.cli",
            "sweep",
            str(ROOT / "sweeps" / "smoke-cpu.yaml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(out)
    statuses = sorted(r["status"] for r in rows)
    assert statuses.count("invalid") == 1 and statuses.count("ok") == len(rows) - 1, statuses
    assert {r["spec"]["method"] for r in rows if r["status"] == "ok"} == {"full", "lora", "qlora", "lora8bit"}
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"] == len(rows) - 1
    # Under 2 minutes on 2 idle cores; the bound leaves room for a loaded CI machine.
    assert elapsed < 300, f"smoke sweep took {elapsed:.0f} s"
