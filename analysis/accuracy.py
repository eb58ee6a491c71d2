"""How far the predictor is from the measured rows: relative error of peak allocated, peak reserved and the
NVML process peak, per architecture family and per configuration, and the fit / OOM verdict under each
row's budget. Imports no torch.

Rows: every results/**/*.jsonl row measured on CUDA for a model the predictor describes (bench.model.arch);
rows of other models are counted apart (`unpredictable`). Multi-GPU rows (spec gpus /
dist; older rows without them are 1 / none) are compared per rank: the prediction is one rank's, the row's
headline `peak_allocated_bytes` the max over its ranks; they form families of their own (strategy and GPU
count in the family), apart from the single-GPU families and flag lines. Errors use the `ok` rows;
verdicts use the ok and oom rows that ran under a budget. A verdict counts as correct when it matches,
and rows whose measured peak lies within 3% of the budget are reported apart as too close to call
(the prediction's own error is of that order).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.predict import CALIBRATION, CALIBRATION_CELL_IDS, fit_verdict, predict
from bench.model.arch import FAMILIES, UnsupportedArchitecture
from bench.model.registry import UnknownModelError, architecture
from bench.store import latest_rows, read_rows

CLOSE_CALL = 0.03
START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
FLAG_FAMILIES = ("optimizer", "fused_ce", "compile", "kbit_fp32_upcast")
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one results file, the last row of each (cell_id, repeat) only (bench.store)."""
    return latest_rows(read_rows(path))


@cache
def model_family(model: str) -> str | None:
    """The model_type of a model the predictor describes (a multimodal one's text model), else None.
    Cached: every row of a model asks, twice (loading and evaluating)."""
    try:
        model_type = architecture(model).get("model_type")
    except (UnknownModelError, OSError, ValueError):
        return None
    return model_type if model_type in FAMILIES else None


def load_rows(results_dir: str | Path = "results") -> list[dict[str, Any]]:
    """Every CUDA row under results_dir/**.jsonl (any status) of a model the predictor describes."""
    rows = []
    for path in sorted(Path(results_dir).glob("**/*.jsonl")):
        for row in read_jsonl(path):
            spec = row.get("spec") or {}
            if spec.get("device") == "cuda" and model_family(spec.get("model", "")):
                rows.append(row)
    return rows


def _measured_fits(row: dict[str, Any]) -> bool | None:
    """Did the cell fit its GPU budget? The harness's verdict (bench.cell.measure): it ran every step under the
    cap and NVML confirmed the process stayed within the budget; an OOM did not fit. None where the row
    cannot say (the host ran out first, an error)."""
    if row["status"] == "ok":
        return row.get("fits_budget") is not False
    if row.get("host_oom"):
        return None
    return False if row["status"] == "oom" else None


def cell_key(spec: dict[str, Any]) -> str:
    """A cell's identity without its budget: budgeted and unbudgeted runs of one cell share it."""
    return json.dumps({k: v for k, v in spec.items() if k != "budget_gb"}, sort_keys=True)


