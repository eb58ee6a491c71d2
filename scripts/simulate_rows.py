"""Simulate the caching allocator for every single-GPU CUDA cell under results/ (or the files given), so
that reports and the accuracy table read reserved and NVML from analysis/predict/simulated.jsonl.

    python3 scripts/simulate_rows.py [--workers 2] [results/...jsonl ...]

Afterwards the file keeps only the simulations of shipped cells at the current SIMULATION_VERSION.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# this script remakes the shipped cache, not the user's
os.environ["FTMEM_SIMULATION_CACHE"] = str(ROOT / "analysis" / "predict" / "simulated.jsonl")


def cells(paths: list[Path]) -> list[dict]:
    from analysis.accuracy import model_family
    from bench.store import read_rows

    seen, out = set(), []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"simulate_rows: {path}: no such results file (give results/**/*.jsonl files)")
        for row in read_rows(path):  # a bad line raises bench.store's error naming the file and line
            spec = row.get("spec") or {}
            if spec.get("device") != "cuda" or (spec.get("gpus") or 1) > 1 or spec.get("dist", "none") != "none":
                continue
            if row.get("status") not in ("ok", "oom") or not model_family(spec.get("model", "")):
                continue
            key = json.dumps(spec, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(spec)
    # cells differing only by budget share a trace: adjacent, in one worker's chunk
    return sorted(out, key=lambda s: json.dumps({k: v for k, v in s.items() if k != "budget_gb"}, sort_keys=True))


def one(spec: dict) -> str:
    from analysis.predict.resolve import as_spec
    from analysis.predict.simulate import simulate

    start = time.perf_counter()
    entry = simulate(as_spec(spec, None))
    status = "unsupported: " + entry["unsupported"][:80] if "unsupported" in entry else ("oom" if entry.get("oom") else "ok")
    return f"{spec['model']} {spec['method']} s{spec['seq_len']} b{spec['batch_size']}: {status} ({time.perf_counter() - start:.1f} s)"


def prune() -> int:
    """Drop entries no shipped cell reads (older versions, cells since removed); returns how many are kept."""
    from analysis.predict.resolve import as_spec
    from analysis.predict.simulate import SHIPPED, _key

    keys = {_key(as_spec(spec, None)) for spec in cells(sorted((ROOT / "results").glob("**/*.jsonl")))}
    kept = {}
    for line in SHIPPED.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("key") in keys:
            kept[entry["key"]] = line  # the last simulation of a cell wins, as when it is read
    tmp = SHIPPED.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept.values()))
    os.replace(tmp, SHIPPED)  # never a half-written file in place of the old one
    return len(kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    paths = args.paths or sorted(Path("results").glob("**/*.jsonl"))
    from bench.store import ResultsError

    try:
        todo = cells(paths)
    except ResultsError as err:
        raise SystemExit(f"simulate_rows: {err}") from None
    print(f"{len(todo)} cells", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        for i, line in enumerate(pool.map(one, todo, chunksize=8), 1):
            print(f"[{i}/{len(todo)}] {line}", flush=True)
    print(f"{prune()} simulations kept in analysis/predict/simulated.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
