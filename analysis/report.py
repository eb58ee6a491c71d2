"""The report: every table and plot from results files, index.md in front and pages linked from it.

    write_report(["results/"], "report/")  ->  report/index.md, report/*.md (pages),
                                               report/tables/*.{md,csv}, report/plots/*.{png,svg}

Works with no GPU and on few rows: claims without rows are 'not measured', plots without data are
left out and the pages say so. Rows that fail validation are left out and named (Report.skipped).
Re-running into the same folder rewrites only what changed, draws only figures whose inputs
changed, and removes what the report made before but no longer makes (analysis.outputs).
`update_readme` puts the claims table and two plots between the README's markers. Never imports torch.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis import pages, plots, tables, timeline
from analysis.claims import evaluate_claims, load_guide
from analysis.contents import Report
from analysis.fits import capacity_frontier, fit_families, fits_table, residuals_table
from analysis.load import REPO_ROOT, analysis_view, predictor, read_results
from analysis.outputs import OutputDir
from analysis.plots import PlotJob

README_SECTIONS = ("claims", "plots")
#: What fits and the capacity frontier read: they filter per family, card and batch, so fewer columns
#: copy faster.
_FIT_COLUMNS = [
    "spec",
    "env_stack",
    "status",
    "footprint_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "cap_bytes",
    "seq_len",
    "batch_size",
    "source_file",
    "source_line",
]


class ReadmeError(ValueError):
    """The README lacks a marker pair the report fills in."""


def write_report(paths: Sequence[str | Path] | None, out_dir: str | Path) -> Path:
    """Write the whole report for the results under `paths` (default: results/); return index.md."""
    return build_report(paths, out_dir).index


def build_report(paths: Sequence[str | Path] | None, out_dir: str | Path) -> Report:
    """Load, judge, tabulate, plot and write pages; the returned Report also feeds update_readme."""
    loaded = read_results(paths)
    frame, guide = loaded.frame, load_guide()
    view = analysis_view(frame)
    fits = fit_families(view[_FIT_COLUMNS])
    report = Report(frame, view, guide, evaluate_claims(view, guide), predictor(), Path(out_dir), fits)
    report.skipped, report.empty_files = loaded.skipped, loaded.empty_files
    out = OutputDir.open(out_dir)
    report.tables = build_tables(report)
    for name, table in report.tables.items():
        out.write_text(f"tables/{name}.md", tables.to_markdown(table))
        out.write_text(f"tables/{name}.csv", table.to_csv(index=False))
    report.plots = draw_plots(report, out)
    for name, text in pages.all_pages(report).items():
        out.write_text(name, text)
    report.unlisted = out.unlisted()
    report.drawn, report.removed = out.drawn, out.finish()
    return report


def build_tables(report: Report) -> dict[str, pd.DataFrame]:
    """Every table of the report, by name (tables/NAME.md and .csv)."""
    frame, guide, results, predict, fits = (
        report.view,
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
        peaks=tables.peaks_table(frame),
        savings=savings,
        savings_compact=tables.compact_savings(savings),
        fits=fits_table(fits),
        fit_residuals=residuals_table(fits),
        capacity_frontier=capacity_frontier(frame[_FIT_COLUMNS], fits),
        cells=tables.cells_table(frame),
        other_predictions=tables.predictions_table(guide),
    )
    if report.skipped:
        built["left_out"] = pd.DataFrame([{"row": s.where, "why": s.reason} for s in report.skipped])
    if predict is not None:
        built["measured_vs_predicted"] = tables.measured_vs_predicted(frame, predict)
        built["accuracy"] = tables.accuracy_summary(built["measured_vs_predicted"])
    built.update(timeline.profile_tables(report.frame, predict))  # profiled rows only (issue 8)
    return built


def plot_jobs(report: Report) -> dict[str, list[PlotJob]]:
    """Every figure the rows allow, by group (a group's figures are listed together)."""
    jobs = {
        "peak_vs_seq": plots.peak_vs_seq_jobs(report.view, report.fits),
        "savings": plots.savings_jobs(report.tables["savings"]),
        "card_map": plots.card_map_jobs(report.view),
    }
    if report.predict is not None:
        jobs["measured_vs_predicted"] = plots.measured_vs_predicted_jobs(
            report.tables["measured_vs_predicted"]
        )
        jobs["components"] = plots.components_jobs(report.view, report.predict)
    jobs.update(timeline.timeline_jobs(report.frame, report.tables))  # profiled rows only
    return jobs


def draw_plots(report: Report, out: OutputDir) -> dict[str, list[Path]]:
    """The figures of plot_jobs, drawn where their inputs changed; the PNG and SVG paths by group."""
    groups = plot_jobs(report)
    paths = out.draw([job for jobs in groups.values() for job in jobs])
    return {group: [p for job in jobs for p in paths[job.name]] for group, jobs in groups.items()}


# -- README --------------------------------------------------------------------------------------
def readme_claims(report: Report) -> str:
    """The compact claims table for the README."""
    view = report.tables["claims"][["id", "claim", "verdict", "measured", "decided by"]]
    return (
        f"Generated by `ftmem report --readme` from {len(report.frame)} result rows; figures and rows behind "
        f"each verdict: `report/index.md`. {pages.UNITS} {pages.MARGINS}\n\n" + tables.to_markdown(view)
    )


def readme_plots(report: Report, docs_dir: Path) -> list[Path]:
    """Copy the report's two headline plots (pages.headline_plots) into docs/: peak against length as
    peak_vs_seq.png, the other under its own name."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    for source in pages.headline_plots(report):
        name = "peak_vs_seq.png" if source.stem.startswith("peak_vs_seq") else source.name
        shutil.copyfile(source, docs_dir / name)
        targets.append(docs_dir / name)
    return targets


def replace_between(text: str, section: str, body: str, path: Path) -> str:
    """`text` with what lies between <!-- SECTION:start --> and <!-- SECTION:end --> replaced."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ReadmeError(f"{path}: needs the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body.rstrip()}\n{end}{rest.split(end, 1)[1]}"


def update_readme(report: Report, readme: str | Path = REPO_ROOT / "docs" / "claims.md") -> Path:
    """Fill a page's claims and plots sections from the report (docs/claims.md by default); plots are copied
    beside a page in docs/, else into a docs/ folder beside it, and linked relative to the page."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    for section in README_SECTIONS:  # check both markers before writing anything
        replace_between(text, section, "", readme)
    folder = readme.parent if readme.parent.name == "docs" else readme.parent / "docs"
    images = readme_plots(report, folder)
    prefix = "" if folder == readme.parent else "docs/"
    links = "\n\n".join(f"![{p.stem}]({prefix}{p.name})" for p in images) or "_No plots yet: no measured rows._"
    text = replace_between(text, "claims", readme_claims(report), readme)
    readme.write_text(replace_between(text, "plots", links, readme), encoding="utf-8")
    return readme
