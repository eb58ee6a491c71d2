"""Copies of the shipped results, for timing `ftmem report` on more rows than were measured.

    python scripts/replicate_results.py OUT_DIR [--copies 4] [--src results]
    ftmem report OUT_DIR --out /tmp/report-4x

Copy 0 is the rows as measured; every other copy gets, per row, a new seed in its spec (so it is a
configuration of its own, as a new measurement would be: its own families, fits and plots) and a
new cell_id (and implied_by) derived from the old one and the copy's number. The numbers are the
measured ones, unchanged: these rows are for timing and nothing else, and OUT_DIR must not be
inside results/. Artifact folders (memory timelines) are linked, not copied.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_id(cell_id: str | None, copy: int) -> str | None:
    """A distinct cell_id for copy `copy` of a row (copy 0 keeps the measured one)."""
    if cell_id is None or copy == 0:
        return cell_id
    return hashlib.sha256(f"{cell_id}:copy {copy}".encode()).hexdigest()[:16]


def copy_row(row: dict, copy: int) -> dict:
    """One row as copy `copy`: its seed and ids changed, every measured number as it was."""
    row = dict(
        row, cell_id=copy_id(row.get("cell_id"), copy), implied_by=copy_id(row.get("implied_by"), copy)
    )
    if copy and isinstance(row.get("spec"), dict):
        row["spec"] = dict(row["spec"], seed=(row["spec"].get("seed") or 0) + 1000 * copy)
    return row


def replicate(src: Path, out: Path, copies: int) -> int:
    """Write `copies` copies of every results file under `src` into out/copy-N/; the rows written."""
    if out.resolve().is_relative_to((REPO / "results").resolve()):
        raise SystemExit(f"{out}: copies must not go into results/ (they are not measurements)")
    written = 0
    for path in sorted(src.rglob("*.jsonl")):
        relative = path.relative_to(src)
        for copy in range(copies):
            target = out / f"copy-{copy}" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            lines = [
                json.dumps(copy_row(json.loads(line), copy)) for line in path.read_text().splitlines() if line
            ]
            target.write_text("\n".join(lines) + "\n", encoding="utf-8")
            written += len(lines)
            artifacts = path.with_name(path.stem + ".artifacts")
            link = target.with_name(target.stem + ".artifacts")
            if artifacts.is_dir() and not link.exists():
                link.symlink_to(artifacts.resolve(), target_is_directory=True)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the copies into (not under results/)")
    parser.add_argument(
        "--copies", type=int, default=4, help="copies of every row, the measured one included"
    )
    parser.add_argument("--src", type=Path, default=REPO / "results", help="results folder to copy")
    args = parser.parse_args(argv)
    print(f"{replicate(args.src, args.out, args.copies)} rows under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
