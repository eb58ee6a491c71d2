"""Where the memory goes (issue 8): the profiled cells' timelines, their breakdown against the
predictor's components, and what profiling itself costs. Never imports torch.

A cell run with `profile_memory` has, in its row, the bytes by category at the profiled peak
(`profile_categories_bytes`) and a timeline file (`profile_timeline_file`, written by
bench.cell.profile, resolved beside the results file by bench.cell.artifacts). From these:

- `plot_timeline`: memory over time, stacked by category, across the warm-up and first measured
  steps, with the steps and their parts (forward / backward / optimizer step) marked and the peak;
- `component_table`: measured categories at the peak against the predictor's components mapped to
  the same categories (COMPONENT_CATEGORY below), with the error in %;
- `overhead_table`: pairs of rows that differ only in profile_memory / snapshot: what profiling adds.

Units: GiB = 2^30 bytes (MiB = 2^20 where the whole timeline stays under 1 GiB, as on tiny CPU cells).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis import tables
from analysis.load import REPO_ROOT, describe_spec, is_present, predict_spec, spec_key
from analysis.plots import PlotJob, run_jobs, save
from bench.cards import GIB, MIB
from bench.cell.artifacts import resolve

#: The row's categories (bench.cell.profile.ROW_CATEGORIES), bottom to top of the stack.
CATEGORIES = ("parameters", "optimizer_state", "gradients", "activations", "temporaries", "other")
#: The timeline file's finer categories -> the row's (torch's INPUT, AUTOGRAD_DETAIL and unknown are `other`;
#: the *_by_* columns are those bench.cell.profile placed itself, see its docstring).
TIMELINE_TO_ROW = {
    "parameters": "parameters",
    "parameters_by_storage": "parameters",  # the model's own state that torch filed as inputs
    "gradients": "gradients",
    "optimizer_state": "optimizer_state",
    "activations": "activations",
    "temporaries": "temporaries",
    "activations_by_lifetime": "activations",  # placed by lifetime where torch gave no useful category
    "temporaries_by_lifetime": "temporaries",
    "autograd_detail": "other",
    "inputs": "other",
    "unknown": "other",
}
COLOURS = {
    "parameters": "#2e7d32",
    "optimizer_state": "#f9a825",
    "gradients": "#1565c0",
    "activations": "#c62828",
    "temporaries": "#8e24aa",
    "other": "#9e9e9e",
}
PHASE_COLOURS = {
    "forward": "#ef9a9a",
    "backward": "#90caf9",
    "optimizer_step": "#ffe082",
    "zero_grad": "#e0e0e0",
}

#: The one table mapping the predictor's components (analysis.predict, `Prediction.components`) to the
#: profiler's categories. Names ending in "_" are prefixes (weights_bf16, embed_head_norms_fp32, ...).
#: Where torch's profiler files a tensor differently from the predictor's intent:
#: - autocast weight copies and the lm_head input are saved for backward, so the profiler calls them
#:   activations; the forward's logits and log-probs (loss_forward) likewise;
#: - gradients of activations in backward (loss_backward, logits_grad) are torch's AUTOGRAD_DETAIL or
#:   TEMPORARY, which bench.cell.profile places as temporaries (made and freed in backward); loss_backward
#:   also holds the saved log-probs, activations to the profiler, so compare activations + temporaries
#:   + other as one ("working set") too. Rows profiled before that placement (ftmem commit c38cc1d and
#:   older) show these gradients as `other`;
#: - the cuBLAS workspaces hold no tensor, but on CUDA the profiler sees their allocations (no category:
#:   `other`; an H200, Qwen3-14B: 2 x 32 MiB, the forward thread's and autograd's, as predicted).
COMPONENT_CATEGORY: dict[str, str] = {
    "weights_": "parameters",
    "embed_head_norms_": "parameters",
    "experts_": "parameters",
    "lora_adapters": "parameters",
    "optimizer_state": "optimizer_state",
    "grads": "gradients",
    "grads_accumulated": "gradients",
    "lm_head_grads": "gradients",
    "layer_activations": "activations",
    "layer_inputs": "activations",
    "final_norm_saved": "activations",
    "attention_mask": "activations",
    "rope_tables": "activations",
    "kept_by_autograd_functions": "activations",
    "router_aux_loss_saved": "activations",
    "recomputed_layer": "activations",
    "layer_running": "activations",
    "autocast_weight_copies": "activations",
    "lm_head_input": "activations",
    "loss_forward": "activations",
    "attention_transient": "temporaries",
    "backward_transient": "temporaries",
    "optimizer_transient": "temporaries",
    "loss_backward": "temporaries",
    "logits_grad": "temporaries",
    "cublas_workspace": "other",
    # Names the predictor gained with other families (mixture-of-experts, RoPE tables counted apart):
    "experts_": "parameters",
    "rope_tables": "activations",
    "kept_by_autograd_functions": "activations",
    "router_aux_loss_saved": "activations",
}
NOT_PROFILED = "not_profiled"
WORKING_SET = ("activations", "temporaries", "other")


def component_category(name: str) -> str:
    """The category of one predictor component (COMPONENT_CATEGORY; unknown names are `other`)."""
    if name in COMPONENT_CATEGORY:
        return COMPONENT_CATEGORY[name]
    prefix = next((p for p in COMPONENT_CATEGORY if p.endswith("_") and name.startswith(p)), None)
    return COMPONENT_CATEGORY[prefix] if prefix else "other"


def predicted_categories(components: dict[str, int]) -> dict[str, int]:
    """Predicted components summed by category (NOT_PROFILED kept apart)."""
    out = dict.fromkeys((*CATEGORIES, NOT_PROFILED), 0)
    for name, value in components.items():
        out[component_category(name)] += int(value)
    return out


def coarse_phase(predicted_phase: str) -> str:
    """The predictor's peak moment (forward_end, loss_backward, optimizer_step...) as a profiled phase."""
    if "optimizer" in predicted_phase:
        return "optimizer_step"
    if "backward" in predicted_phase:
        return "backward"
    return "forward" if "forward" in predicted_phase else "other"


