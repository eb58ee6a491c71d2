"""Plots of the report (PNG and SVG), drawn on matplotlib Figures without pyplot.

Figures are built with matplotlib.figure.Figure, so no GUI backend and no global state is
involved (the report runs headless; notebooks show the returned figures). Memory is in GiB
(2^30 bytes); cards are drawn at their nvidia-smi totals. Never imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from analysis.claims import config_fits
from analysis.fits import STANDARD_CARDS, FamilyFit, with_family
from analysis.load import describe_spec, predict_spec
from bench.cards import CARD_MIB, GIB, MIB

GIB_LABEL = "GiB (2^30 bytes)"
VERDICT_COLOURS = {"supported": "#43a047", "marginal": "#fbc02d", "refuted": "#e53935"}
FIT_LABELS = {
    "supported": "fits with 5% to spare",
    "marginal": "within 5% of the card",
    "refuted": "does not fit (or OOM)",
}
MAX_PANELS = 6


def save(figure: Figure, out_dir: Path, name: str) -> list[Path]:
    """NAME.png and NAME.svg in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    for path in paths:
        figure.savefig(path, dpi=110)
    return paths


def _panels(count: int, width: float = 6.4, height: float = 4.6) -> tuple[Figure, list]:
    """A figure with `count` panels, at most three a row."""
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, list(axes[:count])


def draw_cards(ax, top_gib: float) -> None:
    """Horizontal lines at the standard cards up to the first above the data, labelled at the right."""
    for card in STANDARD_CARDS:
        total = CARD_MIB[card] * MIB / GIB
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
        if total > top_gib:
            ax.set_ylim(0, total * 1.08)
            return
    ax.set_ylim(0, top_gib * 1.08)


def measured_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that say something about GPU memory: ok with a peak, or OOM under a known cap."""
    ok = (frame["status"] == "ok") & frame["footprint_bytes"].notna()
    oom = (frame["status"] == "oom") & frame["cap_bytes"].notna()
    return frame[(ok | oom) & frame["seq_len"].notna()]


def _largest_families(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Families with the most rows first, at most MAX_PANELS."""
    groups = sorted(frame.groupby("family_key"), key=lambda kv: -len(kv[1]))
    return groups[:MAX_PANELS]


# -- peak against sequence length ----------------------------------------------------------------
def plot_peak_vs_seq(frame: pd.DataFrame, fits: list[FamilyFit], out_dir: Path) -> list[Path]:
    """Per method, one panel per family: peak against seq_len, one line per batch size, OOM cells
    marked at the cap they failed under, fits dashed, standard cards as horizontal lines."""
    rows = measured_rows(frame)
    if rows.empty:
        return []
    rows = with_family(rows)
    footprint_fits = {f.key: f for f in fits if f.measure == "footprint_bytes"}
    paths = []
    for method, method_rows in rows.groupby("method", sort=True):
        families = _largest_families(method_rows)
        figure, axes = _panels(len(families))
        for ax, (key, family_rows) in zip(axes, families, strict=True):
            draw_family(ax, family_rows, footprint_fits.get(key))
        figure.suptitle(f"{method}: peak process memory against sequence length")
        paths += save(figure, out_dir, f"peak_vs_seq_{method}")
    return paths


def draw_family(ax, rows: pd.DataFrame, fit: FamilyFit | None) -> None:
    """One family's panel (see plot_peak_vs_seq)."""
    colours = dict(zip(sorted(rows["batch_size"].unique()), _palette(), strict=False))
    top = 0.0
    for batch, colour in colours.items():
        at_batch = rows[rows["batch_size"] == batch].sort_values("seq_len")
        ok = at_batch[(at_batch["status"] == "ok") & at_batch["footprint_gib"].notna()]
        ax.plot(ok["seq_len"], ok["footprint_gib"], "o-", color=colour, label=f"batch {batch}")
        ax.plot(ok["seq_len"], ok["peak_allocated_gib"], ":", marker="o", mfc="none", color=colour, alpha=0.7)
        oom = at_batch[at_batch["status"] == "oom"]
        ax.scatter(
            oom["seq_len"], oom["cap_bytes"].astype("float64") / GIB, marker="x", s=70, color=colour, zorder=5
        )
        top = max(
            top,
            ok["footprint_gib"].max() if len(ok) else 0,
            (oom["cap_bytes"].max() or 0) / GIB if len(oom) else 0,
        )
        if fit is not None:
            seqs = np.geomspace(rows["seq_len"].min() / 1.4, rows["seq_len"].max() * 1.4, 60)
            ax.plot(seqs, [fit.peak(s, batch) / GIB for s in seqs], "--", color=colour, lw=1, alpha=0.8)
    _seq_axis(ax, rows["seq_len"])
    draw_cards(ax, top)
    ax.set_ylabel(f"peak memory, {GIB_LABEL}")
    ax.set_title(f"{rows['family'].iloc[0]}\n({_provenance(rows)})", fontsize=9)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _style_handles(), fontsize=7, loc="upper left")


def _provenance(rows: pd.DataFrame) -> str:
    """GPU and results files of a family: two stacks of one GPU differ by the file they came from."""
    gpus = sorted(str(g) for g in rows["env_gpu_name"].dropna().unique())
    sweeps = sorted({_SHARD.sub("", Path(f).name) for f in rows["source_file"].unique()})
    return f"{', '.join(gpus)}; {', '.join(sweeps)}"


