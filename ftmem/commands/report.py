"""`ftmem report`: the report (tables, plots, claim verdicts) from results files, on any machine.

ftmem/cli.py calls `register(subparsers)`; the subcommand's `func(args)` returns the exit code.
The last line printed is one JSON document (index path, rows, verdict counts) for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from analysis.load import REPO_ROOT, MalformedResults


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `report [RESULTS...] --out DIR [--readme [README]]`."""
    parser = subparsers.add_parser(
        "report", help="tables, plots and the guide's claim verdicts from results files (no GPU needed)"
    )
    parser.add_argument("results", nargs="*", help="results files or folders (default: the shipped results/)")
    parser.add_argument(
        "--out", default="report", help="folder to write index.md, tables/ and plots/ into (default report/)"
    )
    parser.add_argument(
        "--readme",
        nargs="?",
        const=str(REPO_ROOT / "docs" / "claims.md"),
        default=None,
        metavar="PAGE",
        help="also fill the claims and plots sections of a page (default docs/claims.md, between its "
        "<!-- claims:start/end --> and <!-- plots:start/end --> markers), copying the plots beside it",
    )
    parser.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report (and the README sections); errors in the inputs exit 2 with the reason.
    Rows left out, files without rows and a report with nothing measured are said on stderr too."""
    from analysis.report import ReadmeError, build_report, update_readme

    try:
        report = build_report(args.results or None, Path(args.out))
        if args.readme:
            update_readme(report, args.readme)
    except (MalformedResults, FileNotFoundError, ReadmeError) as exc:
        print(f"ftmem report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output folder (or README) cannot be written
        where = exc.filename or args.out
        print(
            f"ftmem report: error: cannot write the report: {where}: {exc.strerror or exc}", file=sys.stderr
        )
        return 2
    for line in _warnings(report):
        print(f"ftmem report: warning: {line}", file=sys.stderr)
    verdicts = Counter(r.verdict for r in report.results)
    print(
        f"report: {report.index} ({len(report.frame)} rows; "
        + ", ".join(f"{n} {v}" for v, n in verdicts.items())
        + f"; {len(report.drawn)} figures drawn, the rest current; {len(report.removed)} stale files removed)"
    )
    print(
        json.dumps(
            {
                "index": str(report.index),
                "rows": len(report.frame),
                "left_out": len(report.skipped),
                "verdicts": dict(verdicts),
                "drawn": len(report.drawn),
                "removed": [str(p) for p in report.removed],
                "readme": args.readme,
            }
        )
    )
    return 0


def _warnings(report) -> list[str]:
    """Report.warnings, with every row left out named (file:line: why)."""
    lines = [w for w in report.warnings if "left out" not in w]
    lines += [f"{s.where}: left out: {s.reason}" for s in report.skipped]
    if report.unlisted:
        names = ", ".join(p.name for p in report.unlisted[:3]) + (", ..." if len(report.unlisted) > 3 else "")
        lines.append(
            f"{len(report.unlisted)} file(s) in {report.out_dir}/plots or /tables were not made by this report "
            f"and no manifest names them ({names}): left as they are; delete them if an older report left them"
        )
    return lines
