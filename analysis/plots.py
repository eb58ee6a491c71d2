"""Plots of the report (PNG and SVG), drawn on matplotlib Figures without pyplot.

Every plot is a `PlotJob`: a name, a draw function and the arguments it draws from. The jobs are
cheap to make; drawing is what costs, so the report (analysis.outputs) draws a job only when its
arguments changed since the figure on disk was drawn. A draw function is pure: the same arguments
draw the same figure. Figures are built with matplotlib.figure.Figure, so no GUI backend and no
global state is involved (the report runs headless; notebooks show the figures). Memory is in GiB
(2^30 bytes); cards are drawn at their nvidia-smi totals. Never imports torch.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from analysis.claims import config_fits, config_keys
from analysis.fits import STANDARD_CARDS, FamilyFit, with_family
from analysis.load import describe_spec, measured_rows, predict_spec
from analysis.tables import gib_text
from bench.cards import CARD_MIB, GIB, MIB

GIB_LABEL = "GiB (2^30 bytes)"
MAX_PANELS = 6
#: Bars of one configurations figure at most (0.38 inch each).
MAX_BARS = 50
#: Colours of the card map: the smallest standard card a cell fits, then "none of them".
CARD_COLOURS = dict(zip(STANDARD_CARDS, ("#1b5e20", "#43a047", "#9ccc65", "#fdd835", "#fb8c00"), strict=True))
LARGER, OOM_COLOUR, NOT_MEASURED = "#e53935", "#b71c1c", "0.92"


@dataclass(frozen=True)
class PlotJob:
    """One figure: plots/NAME.png and NAME.svg, drawn by `draw(*args)`."""

    name: str
    draw: Callable[..., Figure]
    args: tuple


def save(figure: Figure, out_dir: Path, name: str) -> list[Path]:
    """NAME.png and NAME.svg in out_dir. The layout computed for the PNG is kept for the SVG (the
    constrained layout would otherwise be solved again, a third of the SVG's cost)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    figure.savefig(png, dpi=110)
    figure.set_layout_engine("none")
    figure.savefig(svg, dpi=110)
    return [png, svg]


def run_jobs(jobs: list[PlotJob], out_dir: Path) -> list[Path]:
    """Draw and save every job, no questions asked (notebooks; the report draws through outputs)."""
    return [path for job in jobs for path in save(job.draw(*job.args), Path(out_dir), job.name)]


def _panels(count: int, width: float = 6.4, height: float = 4.6) -> tuple[Figure, list]:
    """A figure with `count` panels, at most three a row."""
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, list(axes[:count])


def card_lines(top_gib: float) -> dict[str, float]:
    """The standard cards (GiB) worth a line beside data reaching `top_gib`: up to the first above
    it; none where the data stays far below the smallest card (tiny CPU models), which the lines
    would flatten onto the axis."""
    totals = {card: CARD_MIB[card] * MIB / GIB for card in STANDARD_CARDS}
    if top_gib < 0.25 * min(totals.values()):
        return {}
    shown = {}
    for card, total in totals.items():
        shown[card] = total
        if total > top_gib:
            break
    return shown


def draw_cards(ax, top_gib: float) -> None:
    """Horizontal lines at card_lines, labelled at the right; the y axis reaches the last of them."""
    cards = card_lines(top_gib)
    for card, total in cards.items():
        ax.axhline(total, color="0.55", lw=0.8, ls="-.", zorder=0)
        ax.text(
            0.995,
            total,
            f"{card} ({total:.1f})",
            transform=ax.get_yaxis_transform(),
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.35",
        )
    ax.set_ylim(0, max([top_gib, *cards.values()]) * 1.08)


#: The columns a panel is drawn from: a figure's fingerprint is these, not the whole frame.
_PANEL_COLUMNS = [
    "seq_len",
    "batch_size",
    "status",
    "footprint_gib",
    "peak_allocated_gib",
    "cap_bytes",
    "env_gpu_name",
    "source_file",
]


def _largest_families(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Families with the most rows first, at most MAX_PANELS."""
    groups = sorted(frame.groupby("family_key"), key=lambda kv: -len(kv[1]))
    return groups[:MAX_PANELS]


def _is_line(rows: pd.DataFrame) -> bool:
    """A family worth a line against length: ok rows at two lengths or more."""
    return rows.loc[rows["status"] == "ok", "seq_len"].nunique() >= 2


# -- peak against sequence length ----------------------------------------------------------------
def peak_vs_seq_jobs(frame: pd.DataFrame, fits: list[FamilyFit]) -> list[PlotJob]:
    """Per method: `peak_vs_seq_METHOD`, one panel per family measured at several lengths (the largest
    first, at most MAX_PANELS), and `configs_METHOD`, a bar per configuration of every other family
    (one shape, as full fine-tuning's strategies mostly are), so that every measured configuration
    is in a figure."""
    rows = measured_rows(frame)
    if rows.empty:
        return []
    rows = with_family(rows)
    coefficients = {f.key: (f.a, f.b, f.c) for f in fits if f.measure == "footprint_bytes"}
    jobs = []
    for method, method_rows in rows.groupby("method", sort=True):
        families = [(k, r) for k, r in _largest_families(method_rows) if _is_line(r)]
        if families:
            panels = [
                (r["family"].iloc[0], r[_PANEL_COLUMNS].reset_index(drop=True), coefficients.get(k))
                for k, r in families
            ]
            jobs.append(PlotJob(f"peak_vs_seq_{method}", draw_peak_vs_seq, (method, panels)))
        rest = method_rows[~method_rows["family_key"].isin([k for k, _ in families])]
        if len(rest):
            title = f"{method}: every configuration" + (f" not in peak_vs_seq_{method}" if families else "")
            jobs.append(PlotJob(f"configs_{method}", draw_config_bars, (title, config_bars(rest))))
    return jobs


def draw_peak_vs_seq(method: str, panels: list[tuple[str, pd.DataFrame, tuple | None]]) -> Figure:
    """Peak against seq_len, a panel per family and a line per batch size (one colour per batch size
    in every panel); OOM cells marked at the cap they failed under, fits dashed, standard cards as
    horizontal lines; one legend for the figure."""
    figure, axes = _panels(len(panels))
    batches = sorted({int(b) for _, rows, _ in panels for b in rows["batch_size"].unique()})
    colours = dict(zip(batches, _palette() * (1 + len(batches) // 8), strict=False))
    for ax, (family, rows, fit) in zip(axes, panels, strict=True):
        draw_family(ax, family, rows, fit, colours)
    figure.suptitle(f"{method}: peak process memory against sequence length")
    handles = [Line2D([], [], color=c, marker="o", label=f"batch {b}") for b, c in colours.items()]
    figure.legend(handles=handles + _style_handles(), loc="outside lower center", ncols=8, fontsize=8)
    return figure


def draw_family(ax, family: str, rows: pd.DataFrame, fit: tuple | None, colours: dict[int, str]) -> None:
    """One family's panel (see draw_peak_vs_seq)."""
    top = 0.0
    for batch, at_batch in rows.sort_values("seq_len").groupby("batch_size"):
        colour = colours[int(batch)]
        ok = at_batch[(at_batch["status"] == "ok") & at_batch["footprint_gib"].notna()]
        ax.plot(ok["seq_len"], ok["footprint_gib"], "o-", color=colour)
        ax.plot(ok["seq_len"], ok["peak_allocated_gib"], ":", marker="o", mfc="none", color=colour, alpha=0.7)
        oom = at_batch[at_batch["status"] == "oom"]
        oom_gib = oom["cap_bytes"].astype("float64") / GIB
        ax.scatter(oom["seq_len"], oom_gib, marker="x", s=70, color=colour, zorder=5)
        top = max(top, ok["footprint_gib"].max() if len(ok) else 0, oom_gib.max() if len(oom) else 0)
        if fit is not None:
            a, b, c = fit
            seqs = np.geomspace(rows["seq_len"].min() / 1.4, rows["seq_len"].max() * 1.4, 60)
            peak = (a + b * batch * seqs + (c or 0.0) * batch * seqs**2) / GIB
            ax.plot(seqs, peak, "--", color=colour, lw=1, alpha=0.8)
    _seq_axis(ax, rows["seq_len"])
    draw_cards(ax, top)
    ax.set_ylabel(f"peak memory, {GIB_LABEL}")
    ax.set_title(_wrap(family, 60) + "\n" + _provenance(rows), fontsize=8.5)


def _wrap(text: str, width: int, lines: int = 3) -> str:
    """`text` in lines of at most `width` characters, at most `lines` of them (the rest cut, marked)."""
    return textwrap.fill(text, width, max_lines=lines, placeholder=" ...") or text


def _provenance(rows: pd.DataFrame) -> str:
    """GPU and results files of a family, short enough for a panel's title."""
    gpus = sorted(str(g) for g in rows["env_gpu_name"].dropna().unique()) or ["no GPU"]
    sweeps = sorted({_SHARD.sub("", Path(f).name) for f in rows["source_file"].unique()})
    files = ", ".join(sweeps) if len(sweeps) <= 2 else f"{len(sweeps)} results files"
    return _wrap(f"({', '.join(gpus)}; {files})", 70)


#: "name.shard-0-of-2.jsonl" -> "name": the shards of one sweep are one source in a title.
_SHARD = re.compile(r"(\.shard-\d+-of-\d+)?\.jsonl$")


def _style_handles() -> list:
    return [
        Line2D([], [], color="k", marker="o", label="process peak (NVML; CPU: RSS), measured"),
        Line2D([], [], color="k", ls=":", marker="o", mfc="none", label="allocated peak, measured"),
        Line2D([], [], color="k", ls="--", label="least-squares fit"),
        Line2D([], [], color="k", marker="x", ls="", label="OOM, drawn at its cap"),
    ]


def _seq_axis(ax, seqs: pd.Series) -> None:
    """Sequence length on a log2 axis with a tick at every measured length."""
    ax.set_xscale("log", base=2)
    ticks = sorted(int(s) for s in seqs.dropna().unique())
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")


def _palette() -> list[str]:
    return ["#1e88e5", "#d81b60", "#8e24aa", "#00897b", "#f4511e", "#6d4c41", "#3949ab", "#7cb342"]


# -- one bar per configuration ---------------------------------------------------------------------
def config_bars(rows: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (rows equal but for their budget): its label, GPUs, the GPU's own size, and
    its largest measured peak per GPU or, where it only ran out of memory, the largest cap it ran out
    under. Ordered by GPU count, then memory."""
    key = config_keys(rows)
    ok = rows[(rows["status"] == "ok") & rows["footprint_bytes"].notna()]
    peaks = ok.sort_values("footprint_bytes", kind="stable").groupby(key[ok.index]).tail(1)
    oom = rows[(rows["status"] == "oom") & ~key.isin(set(key[ok.index]))]
    bounds = oom.sort_values("cap_bytes", kind="stable").groupby(key[oom.index]).tail(1)
    chosen = pd.concat([peaks, bounds])
    # Family names tell alike configurations apart; named among all the method's rows where they were.
    chosen = chosen if "family" in chosen.columns else with_family(chosen)
    oom = chosen["status"] == "oom"
    shape = " seq " + chosen["seq_len"].astype(str) + " x b" + chosen["batch_size"].astype(str)
    table = pd.DataFrame(
        {
            "label": chosen["family"] + shape,
            "gpus": chosen["gpus"].fillna(1).astype(int),
            "oom": oom,
            "gib": chosen["cap_bytes"].where(oom, chosen["footprint_bytes"]).astype("float64") / GIB,
            "gpu": chosen["env_gpu_name"].astype(str),
            "gpu_gib": chosen["env_gpu_total_bytes"].astype("float64") / GIB,
        }
    )
    return table.sort_values(["gpus", "gib"], kind="stable").reset_index(drop=True)


def draw_config_bars(title: str, bars: pd.DataFrame) -> Figure:
    """A bar per configuration: its peak per GPU (solid), or the cap it ran out of memory under
    (hatched: it needs more); the standard cards and the GPU it ran on as vertical lines. At most
    MAX_BARS bars (the lightest); the title says how many were left out (every row is in cells.md)."""
    shown = bars.sort_values("gib", kind="stable").head(MAX_BARS).sort_index().reset_index(drop=True)
    if len(shown) < len(bars):
        title += f" ({len(shown)} of {len(bars)}, the lightest; every row is in cells.md)"
    bars = shown
    figure = Figure(figsize=(11, 2.0 + 0.38 * len(bars)), layout="constrained")
    ax = figure.subplots()
    colours = dict(zip(sorted(bars["gpus"].unique()), _palette(), strict=False))
    for y, bar in bars.iterrows():
        colour = colours[bar["gpus"]]
        style = dict(fill=False, hatch="///", edgecolor=colour) if bar["oom"] else dict(color=colour)
        ax.barh(y, bar["gib"], height=0.65, **style)
        text = f" OOM under {gib_text(bar['gib'])}: needs more" if bar["oom"] else f" {gib_text(bar['gib'])}"
        ax.text(bar["gib"], y, text, va="center", fontsize=7.5)
    ax.set_yticks(range(len(bars)), [_wrap(label, 70) for label in bars["label"]], fontsize=7.5)
    ax.invert_yaxis()
    top = float(bars["gib"].max()) if len(bars) else 0.0
    marks = {f"{card} {total:.1f}": total for card, total in card_lines(top).items()}
    gpus = bars.dropna(subset=["gpu_gib"]).groupby("gpu")["gpu_gib"].max()
    # A GPU's own size only where some bar comes near it (budgets emulate smaller cards on it).
    marks.update({f"whole {gpu} {total:.1f}": total for gpu, total in gpus.items() if top > 0.6 * total})
    for name, total in marks.items():
        ax.axvline(total, color="0.2" if name.startswith("whole") else "0.55", lw=0.8, ls="--", zorder=0)
    ax.set_xlim(0, max([top, *marks.values()]) * 1.3)  # room for the text beside the longest bar
    cards_axis = ax.secondary_xaxis("top")  # the cards named above the plot, clear of the bars
    cards_axis.set_xticks(list(marks.values()), list(marks), fontsize=7, rotation=45, ha="left")
    ax.set_xlabel(f"peak process memory per GPU (NVML; a CPU cell: its peak RSS), {GIB_LABEL}")
    handles = [Patch(color=c, label=f"{g} GPU{'s' if g > 1 else ''}") for g, c in colours.items()]
    handles += (
        [Patch(fill=False, hatch="///", label="ran out of memory under this cap")]
        if bars["oom"].any()
        else []
    )
    figure.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=len(handles))
    ax.set_title(_wrap(f"{title}, one bar each", 90))
    return figure


# -- measured against predicted ------------------------------------------------------------------
def measured_vs_predicted_jobs(table: pd.DataFrame) -> list[PlotJob]:
    if table.empty:
        return []
    view = table[["measure", "measured_gib", "predicted_gib"]].reset_index(drop=True)
    return [PlotJob("measured_vs_predicted", draw_measured_vs_predicted, (view,))]


def draw_measured_vs_predicted(table: pd.DataFrame) -> Figure:
    """Scatter of predicted against measured GiB per measure, with y = x and a +-3% band."""
    figure = Figure(figsize=(6.4, 6.0), layout="constrained")
    ax = figure.subplots()
    top = max(table["measured_gib"].max(), table["predicted_gib"].max()) * 1.08
    line = np.linspace(0, top, 50)
    ax.fill_between(line, line * 0.97, line * 1.03, color="0.85", label="within 3%")
    ax.plot(line, line, color="0.3", lw=1, label="predicted = measured")
    for (measure, rows), marker in zip(table.groupby("measure"), "os^", strict=False):
        ax.scatter(rows["measured_gib"], rows["predicted_gib"], marker=marker, label=measure, zorder=3)
    ax.set(
        xlim=(0, top),
        ylim=(0, top),
        xlabel=f"measured peak, {GIB_LABEL}",
        ylabel=f"ftmem predicted peak, {GIB_LABEL}",
        title="ftmem's prediction against the measurement",
    )
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    return figure


def plot_measured_vs_predicted(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    return run_jobs(measured_vs_predicted_jobs(table), out_dir)


# -- savings -------------------------------------------------------------------------------------
def savings_jobs(savings: pd.DataFrame) -> list[PlotJob]:
    if savings.empty or "footprint_saved_pct" not in savings.columns:
        return []
    view = savings[["optimisation", "change", "footprint_saved_pct", "footprint_saved_gib"]].reset_index(
        drop=True
    )
    return [PlotJob("savings", draw_savings, (view,))]


def draw_savings(savings: pd.DataFrame) -> Figure:
    """One row per optimisation and change: a dot per measured pair (process peak, NVML), a bar at
    their median, and the median GiB written on; the tables list every pair."""
    groups = list(savings.groupby(["optimisation", "change"], sort=False))
    figure = Figure(figsize=(8.5, 1.4 + 0.55 * len(groups)), layout="constrained")
    ax = figure.subplots()
    jitter = np.random.default_rng(0)
    for y, (_, pairs) in enumerate(groups):
        pct = pairs["footprint_saved_pct"].astype("float64")
        ax.barh(y, pct.median(), height=0.6, color="#90caf9")
        ax.scatter(pct, y + jitter.uniform(-0.18, 0.18, len(pct)), s=12, color="#1e88e5", zorder=3)
        gib = pairs["footprint_saved_gib"].astype("float64").median()
        ax.text(
            max(pct.max(), 0),
            y,
            f"  median {pct.median():.1f}% ({gib:.1f} GiB), {len(pct)} pairs",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(groups)), [f"{o}\n{c}" for (o, c), _ in groups], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_xlabel("process memory (NVML) saved, % of the peak without the optimisation")
    ax.set_title("Savings: one dot per pair of rows that differ only by one setting; bar at the median")
    ax.margins(x=0.35)
    return figure


def plot_savings(savings: pd.DataFrame, out_dir: Path) -> list[Path]:
    return run_jobs(savings_jobs(savings), out_dir)


# -- which card each cell needs ------------------------------------------------------------------
def card_map_jobs(frame: pd.DataFrame) -> list[PlotJob]:
    """`card_map`: per family (the largest, at most MAX_PANELS), a seq x batch grid coloured by the
    smallest standard card each cell fits with 5% to spare."""
    rows = measured_rows(frame)
    if rows.empty:
        return []
    panels = [(r["family"].iloc[0], smallest_cards(r)) for _, r in _largest_families(with_family(rows))]
    return [PlotJob("card_map", draw_card_map, (panels,))]


def smallest_cards(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (seq_len, batch_size) of one family: the smallest standard card it fits with 5% to spare
    (None: none of them), and its process peak in GiB (None: it only ran out of memory)."""
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for card in reversed(STANDARD_CARDS):  # the smallest card that fits is the last one written
        for fit in config_fits(rows, CARD_MIB[card] * MIB, card):
            cell = cells.setdefault((int(fit.row["seq_len"]), int(fit.row["batch_size"])), {"card": None})
            cell["gib"] = cell.get("gib") if fit.row["status"] == "oom" else fit.row["footprint_gib"]
            cell["card"] = card if fit.verdict == "supported" else cell["card"]
    records = [{"seq_len": s, "batch_size": b, **cell} for (s, b), cell in sorted(cells.items())]
    return pd.DataFrame.from_records(records, columns=["seq_len", "batch_size", "card", "gib"])


def draw_card_map(panels: list[tuple[str, pd.DataFrame]]) -> Figure:
    """The card map: a panel per family (see card_map_jobs), each cell labelled with its GiB or OOM."""
    figure, axes = _panels(len(panels), width=4.6, height=3.2)
    for ax, (family, cells) in zip(axes, panels, strict=True):
        seqs, batches = sorted(cells["seq_len"].unique()), sorted(cells["batch_size"].unique())
        ax.set(xlim=(-0.5, len(seqs) - 0.5), ylim=(-0.5, len(batches) - 0.5))
        ax.set_facecolor(NOT_MEASURED)
        for cell in cells.to_dict("records"):
            x, y = seqs.index(cell["seq_len"]), batches.index(cell["batch_size"])
            oom = cell["gib"] is None or pd.isna(cell["gib"])
            colour = CARD_COLOURS.get(cell["card"], OOM_COLOUR if oom else LARGER)
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, color=colour, ec="white"))
            ax.text(x, y, "OOM" if oom else f"{cell['gib']:.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set(xlabel="sequence length", ylabel="batch size")
        ax.set_title(_wrap(family, 50), fontsize=8.5)
    handles = [Patch(color=c, label=card) for card, c in CARD_COLOURS.items()]
    handles += [
        Patch(color=LARGER, label=f"none up to {STANDARD_CARDS[-1]}"),
        Patch(color=OOM_COLOUR, label="OOM"),
        Patch(color=NOT_MEASURED, label="not measured"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=8, fontsize=8)
    figure.suptitle("The smallest card each cell fits with 5% to spare (cell text: process peak, GiB)")
    return figure


# -- predicted components beside the measurement --------------------------------------------------
def components_jobs(frame: pd.DataFrame, predict: Callable, limit: int = 12) -> list[PlotJob]:
    """Per measured configuration (at most `limit`, the lightest), the predictor's components."""
    ok = frame[(frame["status"] == "ok") & frame["footprint_bytes"].notna()]
    ok = ok.sort_values("footprint_bytes").drop_duplicates("cell_id").head(limit)
    bars = []
    for row in ok.to_dict("records"):
        prediction = predict_spec(predict, row["spec"])
        if prediction is not None and getattr(prediction, "components", None):
            label = describe_spec(row["spec"]).replace(" seq", "\nseq")
            components = {k: int(v) for k, v in prediction.components.items()}
            bars.append((label, components, float(row["peak_allocated_gib"]), float(row["footprint_gib"])))
    return [PlotJob("components", draw_components, (bars,))] if bars else []


def draw_components(bars: list[tuple[str, dict[str, int], float, float]]) -> Figure:
    """The predictor's components stacked (left) beside the measured allocated and process peaks."""
    names = list(dict.fromkeys(name for _, components, _, _ in bars for name in components))
    colours = dict(zip(names, _component_colours(len(names)), strict=True))
    figure = Figure(figsize=(max(6.4, 1.1 * len(bars) + 5), 5.6), layout="constrained")
    ax = figure.subplots()
    for x, (_, components, allocated, footprint) in enumerate(bars):
        _component_bar(ax, x, components, colours)
        ax.bar(x + 0.2, allocated, 0.38, color="0.3")
        ax.plot([x + 0.01, x + 0.39], [footprint] * 2, color="#d50000", lw=2)
    ax.set_xticks(range(len(bars)), [label for label, *_ in bars], fontsize=7, rotation=30, ha="right")
    handles = [Patch(color=colours[n], label=f"predicted: {n}") for n in names]
    handles += [
        Patch(color="0.3", label="measured allocated peak"),
        Line2D([], [], color="#d50000", lw=2, label="measured NVML process peak"),
    ]
    figure.legend(handles=handles, fontsize=7, loc="outside right upper")
    ax.set(
        ylabel=f"memory, {GIB_LABEL}",
        title="ftmem's predicted components (left) beside the measurement (right)",
    )
    return figure


def plot_components(frame: pd.DataFrame, predict: Callable, out_dir: Path, limit: int = 12) -> list[Path]:
    return run_jobs(components_jobs(frame, predict, limit), out_dir)


def _component_bar(ax, x: float, components: dict[str, int], colours: dict[str, Any]) -> None:
    """One stacked bar of predicted components, in the legend's order."""
    bottom = 0.0
    for name, colour in colours.items():
        height = components.get(name, 0) / GIB
        ax.bar(x - 0.2, height, 0.38, bottom=bottom, color=colour)
        bottom += height


def _component_colours(count: int) -> list:
    """Distinct colours for components, leaving out tab20's greys (the measured bars are grey)."""
    from matplotlib import colormaps

    colours = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (14, 15)]
    colours += list(colormaps["tab20b"].colors)
    return [colours[i % len(colours)] for i in range(count)]
