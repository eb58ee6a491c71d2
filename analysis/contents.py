"""What a report holds: the rows it was built from, the verdicts, tables and plots made from them,
and what writing it did. analysis.report builds it; analysis.pages writes its Markdown from it.
Never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.claims import ClaimResult, Guide
from analysis.fits import FamilyFit
from analysis.load import Skipped


@dataclass
class Report:
    """What a report was built from and what it wrote."""

    frame: pd.DataFrame
    view: pd.DataFrame  # frame's analysis columns (analysis.load.analysis_view), what most tables read
    guide: Guide
    results: list[ClaimResult]
    predict: Callable | None
    out_dir: Path
    fits: list[FamilyFit] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: dict[str, list[Path]] = field(default_factory=dict)
    drawn: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    unlisted: list[Path] = field(default_factory=list)  # in plots/ or tables/, not made by the report

    @property
    def index(self) -> Path:
        return self.out_dir / "index.md"

    @property
    def warnings(self) -> list[str]:
        """What a reader must know before trusting the report: rows left out, files without rows,
        nothing measured."""
        notes = [f"{len(self.skipped)} line(s) or file(s) left out (see left-out.md)"] if self.skipped else []
        notes += [f"{name}: no rows" for name in self.empty_files]
        measured = self.frame["status"].isin(["ok", "oom"]).sum() if len(self.frame) else 0
        if not measured:
            statuses = self.frame["status"].value_counts().to_dict() if len(self.frame) else {}
            counts = ", ".join(f"{n} {s}" for s, n in statuses.items()) or "no rows at all"
            notes.append(f"no row measured anything (ok or oom): {counts}")
        return notes
