"""The report: every table and plot from results files, and an index.md linking them.

    write_report(["results/"], "report/")  ->  report/index.md, report/tables/*.{md,csv},
                                               report/plots/*.{png,svg}

Works with no GPU and on few rows: claims without rows are 'not measured', plots without data
are left out and the index says so. `update_readme` puts the claims table and two plots between
the README's markers. Never imports torch.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import plots, tables, timeline
from analysis.claims import VERDICTS, ClaimResult, Guide, evaluate_claims, load_guide
from analysis.fits import FamilyFit, capacity_frontier, fit_families, fits_table, residuals_table
from analysis.load import REPO_ROOT, load_results, predictor

README_SECTIONS = ("claims", "plots")


class ReadmeError(ValueError):
    """The README lacks a marker pair the report fills in."""


@dataclass
class Report:
    """What a report was built from and what it wrote."""

    frame: pd.DataFrame
    guide: Guide
    results: list[ClaimResult]
    predict: Callable | None
    out_dir: Path
    fits: list[FamilyFit] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def index(self) -> Path:
        return self.out_dir / "index.md"


def write_report(paths: Sequence[str | Path] | None, out_dir: str | Path) -> Path:
    """Write the whole report for the results under `paths` (default: results/); return index.md."""
    return build_report(paths, out_dir).index


def build_report(paths: Sequence[str | Path] | None, out_dir: str | Path) -> Report:
    """Load, judge, tabulate and plot; the returned Report also feeds update_readme."""
    frame = load_results(paths)
    guide = load_guide()
    report = Report(
        frame, guide, evaluate_claims(frame, guide), predictor(), Path(out_dir), fit_families(frame)
    )
    report.tables = _write_tables(report)
    report.plots = _write_plots(report)
    report.index.write_text(index_markdown(report), encoding="utf-8")
    return report


def _write_tables(report: Report) -> dict[str, pd.DataFrame]:
    """Every table as tables/NAME.md and tables/NAME.csv."""
    frame, guide, results, predict, fits = (
        report.frame,
        report.guide,
        report.results,
        report.predict,
        report.fits,
    )
    savings = tables.savings_table(frame)
    built = {
        f"guide_{name}": tables.guide_table(frame, guide, results, name, predict)
        for name in tables.GUIDE_TABLES
    }
    built.update(
        claims=tables.claims_table(results),
        savings=savings,
        savings_compact=tables.compact_savings(savings),
        fits=fits_table(fits),
        fit_residuals=residuals_table(fits),
        capacity_frontier=capacity_frontier(frame, fits),
        cells=tables.cells_table(frame),
        other_predictions=tables.predictions_table(guide),
    )
    if predict is not None:
        built["measured_vs_predicted"] = tables.measured_vs_predicted(frame, predict)
    built.update(timeline.profile_tables(frame, predict))  # profiled rows only (issue 8)
    for name, table in built.items():
        tables.write_table(table, report.out_dir / "tables", name)
    return built


def _write_plots(report: Report) -> dict[str, list[Path]]:
    """Every plot the rows allow, as plots/NAME.png and plots/NAME.svg."""
    out = report.out_dir / "plots"
    drawn = {
        "peak_vs_seq": plots.plot_peak_vs_seq(report.frame, report.fits, out),
        "savings": plots.plot_savings(report.tables["savings"], out),
        "oom_frontier": plots.plot_oom_heatmaps(report.frame, out),
    }
    if report.predict is not None:
        drawn["measured_vs_predicted"] = plots.plot_measured_vs_predicted(
            report.tables["measured_vs_predicted"], out
        )
        drawn["components"] = plots.plot_components(report.frame, report.predict, out)
    drawn.update(timeline.write_plots(report.frame, report.tables, out))  # profiled rows only
    return drawn


# -- index.md ------------------------------------------------------------------------------------
def index_markdown(report: Report) -> str:
    """index.md: what the report rests on, the claims, the guide's tables, savings, fits, plots."""
    parts = [
        _header(report),
        _claims_section(report),
        _guide_section(report),
        _savings_section(report),
        _fits_section(report),
        timeline.index_section(report.tables),
        _plots_section(report),
        _cells_section(report),
    ]
    return "\n".join(parts)


def _header(report: Report) -> str:
    frame = report.frame
    files = (
        frame.groupby("source_file")["status"].value_counts().unstack(fill_value=0) if len(frame) else None
    )
    lines = [
        "# ftmem report: the Qwen3-14B guide's claims against measured GPU memory",
        "",
        f"{len(frame)} result rows" + ("." if files is None else " from:"),
        "",
    ]
    if files is not None:
        lines += [
            f"- `{name}`: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            for name, counts in files.iterrows()
        ]
        lines += ["", "Software stacks (rows of different stacks are never paired or fitted together):", ""]
        lines += [f"- {stack}: {n} rows" for stack, n in frame["env_stack"].value_counts().items()]
    emulated = int(frame["budget_emulated"].sum()) if len(frame) else 0
    lines += [
        "",
        "Units: GiB = 2^30 bytes; the guide's GB = 10^9 bytes; a card means its nvidia-smi total "
        "(`bench/cards.py`; the guide's 24 GB card is an RTX 4090, 24564 MiB). A card's verdict uses the "
        "NVML process peak (what nvidia-smi shows), else the reserved, else the allocated peak; marginal = "
        "within 5% of the card.",
        f"Budget-emulated rows (a cap on a larger GPU standing in for a card we lack): {emulated}.",
        "ftmem's predictor: "
        + (
            "included."
            if report.predict
            else "not available (analysis.predict missing): prediction columns and plots left out."
        ),
        "",
    ]
    return "\n".join(lines)