# -- rows and files --------------------------------------------------------------------------------
def profiled_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Ok rows that carry a memory profile; of a cell profiled more than once on one software stack,
    the latest (a re-run with newer categorisation, in another results file, supersedes)."""
    if "profile_categories_bytes" not in frame.columns or frame.empty:
        return frame.iloc[0:0]
    has = frame["profile_categories_bytes"].map(lambda v: isinstance(v, dict))
    rows = frame[(frame["status"] == "ok") & has]
    order = rows.sort_values("env_started_at", kind="stable", na_position="first")
    return order.drop_duplicates(["cell_id", "repeat", "env_stack"], keep="last").sort_index()


def timeline_path(row: pd.Series | dict) -> Path | None:
    """The row's timeline file on disk (beside its results file), or None if it cannot be found."""
    value = row.get("profile_timeline_file")
    return resolve(value if is_present(value) else None, row.get("source_file"), REPO_ROOT)


def load_timeline(path: str | Path) -> dict[str, Any]:
    """A timeline file (bench.cell.profile.build_timeline) as a dict."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def row_series(timeline: dict[str, Any]) -> tuple[list[float], dict[str, list[int]]]:
    """(times s, bytes per row category) of a timeline, the finer categories summed as TIMELINE_TO_ROW."""
    names = timeline["categories"]
    series = {c: [0] * len(timeline["t"]) for c in CATEGORIES}
    for i, point in enumerate(timeline["bytes"]):
        for name, value in zip(names, point, strict=True):
            series[TIMELINE_TO_ROW.get(name, "other")][i] += value
    return list(timeline["t"]), series


# -- plots -----------------------------------------------------------------------------------------
def _unit(top: float) -> tuple[int, str]:
    return (GIB, "GiB (2^30 bytes)") if top >= GIB else (MIB, "MiB (2^20 bytes)")


#: Points of a timeline drawn at most: a figure is about 1,300 pixels wide, and every point drawn
#: costs time (the SVG holds each one).
MAX_POINTS = 1500


def thinned(times: list[float], series: dict[str, list[int]], limit: int = MAX_POINTS):
    """At most `limit` points of a timeline: of each run of consecutive points, the one with the most
    memory in all, so the peak and the upper envelope stay (the first and last points too)."""
    if len(times) <= limit:
        return times, series
    total = np.sum([series[c] for c in series], axis=0)
    buckets = np.arange(len(times)) * limit // len(times)
    keep = pd.Series(total).groupby(buckets).idxmax().to_numpy()
    keep = np.union1d(keep, [0, len(times) - 1])
    return [times[i] for i in keep], {c: [values[i] for i in keep] for c, values in series.items()}


def step_spans(markers: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each profiled step once, from its first marker's start to its last marker's end (a step is
    marked more than once: around the whole step and around the optimizer's part)."""
    spans: dict[str, tuple[float, float]] = {}
    for mark in markers:
        if mark["name"].startswith("step:"):
            step = mark["name"][5:]
            start, end = spans.get(step, (mark["start"], mark["end"]))
            spans[step] = (min(start, mark["start"]), max(end, mark["end"]))
    return spans


