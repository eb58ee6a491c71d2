"""The report's Markdown pages: index.md in front, with what a reader came for (the verdicts on the
guide's claims, how close the predictor is, the measured peaks), and the row-level detail on pages
it links to. Builds text only; analysis.report writes it. Never imports torch.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from analysis import tables, timeline
from analysis.claims import VERDICT_MEANINGS, VERDICTS

if TYPE_CHECKING:
    from analysis.report import Report

UNITS = (
    "Memory in GiB (2^30 bytes); where the guide states GB (10^9 bytes), its figure is converted to GiB "
    "for the comparison (its 80-120 GB is 74.5-111.8 GiB)."
)
MARGINS = (
    "Marginal: too close to call (within 5% of the card, or within 2 points of a stated saving); "
    "mixed: alternatives judged apart disagree; supported in part: every measured part holds, some part "
    "has no rows yet."
)
#: Families in the front page's table of peaks (all of them are on peaks.md).
FRONT_FAMILIES = 4
#: Rows left out named on the front page (all of them are on left-out.md).
FRONT_LEFT_OUT = 5

#: The linked pages, in the order the front page lists them, with what each holds.
PAGES = {
    "claims.md": "every claim's checks, the figures and rows behind each verdict, what was assumed",
    "guide.md": "the guide's three tables with measured columns, and other published predictions",
    "peaks.md": "measured peaks of every family of configurations",
    "savings.md": "what each optimisation saves, pair by pair",
    "fits.md": "least-squares fits of memory against the shape of a batch, and the capacity they imply",
    "profile.md": "where the memory goes in the profiled cells",
    "plots.md": "every figure",
    "cells.md": "every loaded row, one line each",
    "sources.md": "the results files, software stacks and conventions the report rests on",
    "left-out.md": "rows left out as invalid, and why",
}


def all_pages(report: Report) -> dict[str, str]:
    """index.md and the pages it links to, by file name."""
    builders = {
        "claims.md": claims_page,
        "guide.md": guide_page,
        "peaks.md": peaks_page,
        "savings.md": savings_page,
        "fits.md": fits_page,
        "profile.md": profile_page,
        "plots.md": plots_page,
        "cells.md": cells_page,
        "sources.md": sources_page,
        "left-out.md": left_out_page,
    }
    built = {name: builders[name](report) for name in linked_pages(report)}
    return {"index.md": index_page(report), **built}


def linked_pages(report: Report) -> list[str]:
    """The pages this report has: the profile page only with profiled rows, left-out only with rows left out."""
    absent = {"profile.md": "profile_components" not in report.tables, "left-out.md": not report.skipped}
    return [name for name in PAGES if not absent.get(name, False)]


def _links(name: str) -> str:
    return f"[{name}.md](tables/{name}.md) · [{name}.csv](tables/{name}.csv)"


def _page(title: str, *parts: str) -> str:
    return "\n".join([f"# {title}", "", "[Back to the report](index.md)", "", *parts]).rstrip() + "\n"


# -- index.md -------------------------------------------------------------------------------------
def index_page(report: Report) -> str:
    """The front page: rows and warnings, the claims, the predictor's accuracy, the peaks, the pages."""
    parts = [
        "# ftmem report: the guide's claims against measured GPU memory",
        "",
        _rows_line(report),
        "",
        *_warnings(report),
        _claims_section(report),
        _accuracy_section(report),
        _peaks_section(report),
        _headline_plots(report),
        "## More",
        "",
        *[f"- [{name}]({name}): {PAGES[name]}" for name in linked_pages(report)],
        "",
    ]
    return "\n".join(parts)


def _rows_line(report: Report) -> str:
    frame = report.frame
    statuses = frame["status"].value_counts().to_dict() if len(frame) else {}
    counts = ", ".join(f"{n} {s}" for s, n in statuses.items())
    files = frame["source_file"].nunique() if len(frame) else 0
    return (
        f"{len(frame)} result rows ({counts or 'none'}) from {files} results file(s); "
        "[sources](sources.md) lists them with their software stacks."
    )


def _warnings(report: Report) -> list[str]:
    notes = report.warnings
    if not notes:
        return []
    lines = ["> **Read with care:**", ">"] + [f"> - {note}" for note in notes]
    lines += [f">   - `{s.where}`: {s.reason}" for s in report.skipped[:FRONT_LEFT_OUT]]
    return lines + [""]


def _claims_section(report: Report) -> str:
    counts = Counter(r.verdict for r in report.results)
    summary = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    view = report.tables["claims"][["id", "claim", "verdict", "measured", "decided by"]]
    return "\n".join(
        [
            "## The guide's claims",
            "",
            f"{summary}. {UNITS} {MARGINS} _Decided by_: the cell_id of the row that decided (a pair: "
            "without, with), in [cells](cells.md); every check's figures are on [claims](claims.md).",
            "",
            tables.to_markdown(view),
            "",
        ]
    )


def _accuracy_section(report: Report) -> str:
    if "accuracy" not in report.tables:
        return "## ftmem's predictor\n\nftmem's predictor is not available (analysis.predict missing): no predictions.\n"
    return "\n".join(
        [
            "## How close ftmem's predictor is",
            "",
            "Error = (predicted - measured) / measured, over every ok row; a row per measure.",
            "",
            tables.to_markdown(report.tables["accuracy"], "No ok row to compare with."),
            f"Row by row: {_links('measured_vs_predicted')}.",
            "",
        ]
    )