def _claims_section(report: Report) -> str:
    counts = Counter(r.verdict for r in report.results)
    summary = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v] or v != "supported in part")
    view = report.tables["claims"][["id", "claim", "guide", "verdict", "figures"]]
    return "\n".join(
        ["## Claims C1-C20", "", summary + ".", "", tables.to_markdown(view), _links("claims"), ""]
    )


def _guide_section(report: Report) -> str:
    lines = ["## The guide's tables with measured columns", ""]
    for name in tables.GUIDE_TABLES:
        lines += [
            f"### {tables.guide_table_title(name)}",
            "",
            tables.to_markdown(report.tables[f"guide_{name}"]),
            _links(f"guide_{name}"),
            "",
        ]
    lines += [
        "Other published predictions:",
        "",
        tables.to_markdown(report.tables["other_predictions"]),
        "The accelerate and DeepSpeed figures are computed here from the formulas those tools use "
        "(model states only: weights, gradients, Adam moments; no activations) on the parameter counts "
        "of `bench.models`; the others are as published.",
        _links("other_predictions"),
        "",
    ]
    return "\n".join(lines)


def _savings_section(report: Report) -> str:
    return "\n".join(
        [
            "## Savings of each optimisation",
            "",
            "From pairs of ok rows equal in every other spec field, on one software stack.",
            "",
            tables.to_markdown(report.tables["savings_compact"]),
            _links("savings"),
            "",
        ]
    )


def _fits_section(report: Report) -> str:
    return "\n".join(
        [
            "## Fits and capacity",
            "",
            "Per family: peak = a + b x tokens (+ c x batch x seq^2 for eager attention), least squares "
            "over its ok rows. A fit through as many rows as coefficients is exact (R^2 = 1) and says "
            "little.",
            "",
            tables.to_markdown(report.tables["fits"]),
            _links("fits"),
            _links("fit_residuals"),
            "",
            "Capacity frontier (longest sequence per batch size and card, from the NVML-peak fit) beside "
            "the measured boundary:",
            "",
            _links("capacity_frontier"),
            "",
        ]
    )


def _plots_section(report: Report) -> str:
    lines = ["## Plots", ""]
    for name, paths in report.plots.items():
        pngs = [p for p in paths if p.suffix == ".png"]
        if not pngs:
            lines += [f"- {name}: not drawn (no rows for it yet)."]
        for png in pngs:
            lines += [f"![{png.stem}](plots/{png.name}) ([SVG](plots/{png.stem}.svg))", ""]
    return "\n".join(lines + [""])


def _cells_section(report: Report) -> str:
    return "\n".join(
        ["## Measured cells", "", tables.to_markdown(report.tables["cells"]), _links("cells"), ""]
    )


def _links(name: str) -> str:
    return f"[{name}.md](tables/{name}.md) · [{name}.csv](tables/{name}.csv)"


# -- README --------------------------------------------------------------------------------------
def readme_claims(report: Report) -> str:
    """The compact claims table for the README."""
    view = report.tables["claims"][["id", "claim", "verdict", "measured"]]
    rows = len(report.frame)
    return (
        f"Generated by `ftmem report --readme` from {rows} result rows; figures and rows behind each "
        "verdict: `report/index.md`. Marginal: too close to call (within 5% of the card, or at the edge of the stated "
        "range); supported in part: every measured part holds, some part has no rows yet.\n\n"
        + tables.to_markdown(view)
    )


def readme_plots(report: Report, docs_dir: Path) -> list[Path]:
    """Copy the two headline plots into docs/: peak against length (the method with most rows)
    and the savings (or, without pairs, the RTX 4090 fit map)."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    chosen = []
    peak = [p for p in report.plots.get("peak_vs_seq", []) if p.suffix == ".png"]
    if peak:
        counts = report.frame[report.frame["status"] == "ok"]["method"].value_counts()
        best = max(peak, key=lambda p: counts.get(p.stem.removeprefix("peak_vs_seq_"), 0))
        chosen.append((best, "peak_vs_seq.png"))
    second = [
        p
        for p in report.plots.get("savings", []) + report.plots.get("oom_frontier", [])
        if p.suffix == ".png" and p.stem in ("savings", "oom_frontier_rtx4090-24gb")
    ]
    chosen += [(second[0], second[0].name)] if second else []
    for source, name in chosen:
        shutil.copyfile(source, docs_dir / name)
    return [docs_dir / name for _, name in chosen]


def replace_between(text: str, section: str, body: str, path: Path) -> str:
    """`text` with what lies between <!-- SECTION:start --> and <!-- SECTION:end --> replaced."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ReadmeError(f"{path}: needs the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body.rstrip()}\n{end}{rest.split(end, 1)[1]}"


def update_readme(report: Report, readme: str | Path = REPO_ROOT / "README.md") -> Path:
    """Fill the README's claims and plots sections from the report; plots are copied to docs/."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    for section in README_SECTIONS:  # check both markers before writing anything
        replace_between(text, section, "", readme)
    images = readme_plots(report, readme.parent / "docs")
    links = "\n\n".join(f"![{p.stem}](docs/{p.name})" for p in images) or "_No plots yet: no measured rows._"
    text = replace_between(text, "claims", readme_claims(report), readme)
    readme.write_text(replace_between(text, "plots", links, readme), encoding="utf-8")
    return readme
