"""The report's Markdown pages: index.md in front, with what a reader came for (the verdicts on the
guide's claims, how close the predictor is, the measured peaks), and the row-level detail on pages
it links to. Builds text only; analysis.report writes it. Never imports torch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from analysis import tables, timeline
from analysis.claims import VERDICT_MEANINGS, VERDICTS

if TYPE_CHECKING:
    from analysis.contents import Report

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

#: The linked pages, in the order the front page lists them: title, and what each holds.
PAGES = {
    "claims.md": (
        "The guide's claims, check by check",
        "the figures and rows behind each verdict, what was assumed",
    ),
    "guide.md": ("The guide's tables with measured columns", "and other published predictions"),
    "peaks.md": ("Measured peaks, every family", "process peaks by length and batch size"),
    "savings.md": ("Savings of each optimisation", "pair by pair"),
    "fits.md": ("Fits and capacity", "memory against the shape of a batch, and the capacity it implies"),
    "profile.md": ("Where the memory goes", "the profiled cells by category, against the predictor"),
    "plots.md": ("Plots", "every figure"),
    "cells.md": ("Every loaded row", "one line each"),
    "sources.md": ("What the report rests on", "results files, software stacks, conventions"),
    "left-out.md": ("Rows left out", "rows that fail validation or are not result rows, and why"),
}


def all_pages(report: Report) -> dict[str, str]:
    """index.md and the pages it links to, by file name."""
    builders = {
        "claims.md": claims_page,
        "guide.md": guide_page,
        "fits.md": fits_page,
        "profile.md": profile_page,
        "plots.md": plots_page,
        "sources.md": sources_page,
    }
    built = {
        name: table_page(report, name) if name in TABLE_PAGES else builders[name](report)
        for name in linked_pages(report)
    }
    return {"index.md": index_page(report), **built}


def linked_pages(report: Report) -> list[str]:
    """The pages this report has: the profile page only with profiled rows, left-out only with rows left out."""
    absent = {"profile.md": "profile_components" not in report.tables, "left-out.md": not report.skipped}
    return [name for name in PAGES if not absent.get(name, False)]


def _links(name: str) -> str:
    return f"[{name}.md](tables/{name}.md) · [{name}.csv](tables/{name}.csv)"


def _page(name: str, *parts: str) -> str:
    """A linked page: its title (PAGES), a way back, its parts."""
    title = PAGES[name][0]
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
        *[f"- [{PAGES[name][0]}]({name}): {PAGES[name][1]}" for name in linked_pages(report)],
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
    judged = sum(counts[v] for v in VERDICTS if v not in ("not measured", "not measurable"))
    if not judged and len(report.frame):
        defaults = ", ".join(f"{k} {v}" for k, v in report.guide.defaults.items() if k in ("model", "device"))
        summary += (
            f". The guide's claims are judged on rows of its own setup ({defaults}; analysis/claims.yaml): "
            "none of these rows is one; what they measured is under Measured peaks"
        )
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


def headline_plots(report: Report) -> list[Path]:
    """The two figures a reader sees first: peak against length for the method with the most ok rows,
    and the savings (without pairs, the card map)."""
    chosen = []
    peak = [p for p in report.plots.get("peak_vs_seq", []) if p.suffix == ".png"]
    if peak:
        counts = report.frame[report.frame["status"] == "ok"]["method"].value_counts()
        chosen.append(max(peak, key=lambda p: counts.get(p.stem.removeprefix("peak_vs_seq_"), 0)))
    second = [
        p for p in report.plots.get("savings", []) + report.plots.get("card_map", []) if p.suffix == ".png"
    ]
    return chosen + second[:1]


def _headline_plots(report: Report) -> str:
    return "\n".join([f"![{p.stem}](plots/{p.name})\n" for p in headline_plots(report)] + [""])


# -- linked pages ---------------------------------------------------------------------------------
def claims_page(report: Report) -> str:
    view = report.tables["claims"][["id", "guide", "verdict", "measured", "decided by", "figures", "assumed"]]
    legend = [f"- {v}: {VERDICT_MEANINGS[v]}" for v in VERDICTS]
    return _page(
        "claims.md",
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
        "of `bench.model.registry`; the others are as published.",
        _links("other_predictions"),
    ]
    return _page("guide.md", *parts)


def fits_page(report: Report) -> str:
    return _page(
        "fits.md",
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


#: Pages that are one table: (the table shown, the table linked, what it holds, what an empty one means).
TABLE_PAGES = {
    "peaks.md": (
        "peaks",
        "peaks",
        "Process peak in GiB (NVML; a CPU cell's peak RSS); `OOM > X`: ran out of memory under a cap of X GiB.",
        "No row measured memory yet (no ok or oom row).",
    ),
    "savings.md": (
        "savings_compact",
        "savings",
        "From pairs of ok rows equal in every other spec field, on one software stack.",
        "No pair of rows differing in one setting yet.",
    ),
    "cells.md": (
        "cells",
        "cells",
        "Peaks and budgets of a multi-GPU row are per GPU (the max over its ranks).",
        "No rows.",
    ),
    "left-out.md": (
        "left_out",
        "left_out",
        "Rows that fail validation against the result schema (`bench/schema.py`), and files of JSON lines that "
        "are not result rows, are left out of every table, plot and verdict. The files are left as they are: "
        "fix or remove those lines to include them.",
        "No row left out.",
    ),
}


def table_page(report: Report, name: str) -> str:
    """A page of TABLE_PAGES."""
    shown, linked, intro, empty = TABLE_PAGES[name]
    return _page(name, intro, "", tables.to_markdown(report.tables[shown], empty), _links(linked))


def profile_page(report: Report) -> str:
    return _page("profile.md", timeline.index_section(report.tables).split("\n", 1)[1])


def plots_page(report: Report) -> str:
    lines = []
    for group, paths in report.plots.items():
        pngs = [p for p in paths if p.suffix == ".png"]
        lines += [f"## {group.replace('_', ' ')}", ""]
        lines += [f"![{p.stem}](plots/{p.name}) ([SVG](plots/{p.stem}.svg))\n" for p in pngs]
        lines += [] if pngs else ["Not drawn: no rows for it yet.", ""]
    return _page("plots.md", *lines)


def sources_page(report: Report) -> str:
    frame = report.frame
    lines = ["## Results files", ""]
    if len(frame):
        files = frame.groupby("source_file")["status"].value_counts().unstack(fill_value=0)
        lines += [
            f"- `{name}`: " + ", ".join(f"{n} {s}" for s, n in c.items() if n) for name, c in files.iterrows()
        ]
        lines += [
            "",
            "## Software stacks",
            "",
            "Rows of different stacks are never paired or fitted together.",
            "",
        ]
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
        + (
            "included."
            if report.predict
            else "not available (analysis.predict missing): no prediction columns."
        ),
    ]
    return _page("sources.md", *lines)