def measured_peaks(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Steady peak allocated of each cell that ran to the end, with or without a budget."""
    return {
        cell_key(r["spec"]): r["peak_allocated_bytes"]
        for r in rows
        if r["status"] == "ok" and r.get("peak_allocated_bytes")
    }


def evaluate(row: dict[str, Any], peaks: dict[str, int] | None = None) -> dict[str, Any] | None:
    """One row against its prediction: relative error (ok rows) and verdicts (rows with a budget)."""
    measured_fit = _measured_fits(row)
    if measured_fit is None:
        return None
    try:
        pred = predict(row["spec"], simulate="cached")
    except UnsupportedArchitecture:
        return None
    spec, budget = row["spec"], row.get("budget_bytes")
    out = {
        **{
            k: spec.get(k)
            for k in (
                "model",
                "method",
                "gradient_checkpointing",
                "attn_impl",
                "seq_len",
                "batch_size",
                *FLAG_FAMILIES,
            )
        },
        "family": model_family(spec.get("model", "")),
        "gpus": spec.get("gpus") or 1,
        "dist": spec.get("dist") or "none",
        "zero_offload": spec.get("zero_offload") or "none",
        "status": row["status"],
        "predicted": pred.peak_allocated_bytes,
        "measured": None,
        "rel_error": None,
        "reserved_error": None,
        "nvml_error": None,
        "budget": budget,
        "predicted_fit": None,
        "measured_fit": None,
        "close_call": None,
        "marginal": None,
        "simulated_fit": None,
        "calibration": row.get("cell_id") in CALIBRATION_CELL_IDS,
        "simulated": pred.simulated,
    }
    if row["status"] == "ok" and row.get("peak_allocated_bytes"):
        out["measured"] = row["peak_allocated_bytes"]
        out["rel_error"] = (pred.peak_allocated_bytes - out["measured"]) / out["measured"]
        out["reserved_error"] = _relative(pred.peak_reserved_bytes, row.get("peak_reserved_bytes"))
        out["nvml_error"] = _relative(pred.nvml_process_bytes, row.get("nvml_peak_process_bytes"))
    if budget:
        peak = (peaks or {}).get(cell_key(spec)) or out["measured"]
        word = fit_verdict(pred, budget)
        out.update(
            predicted_fit=word == "fits",
            marginal=word == "marginal",
            # the simulation's own outcome under the cap, as the harness judges it (NVML within the budget)
            simulated_fit=pred.simulated and pred.nvml_process_bytes <= budget,
            measured_fit=measured_fit,
            close_call=close_call(peak, pred.peak_allocated_bytes, row, budget),
        )
    return out


def _relative(predicted: int, measured: int | None) -> float | None:
    return None if not measured else (predicted - measured) / measured


def close_call(measured_peak: int | None, predicted_peak: int, row: dict[str, Any], budget: int) -> bool:
    """Peak (allocated + the context the cap leaves room for) within 3% of the budget. The measured peak
    comes from the row or from an unbudgeted run of the same cell; an OOM row without one has no full
    peak, so the predicted peak decides (reported apart, as close calls, not hidden)."""
    context = row.get("context_bytes") or CALIBRATION["cuda_context_bytes"]
    peak = (measured_peak if measured_peak is not None else predicted_peak) + context
    return abs(peak - budget) <= CLOSE_CALL * budget


def evaluations(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per usable row (see `evaluate`)."""
    peaks = measured_peaks(rows)
    evaluated = [e for e in (evaluate(row, peaks) for row in rows) if e is not None]
    return pd.DataFrame(evaluated)


def _family_stats(frame: pd.DataFrame) -> dict[str, Any]:
    """Median / p95 / max of |relative error|, the median signed error, and the verdict counts
    (clear cases, and close calls within 3% of the budget apart)."""
    err = frame["rel_error"].dropna().astype(float)
    absolute = err.abs()
    verdicts = frame[frame["budget"].notna()]
    marginal = verdicts["marginal"].astype(bool) if "marginal" in verdicts else pd.Series(False, verdicts.index)
    band = verdicts[marginal]
    verdicts, marginal_fit = verdicts[~marginal], band["measured_fit"]
    lean_right = band["simulated_fit"].eq(band["measured_fit"]) if "simulated_fit" in band else pd.Series(False, band.index)
    close = verdicts["close_call"].astype(bool)
    right = verdicts["predicted_fit"] == verdicts["measured_fit"]
    some = len(err) > 0
    reserved = _abs(frame, "reserved_error")
    nvml = _abs(frame, "nvml_error")
    return {
        "n": int(len(err)),
        "simulated": int(frame.loc[frame["rel_error"].notna(), "simulated"].sum()) if "simulated" in frame else 0,
        "median": absolute.median() if some else np.nan,
        "p95": absolute.quantile(0.95) if some else np.nan,
        "max": absolute.max() if some else np.nan,
        "bias": err.median() if some else np.nan,
        "reserved_median": reserved.median() if len(reserved) else np.nan,
        "reserved_max": reserved.max() if len(reserved) else np.nan,
        "nvml_median": nvml.median() if len(nvml) else np.nan,
        "nvml_p95": nvml.quantile(0.95) if len(nvml) else np.nan,
        "nvml_max": nvml.max() if len(nvml) else np.nan,
        "n_verdicts": int((~close).sum()),
        "verdicts_correct": int((right & ~close).sum()),
        "close_calls": int(close.sum()),
        "close_calls_correct": int((right & close).sum()),
        "marginal": int(len(marginal_fit)),
        "marginal_fit": int(marginal_fit.astype(bool).sum()),
        "marginal_simulated_right": int(lean_right.sum()),
    }


def _abs(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series(dtype=float)
    return frame[column].dropna().astype(float).abs()


def accuracy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per family: method x gradient checkpointing x attention, then one line per flag value, then all."""
    if frame.empty:
        return pd.DataFrame(
            columns=[
                "family",
                "n",
                "simulated",
                "median",
                "p95",
                "max",
                "bias",
                "reserved_median",
                "reserved_max",
                "nvml_median",
                "nvml_p95",
                "nvml_max",
                "n_verdicts",
                "verdicts_correct",
                "close_calls",
                "close_calls_correct",
                "marginal",
                "marginal_fit",
                "marginal_simulated_right",
            ]
        )
    frame = _with_dist_columns(frame)
    multi = (frame["dist"] != "none") | (frame["gpus"] > 1)
    single_rows, multi_rows = frame[~multi], frame[multi]
    lines = []
    if "family" in frame.columns:
        for family, group in single_rows.groupby("family", dropna=True):
            lines.append({"family": f"model family {family}", **_family_stats(group)})
        moe = single_rows["family"].isin(MOE_FAMILIES)
        if moe.any():
            lines.append({"family": "all mixtures of experts", **_family_stats(single_rows[moe])})
    for key, group in single_rows.groupby(["method", "gradient_checkpointing", "attn_impl"], dropna=False):
        method, gc, attn = key
        lines.append({"family": f"{method} / GC {'on' if gc else 'off'} / {attn}", **_family_stats(group)})
    keys = ["method", "gradient_checkpointing", "attn_impl", "dist", "gpus", "zero_offload"]
    for key, group in multi_rows.groupby(keys, dropna=False):
        method, gc, attn, dist, gpus, offload = key
        extra = f" + offload {offload}" if offload != "none" else ""
        family = f"{method} / GC {'on' if gc else 'off'} / {attn} / {dist} x{gpus}{extra} (per rank)"
        lines.append({"family": family, **_family_stats(group)})
    for flag in FLAG_FAMILIES:
        for value, group in single_rows.groupby(flag, dropna=True):
            lines.append({"family": f"{flag}={value}", **_family_stats(group)})
    lines.append({"family": "all", **_family_stats(frame)})
    if len(multi_rows):
        lines.append({"family": "all single-GPU", **_family_stats(single_rows)})
        lines.append({"family": "all multi-GPU (per rank, not yet calibrated)", **_family_stats(multi_rows)})
    held_out = frame[~frame["calibration"].astype(bool)]
    lines.append({"family": "all, held out (rows not used for calibration)", **_family_stats(held_out)})
    return pd.DataFrame(lines)


def _with_dist_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """gpus / dist / zero_offload columns with the single-GPU defaults where a frame or row lacks them."""
    defaults = {"gpus": 1, "dist": "none", "zero_offload": "none"}
    return frame.assign(**{k: frame[k].fillna(v) if k in frame.columns else v for k, v in defaults.items()})


def accuracy(results_dir: str | Path = "results") -> pd.DataFrame:
    """The accuracy table of every measured Qwen3 CUDA row under results_dir."""
    return accuracy_table(evaluations(load_rows(results_dir)))


def _pct(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.2f}%"


def accuracy_markdown(df: pd.DataFrame) -> str:
    """The table as Markdown: |relative error| of peak allocated (median, p95, max, signed median), of peak
    reserved (median, max) and of the NVML process peak (median, p95, max); verdicts."""
    head = (
        "| family | rows | simulated | allocated: median | p95 | max | signed | reserved: median | max | "
        "NVML: median | p95 | max | fit/OOM verdicts correct | close calls (<3%) correct | marginal: fit / "
        "simulated right |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r.family} | {r.n} | {r.simulated} | {_pct(r.median)} | {_pct(r.p95)} | {_pct(r.max)} | {_pct(r.bias)} | "
        f"{_pct(r.reserved_median)} | {_pct(r.reserved_max)} | {_pct(r.nvml_median)} | {_pct(r.nvml_p95)} | "
        f"{_pct(r.nvml_max)} | {r.verdicts_correct}/{r.n_verdicts} | {r.close_calls_correct}/{r.close_calls} | "
        f"{r.marginal}: {r.marginal_fit} / {r.marginal_simulated_right} |\n"
        for r in df.itertuples()
    )
    note = (
        "\nSimulated: rows whose prediction replays the cell's allocations through the caching allocator "
        "(analysis/predict/simulate.py); the others use the analytic slack (multi-GPU, LLM.int8, paged "
        "optimizers, compiled layers, fused cross-entropy). "
        "Relative error = (predicted - measured) / measured, of the steady-state `peak_allocated_bytes`, "
        "`peak_reserved_bytes` and `nvml_peak_process_bytes` (ok rows; multi-GPU rows per rank). Verdict: the "
        "predicted NVML process peak (allocated, the allocator's slack, the CUDA context, memory outside torch) "
        "<= the budget, against the harness's own verdict (ran under the cap and NVML stayed within the budget; "
        "an OOM did not fit). Close calls: the cell's allocated peak (measured, else predicted) plus context "
        "within 3% of the budget. Marginal: the predictor's own refusal (analysis.predict.fit_verdict): the "
        "allocated peak fits the budget and the allocator's uncapped slack does not, so whether the cell fits "
        "turns on block placement at the cap; counted apart, with how many of them fit when measured and how "
        "many the simulation under the cap called right (it runs out, or NVML passes the budget).\n"
    )
    return head + body + note


def write_readme_section(readme_path: str | Path, markdown: str) -> bool:
    """Replace the text between the accuracy markers of README.md; do nothing (False) without them."""
    path = Path(readme_path)
    if not path.exists():
        return False
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        return False
    path.write_text(
        pattern.sub(lambda _: f"{START}\n{markdown.strip()}\n{END}", text, count=1), encoding="utf-8"
    )
    return True