#: "name.shard-0-of-2.jsonl" -> "name": the shards of one sweep are one source in a title.
_SHARD = re.compile(r"(\.shard-\d+-of-\d+)?\.jsonl$")


def _style_handles() -> list:
    return [
        Line2D([], [], color="k", marker="o", label="NVML process peak (measured)"),
        Line2D([], [], color="k", ls=":", marker="o", mfc="none", label="allocated peak (measured)"),
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


# -- measured against predicted ------------------------------------------------------------------
def plot_measured_vs_predicted(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Scatter of predicted against measured GiB per measure, with y = x and a +-3% band."""
    if table.empty:
        return []
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
    return save(figure, out_dir, "measured_vs_predicted")


# -- savings -------------------------------------------------------------------------------------
def plot_savings(savings: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One row per optimisation and change: a dot per measured pair (process peak, NVML), a bar at
    their median, and the median GiB written on; the tables list every pair."""
    if savings.empty or "footprint_saved_pct" not in savings.columns:
        return []
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
    return save(figure, out_dir, "savings")


# -- fit / OOM map per card ----------------------------------------------------------------------
def plot_oom_heatmaps(
    frame: pd.DataFrame, out_dir: Path, cards: tuple[str, ...] = STANDARD_CARDS
) -> list[Path]:
    """Per card, one panel per family: a seq x batch grid coloured by whether the cell fits the
    card (green), is within 5% of it (amber) or not (red), from ok rows' footprints and OOM rows."""
    rows = measured_rows(frame)
    if rows.empty:
        return []
    families = _largest_families(with_family(rows))
    paths = []
    for card in cards:
        figure, axes = _panels(len(families), width=4.6, height=3.2)
        for ax, (_, family_rows) in zip(axes, families, strict=True):
            draw_heatmap(ax, family_rows, card)
        figure.legend(
            handles=[Patch(color=c, label=FIT_LABELS[v]) for v, c in VERDICT_COLOURS.items()]
            + [Patch(color="0.92", label="not measured")],
            loc="outside lower center",
            ncols=4,
            fontsize=8,
        )
        figure.suptitle(f"Which cells fit {card} ({CARD_MIB[card] * MIB / GIB:.1f} GiB)")
        paths += save(figure, out_dir, f"oom_frontier_{card}")
    return paths


def draw_heatmap(ax, rows: pd.DataFrame, card: str) -> None:
    """One family's grid of verdicts against one card, each cell labelled with its GiB or OOM."""
    budget = CARD_MIB[card] * MIB
    seqs, batches = sorted(rows["seq_len"].unique()), sorted(rows["batch_size"].unique())
    ax.set(xlim=(-0.5, len(seqs) - 0.5), ylim=(-0.5, len(batches) - 0.5))
    ax.set_facecolor("0.92")  # cells without rows: not measured
    for fit in config_fits(rows, budget, card):  # a family's configurations differ in seq and batch only
        x, y = seqs.index(fit.row["seq_len"]), batches.index(fit.row["batch_size"])
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, color=VERDICT_COLOURS[fit.verdict], ec="white"))
        text = "OOM" if fit.row["status"] == "oom" else f"{fit.row['footprint_gib']:.1f}"
        ax.text(x, y, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
    ax.set_yticks(range(len(batches)), [str(b) for b in batches])
    ax.set(xlabel="sequence length", ylabel="batch size")
    ax.set_title(f"{rows['family'].iloc[0]}\n(cell text: process peak, GiB)", fontsize=9)


# -- predicted components beside the measurement --------------------------------------------------
def plot_components(frame: pd.DataFrame, predict: Callable, out_dir: Path, limit: int = 12) -> list[Path]:
    """Per measured configuration (at most `limit`), the predictor's components stacked, beside the
    measured allocated and NVML process peaks."""
    ok = frame[(frame["status"] == "ok") & frame["footprint_bytes"].notna()]
    ok = ok.sort_values("footprint_bytes").drop_duplicates("cell_id").head(limit)
    pairs = [(row, predict_spec(predict, row["spec"])) for row in ok.to_dict("records")]
    pairs = [(row, p) for row, p in pairs if p is not None and getattr(p, "components", None)]
    if not pairs:
        return []
    names = list(dict.fromkeys(name for _, p in pairs for name in p.components))
    colours = dict(zip(names, _component_colours(len(names)), strict=True))
    figure = Figure(figsize=(max(6.4, 1.1 * len(pairs) + 5), 5.6), layout="constrained")
    ax = figure.subplots()
    for x, (row, prediction) in enumerate(pairs):
        _component_bar(ax, x, prediction.components, colours)
        ax.bar(x + 0.2, row["peak_allocated_gib"], 0.38, color="0.3")
        ax.plot([x + 0.01, x + 0.39], [row["footprint_gib"]] * 2, color="#d50000", lw=2)
    ax.set_xticks(
        range(len(pairs)),
        [describe_spec(r["spec"]).replace(" seq", "\nseq") for r, _ in pairs],
        fontsize=7,
        rotation=30,
        ha="right",
    )
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
    return save(figure, out_dir, "components")


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