def _peaks_section(report: Report) -> str:
    front = tables.peaks_table(report.view, FRONT_FAMILIES)
    return "\n".join(
        [
            "## Measured peaks",
            "",
            f"Process peak in GiB (NVML; a CPU cell's peak RSS) of the {FRONT_FAMILIES} families with the most "
            "rows (a family: one model and configuration, at several lengths and batch sizes); `OOM > X`: ran "
            "out of memory under a cap of X GiB. Every family: [peaks](peaks.md).",
            "",
            tables.to_markdown(front, "No row measured memory yet (no ok or oom row)."),
        ]
    )


def _headline_plots(report: Report) -> str:
    pngs = [p for group in ("peak_vs_seq", "card_map") for p in report.plots.get(group, []) if p.suffix == ".png"]
    return "\n".join([f"![{p.stem}](plots/{p.name})\n" for p in pngs[:2]] + [""])


# -- linked pages ---------------------------------------------------------------------------------
def claims_page(report: Report) -> str:
    view = report.tables["claims"][["id", "guide", "verdict", "measured", "decided by", "figures", "assumed"]]
    legend = [f"- {v}: {VERDICT_MEANINGS[v]}" for v in VERDICTS]
    return _page(
        "The guide's claims, check by check",
        f"{UNITS} Verdicts:",
        "",
        *legend,
        "",
        tables.to_markdown(view),
        f"Rows behind each verdict (file:line): {_links('claims')}",
    )


def guide_page(report: Report) -> str:
    parts = []
    for name in tables.GUIDE_TABLES:
        parts += [
            f"## {tables.guide_table_title(name)}",
            "",
            tables.to_markdown(report.tables[f"guide_{name}"]),
            _links(f"guide_{name}"),
            "",
        ]
    parts += [
        "## Other published predictions",
        "",
        tables.to_markdown(report.tables["other_predictions"]),
        "The accelerate and DeepSpeed figures are computed here from the formulas those tools use "
        "(model states only: weights, gradients, Adam moments; no activations) on the parameter counts "
        "of `bench.models`; the others are as published.",
        _links("other_predictions"),
    ]
    return _page("The guide's tables with measured columns", *parts)


def peaks_page(report: Report) -> str:
    return _page(
        "Measured peaks, every family",
        "Process peak in GiB (NVML; a CPU cell's peak RSS); `OOM > X`: ran out of memory under a cap of X GiB.",
        "",
        tables.to_markdown(report.tables["peaks"], "No row measured memory yet (no ok or oom row)."),
        _links("peaks"),
    )


def savings_page(report: Report) -> str:
    return _page(
        "Savings of each optimisation",
        "From pairs of ok rows equal in every other spec field, on one software stack.",
        "",
        tables.to_markdown(report.tables["savings_compact"], "No pair of rows differing in one setting yet."),
        _links("savings"),
    )


def fits_page(report: Report) -> str:
    return _page(
        "Fits and capacity",
        "Per family: peak = a + b x tokens (+ c x batch x seq^2 for eager attention), least squares over its "
        "ok rows. A fit through as many rows as coefficients is exact (R^2 = 1) and says little.",
        "",
        tables.to_markdown(report.tables["fits"], "No family has rows enough for a fit."),
        _links("fits"),
        _links("fit_residuals"),
        "",
        "Capacity frontier (longest sequence per batch size and card, from the NVML-peak fit) beside the "
        "measured boundary:",
        "",
        _links("capacity_frontier"),
    )


def profile_page(report: Report) -> str:
    return _page("Where the memory goes", timeline.index_section(report.tables).split("\n", 1)[1])


def plots_page(report: Report) -> str:
    lines = []
    for group, paths in report.plots.items():
        pngs = [p for p in paths if p.suffix == ".png"]
        lines += [f"## {group.replace('_', ' ')}", ""]
        lines += [f"![{p.stem}](plots/{p.name}) ([SVG](plots/{p.stem}.svg))\n" for p in pngs]
        lines += [] if pngs else ["Not drawn: no rows for it yet.", ""]
    return _page("Plots", *lines)


def cells_page(report: Report) -> str:
    return _page(
        "Every loaded row",
        "Peaks and budgets of a multi-GPU row are per GPU (the max over its ranks).",
        "",
        tables.to_markdown(report.tables["cells"], "No rows."),
        _links("cells"),
    )


def sources_page(report: Report) -> str:
    frame = report.frame
    lines = ["## Results files", ""]
    if len(frame):
        files = frame.groupby("source_file")["status"].value_counts().unstack(fill_value=0)
        lines += [f"- `{name}`: " + ", ".join(f"{n} {s}" for s, n in c.items() if n) for name, c in files.iterrows()]
        lines += ["", "## Software stacks", "", "Rows of different stacks are never paired or fitted together.", ""]
        lines += [f"- {stack}: {n} rows" for stack, n in frame["env_stack"].value_counts().items()]
    lines += [f"- `{name}`: no rows" for name in report.empty_files]
    emulated = int(frame["budget_emulated"].sum()) if len(frame) else 0
    lines += [
        "",
        "## Conventions",
        "",
        f"{UNITS} A card means its nvidia-smi total (`bench/cards.py`; the guide's 24 GB card is an RTX 4090, "
        "24564 MiB). A card's verdict uses the NVML process peak (what nvidia-smi shows), else the reserved, "
        "else the allocated peak.",
        f"Budget-emulated rows (a cap on a larger GPU standing in for a card we lack): {emulated}.",
        "ftmem's predictor: "
        + ("included." if report.predict else "not available (analysis.predict missing): no prediction columns."),
    ]
    return _page("What the report rests on", *lines)


def left_out_page(report: Report) -> str:
    return _page(
        "Rows left out",
        "Rows that fail validation against the result schema (`bench/schema.py`) are left out of every table, "
        "plot and verdict. The results files are left as they are: fix or remove those lines to include them.",
        "",
        tables.to_markdown(report.tables["left_out"]),
        _links("left_out"),
    )