def timeline_figure(timeline: dict[str, Any], title: str = "") -> Figure:
    """Memory over time stacked by category; each step marked and named once (over its middle, so no
    name runs off the plot); the parts of a step as bars at the bottom; the peak annotated."""
    times, series = thinned(*row_series(timeline))
    peak = timeline["peak"]
    scale, label = _unit(peak["total"])
    figure = Figure(figsize=(12, 5), layout="constrained")
    ax = figure.subplots()
    ax.stackplot(
        times,
        *[[v / scale for v in series[c]] for c in CATEGORIES],
        labels=[c.replace("_", " ") for c in CATEGORIES],
        colors=[COLOURS[c] for c in CATEGORIES],
        step="post",
        alpha=0.9,
    )
    top = peak["total"] / scale
    for step, (start, end) in step_spans(timeline.get("markers", [])).items():
        ax.axvline(start, color="0.2", lw=0.8, ls=":")
        ax.text((start + end) / 2, top * 1.13, step, fontsize=8, va="top", ha="center", clip_on=True)
    for mark in timeline.get("markers", []):
        if mark["name"] in PHASE_COLOURS:
            ax.axvspan(
                mark["start"], mark["end"], ymin=0, ymax=0.025, color=PHASE_COLOURS[mark["name"]], lw=0
            )
    ax.plot([peak["t"]], [top], marker="v", color="black")
    right = peak["t"] > (times[0] + times[-1]) / 2  # write the annotation away from the plot's edge
    ax.annotate(
        f"peak {top:.3g} {label.split()[0]}: {peak['phase']} ({peak['step']})",
        (peak["t"], top),
        textcoords="offset points",
        xytext=(-6 if right else 6, 4),
        ha="right" if right else "left",
        fontsize=8,
    )
    ax.set_ylim(0, top * 1.18)
    ax.set_xlabel("time since the first profiled event (s)")
    ax.set_ylabel(f"tensor memory on {timeline.get('device', 'the device')}, {label}")
    ax.set_title(title or "memory by category (torch memory profiler)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Patch(color=c, label=f"{p.replace('_', ' ')} (bar at the bottom)") for p, c in PHASE_COLOURS.items()
    ]
    ax.legend(handles=handles[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def plot_timeline(timeline: dict[str, Any], out_dir: Path, name: str, title: str = "") -> list[Path]:
    """NAME.png and NAME.svg of `timeline_figure`."""
    return save(timeline_figure(timeline, title), Path(out_dir), name)


def component_figure(table: pd.DataFrame) -> Figure | None:
    """Measured against predicted bytes per category, one panel per profiled cell (at most six)."""
    cells = list(dict.fromkeys(table["cell"]))[:6] if len(table) else []
    if not cells:
        return None
    figure = Figure(figsize=(6.4 * min(len(cells), 3), 4.4 * ((len(cells) + 2) // 3)), layout="constrained")
    axes = figure.subplots((len(cells) + 2) // 3, min(len(cells), 3), squeeze=False).ravel()
    for ax in axes[len(cells) :]:
        ax.set_visible(False)
    for ax, cell in zip(axes, cells, strict=False):
        part = table[(table["cell"] == cell) & table["category"].isin(CATEGORIES)]
        top = max(part["measured_bytes"].max(), part["predicted_bytes"].fillna(0).max(), 1)
        scale, label = _unit(top)
        x = range(len(part))
        ax.bar([i - 0.2 for i in x], part["measured_bytes"] / scale, 0.4, label="measured (profiler)")
        ax.bar([i + 0.2 for i in x], part["predicted_bytes"].fillna(0) / scale, 0.4, label="predicted")
        ax.set_xticks(list(x), [c.replace("_", "\n") for c in part["category"]], fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(cell, fontsize=8)
        ax.legend(fontsize=7)
    return figure


# -- tables ----------------------------------------------------------------------------------------
def _cell_name(row: pd.Series) -> str:
    return f"{row['model']} {describe_spec(row['spec'])} [{row['cell_id']}]"


#: A component measured under this many bytes gets no relative error (a few MiB against GiB predicted
#: would read as thousands of per cent); its bytes are still shown.
ERROR_BASE_MIN_BYTES = 64 << 20


def component_table(frame: pd.DataFrame, predict: Callable | None) -> pd.DataFrame:
    """Per profiled row and category: measured bytes at the profiled peak, predicted bytes at the
    predicted peak (COMPONENT_CATEGORY), the error in % of measured; plus the working set and total."""
    records = []
    for _, row in profiled_rows(frame).iterrows():
        measured = {c: int(row["profile_categories_bytes"].get(c, 0)) for c in CATEGORIES}
        prediction = predict_spec(predict, row["spec"]) if predict is not None else None
        predicted = predicted_categories(prediction.components) if prediction is not None else {}
        lines = [(c, measured[c], predicted.get(c)) for c in CATEGORIES]
        lines.append(
            (
                "working set",
                sum(measured[c] for c in WORKING_SET),
                sum(predicted[c] for c in WORKING_SET) if predicted else None,
            )
        )
        lines.append(
            ("total", sum(measured.values()), sum(predicted[c] for c in CATEGORIES) if predicted else None)
        )
        for category, meas, pred in lines:
            records.append(
                {
                    "cell": _cell_name(row),
                    "category": category,
                    "measured_bytes": meas,
                    "predicted_bytes": pred,
                    "measured_gib": meas / GIB,
                    "predicted_gib": None if pred is None else pred / GIB,
                    "error_pct": None
                    if pred is None or meas < ERROR_BASE_MIN_BYTES
                    else 100 * (pred - meas) / meas,
                    "measured_phase": row["profile_peak_phase"],
                    "predicted_phase": coarse_phase(prediction.peak_phase)
                    if prediction is not None
                    else None,
                    "not_profiled_predicted_bytes": predicted.get(NOT_PROFILED) if predicted else None,
                }
            )
    columns = [
        "cell",
        "category",
        "measured_bytes",
        "predicted_bytes",
        "measured_gib",
        "predicted_gib",
        "error_pct",
        "measured_phase",
        "predicted_phase",
        "not_profiled_predicted_bytes",
    ]
    return pd.DataFrame.from_records(records, columns=columns)


def overhead_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Pairs of ok rows equal in every spec field but profile_memory / snapshot, on one software stack:
    the peaks (median over repeats) with and without profiling, and the difference."""
    columns = [
        "config",
        "profiled",
        "peak_allocated_off_bytes",
        "peak_allocated_on_bytes",
        "peak_allocated_diff_bytes",
        "peak_rss_off_bytes",
        "peak_rss_on_bytes",
        "peak_rss_diff_bytes",
        "step_time_off_s",
        "step_time_on_s",
    ]
    if frame.empty or "profile_memory" not in frame.columns:
        return pd.DataFrame(columns=columns)
    ok = frame[frame["status"] == "ok"]
    keys = ok["spec"].map(lambda s: spec_key(s, drop=("profile_memory", "snapshot"))) + "|" + ok["env_stack"]
    records = []
    for _, group in ok.groupby(keys):
        flags = group["spec"].map(lambda s: (bool(s.get("profile_memory")), bool(s.get("snapshot"))))
        off = group[flags == (False, False)]
        if off.empty:
            continue
        for flag in sorted(set(flags) - {(False, False)}):
            on = group[flags == flag]

            def median(part: pd.DataFrame, column: str) -> float | None:
                values = pd.to_numeric(part[column], errors="coerce").dropna()
                return float(values.median()) if len(values) else None

            record = {
                "config": f"{on.iloc[0]['model']} {describe_spec(off.iloc[0]['spec'])}",
                "profiled": " + ".join(
                    n for n, f in zip(("profile_memory", "snapshot"), flag, strict=True) if f
                ),
            }
            for name, column in (("peak_allocated", "peak_allocated_bytes"), ("peak_rss", "peak_rss_bytes")):
                a, b = median(off, column), median(on, column)
                record.update(
                    {
                        f"{name}_off_bytes": a,
                        f"{name}_on_bytes": b,
                        f"{name}_diff_bytes": None if a is None or b is None else b - a,
                    }
                )
            record.update(
                step_time_off_s=median(off, "step_time_s"), step_time_on_s=median(on, "step_time_s")
            )
            records.append(record)
    return pd.DataFrame.from_records(records, columns=columns)


def profile_tables(frame: pd.DataFrame, predict: Callable | None) -> dict[str, pd.DataFrame]:
    """The report's profile tables; empty dict without profiled rows."""
    if profiled_rows(frame).empty:
        return {}
    return {"profile_components": component_table(frame, predict), "profile_overhead": overhead_table(frame)}


def timeline_jobs(frame: pd.DataFrame, built: dict[str, pd.DataFrame]) -> dict[str, list[PlotJob]]:
    """One timeline per profiled row whose file is found, and the component bars; {} without profiles."""
    rows = profiled_rows(frame)
    if rows.empty:
        return {}
    jobs: dict[str, list[PlotJob]] = {"profile_timelines": []}
    for _, row in rows.iterrows():
        path = timeline_path(row)
        if path is not None:
            name = f"profile_timeline_{row['cell_id']}_r{row['repeat']}"
            jobs["profile_timelines"].append(
                PlotJob(name, timeline_figure, (load_timeline(path), _cell_name(row)))
            )
    components = built.get("profile_components", pd.DataFrame(columns=["cell"]))
    has_cells = len(components) > 0
    jobs["profile_components"] = (
        [PlotJob("profile_components", component_figure, (components,))] if has_cells else []
    )
    return jobs


def write_plots(frame: pd.DataFrame, built: dict[str, pd.DataFrame], out_dir: Path) -> dict[str, list[Path]]:
    """timeline_jobs drawn into out_dir (notebooks; the report draws only what changed)."""
    return {group: run_jobs(jobs, Path(out_dir)) for group, jobs in timeline_jobs(frame, built).items()}


def index_section(built: dict[str, pd.DataFrame]) -> str:
    """index.md's section on profiled cells; empty without them."""
    if "profile_components" not in built:
        return ""
    view = built["profile_components"][
        [
            "cell",
            "category",
            "measured_gib",
            "predicted_gib",
            "error_pct",
            "measured_phase",
            "predicted_phase",
        ]
    ]
    lines = [
        "## Where the memory goes (profiled cells)",
        "",
        "Tensor bytes by category at the peak of torch's memory profiler (warm-up steps + first measured "
        "step), against the predictor's components mapped to the same categories "
        "(`analysis/timeline.py` COMPONENT_CATEGORY). The profiler counts allocations (tensors, and on CUDA "
        "cuBLAS workspaces), without allocator rounding; the split between activations, temporaries and other "
        "is where the two classify differently: compare the working set. No error where less than 64 MiB was "
        "measured. GiB = 2^30 bytes. Timelines are under Plots.",
        "",
        tables.to_markdown(view),
        "[profile_components.md](tables/profile_components.md) · [profile_components.csv](tables/profile_components.csv)",
        "",
        "What profiling costs (pairs differing only in profile_memory / snapshot):",
        "",
        tables.to_markdown(overhead_view(built["profile_overhead"]))
        if len(built["profile_overhead"])
        else "_No pairs yet: run the same cell with and without --profile-memory._",
        "",
    ]
    return "\n".join(lines)


def overhead_view(table: pd.DataFrame) -> pd.DataFrame:
    """overhead_table for reading: peaks in GiB, differences in MiB (the CSV keeps the bytes)."""
    view = table[["config", "profiled"]].copy()
    for name in ("peak_allocated", "peak_rss"):
        for side in ("off", "on"):
            view[f"{name}_{side}_gib"] = pd.to_numeric(table[f"{name}_{side}_bytes"]) / GIB
        view[f"{name}_diff_mib"] = pd.to_numeric(table[f"{name}_diff_bytes"]) / 2**20
    view["step_time_off_s"], view["step_time_on_s"] = table["step_time_off_s"], table["step_time_on_s"]
    return view.dropna(axis="columns", how="all")
