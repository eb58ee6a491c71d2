"""Tables of the report, as DataFrames written to Markdown and CSV.

The guide's three tables (by method C1-C7, measured references C15-C17, by scenario C18-C20) with
measured columns beside the guide's figure; the claims table C1-C20; the savings of each memory
optimisation from pairs of rows; every measured cell; the other published predictions. Every
measured number comes from a row; GiB means 2^30 bytes, GB 10^9 bytes. Never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from analysis.claims import (
    Claim,
    ClaimResult,
    Guide,
    claim_rows,
    example_spec,
    multi_gpu_rows,
    prediction_bytes,
    predictions_text,
    savings_pairs,
)
from analysis.fits import STANDARD_CARDS, with_family
from analysis.load import describe_spec, is_present, measured_rows, predict_spec, row_ref
from bench.cards import CARD_MIB, GB, GIB, MIB

GUIDE_TABLES = {
    "method": "by fine-tuning method (C1-C7)",
    "measured": "of measured references (C15-C17)",
    "scenario": "by scenario (C18-C20)",
}
#: Check kinds whose configuration has single-GPU rows that measure it; a claim with none of them shows
#: its multi_gpu checks' rows (several GPUs, per-rank peaks), if any; qualitative ones have none.
MEASURED_KINDS = ("min_memory", "fits_budget", "memory_figure")

#: (optimisation, spec flag, value without it, value with it): pairs differing only by the flag.
SAVINGS = (
    ("gradient checkpointing", "gradient_checkpointing", False, True),
    ("attention implementation", "attn_impl", "eager", "sdpa"),
    ("attention implementation", "attn_impl", "sdpa", "flash_attention_2"),
    ("attention implementation", "attn_impl", "eager", "flash_attention_2"),
    ("attention implementation", "attn_impl", "eager", "sdpa_flash"),
    ("attention implementation", "attn_impl", "sdpa", "sdpa_flash"),
    ("torch.compile", "compile", False, True),
    ("fused cross-entropy (liger)", "fused_ce", False, True),
    (
        "8-bit optimizer",
        "optimizer",
        ["adamw", "adamw_fused", "adamw_foreach"],
        ["adamw_8bit", "paged_adamw_8bit"],
    ),
    ("fp32 upcast of k-bit models", "kbit_fp32_upcast", True, False),
)


def fmt(value: Any, digits: int = 2) -> str:
    """A cell for Markdown: '-' for missing, floats to `digits` places, the rest as text."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(value: Any, is_bytes: bool) -> str:
    """fmt, but whole numbers of bytes (floats only because the column has gaps) stay integers."""
    if is_bytes and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return fmt(value)


def to_markdown(table: pd.DataFrame, empty: str = "No rows for this table.") -> str:
    """A GitHub Markdown table (pipes in cells escaped); `empty` in italics in place of an empty table."""
    if table.empty:
        return f"_{empty}_\n"
    byte_columns = [str(c).endswith("_bytes") for c in table.columns]
    cells = [
        [
            _cell(v, is_bytes).replace("|", "\\|").replace("\n", " ")
            for v, is_bytes in zip(row, byte_columns, strict=True)
        ]
        for row in table.itertuples(index=False)
    ]
    header = [str(c).replace("|", "\\|") for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def smallest_card(footprint_bytes: Any) -> str:
    """The smallest standard card (16/24/40/48/80 GB) whose nvidia-smi total holds the footprint;
    'tight' within 5% of it."""
    if footprint_bytes is None or pd.isna(footprint_bytes):
        return "-"
    for card in STANDARD_CARDS:
        total = CARD_MIB[card] * MIB
        if footprint_bytes <= total:
            return card + (" (tight)" if footprint_bytes > 0.95 * total else "")
    return f"none (> {STANDARD_CARDS[-1]})"


def evidence_rows(frame: pd.DataFrame, guide: Guide, claim: Claim) -> pd.DataFrame:
    """Rows of a claim's configuration: the union over its memory checks' configurations; for a claim
    only about several GPUs, its multi-GPU rows (per-rank peaks); none for a claim not about memory."""
    parts = [
        claim_rows(frame, guide, claim, check) for check in claim.checks if check["kind"] in MEASURED_KINDS
    ]
    if not parts:
        parts = [
            multi_gpu_rows(claim_rows(frame, guide, claim, check), check)
            for check in claim.checks
            if check["kind"] == "multi_gpu"
        ]
    if not parts:
        return frame.iloc[0:0]
    rows = pd.concat(parts)
    return rows[~rows.index.duplicated()]


def measured_on(rows: pd.DataFrame) -> str:
    """GPUs the rows ran on, flagging budgets emulated by capping a larger GPU."""
    if rows.empty:
        return "-"
    gpus = ", ".join(sorted(str(g) for g in rows["env_gpu_name"].dropna().unique()))
    return gpus + (" (budget emulated)" if rows["budget_emulated"].any() else "")


def guide_table(
    frame: pd.DataFrame, guide: Guide, results: list[ClaimResult], table: str, predict: Callable | None = None
) -> pd.DataFrame:
    """One of the guide's tables with measured minima, the smallest card, verdict and predictions."""
    records = []
    for result in [r for r in results if r.claim.table == table]:
        rows = evidence_rows(frame, guide, result.claim)
        ok = rows[(rows["status"] == "ok") & rows["footprint_bytes"].notna()]
        record = {
            "claim": result.claim.id,
            "method": result.claim.method,
            "guide": result.claim.guide_figure,
            "rows ok/oom": f"{len(ok)}/{int((rows['status'] == 'oom').sum())}",
            "min allocated GiB": ok["peak_allocated_gib"].min(),
            "min reserved GiB": ok["peak_reserved_gib"].min(),
            "min NVML GiB": ok["nvml_peak_process_gib"].min(),
            "smallest card": smallest_card(ok["footprint_bytes"].min() if len(ok) else None),
            "verdict": result.verdict,
            "measured on": measured_on(rows[rows["status"].isin(["ok", "oom"])]),
            "other predictions": predictions_text(guide, result.claim) or "-",
        }
        if predict is not None:
            record["ftmem predicts for"] = claim_spec_text(guide, result.claim)
            record["ftmem predicted NVML GiB"] = predicted_gib(guide, result.claim, predict)
        records.append(record)
    return pd.DataFrame(records)


def predicted_gib(guide: Guide, claim: Claim, predict: Callable) -> float | None:
    """ftmem's predicted process memory (GiB) for the one spec the claim stands for."""
    spec = example_spec(guide, claim)
    prediction = predict_spec(predict, spec) if spec else None
    return None if prediction is None else prediction.nvml_process_bytes / GIB


def claims_table(results: list[ClaimResult]) -> pd.DataFrame:
    """C1-C20: the claim in our words, the guide's figure, the verdict, the deciding figure (memory in
    GiB, the guide's GB converted), the cell_id of the row(s) that decided, and the figures behind it."""
    return pd.DataFrame(
        [
            {
                "id": r.claim.id,
                "claim": r.claim.statement,
                "guide": r.claim.guide_figure,
                "verdict": r.verdict,
                "measured": r.headline or "-",
                "decided by": " ".join(r.decided_by) or "-",
                "figures": r.figures,
                "assumed": r.claim.assumes or "-",
                "rows": " ".join(r.rows) or "-",
            }
            for r in results
        ]
    )


def savings_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Each optimisation's saving (GiB and % of peak) per pair of ok rows that differ only by it."""
    parts = []
    for label, flag, base, variant in SAVINGS:
        pairs = savings_pairs(frame, flag, base, variant)
        if not pairs.empty:
            parts.append(pairs.assign(optimisation=label))
    if not parts:
        return pd.DataFrame(columns=["optimisation", "change", "config"])
    table = pd.concat(parts, ignore_index=True)
    first = ["optimisation", "change", "config"]
    return table[first + [c for c in table.columns if c not in first and c != "flag"]]


def compact_savings(table: pd.DataFrame) -> pd.DataFrame:
    """The savings table in a few columns for Markdown: saved GiB (and % of peak) per measure."""
    if table.empty or "footprint_saved_pct" not in table.columns:
        return pd.DataFrame(columns=["optimisation", "change", "config"])
    view = table[["optimisation", "change", "config"]].copy()
    for measure, title in (("allocated", "allocated"), ("reserved", "reserved"), ("nvml", "NVML process")):
        view[f"{title} saved"] = [
            "-" if pd.isna(gib) else f"{gib:.2f} GiB ({pct:.1f}%)"
            for gib, pct in zip(table[f"{measure}_saved_gib"], table[f"{measure}_saved_pct"], strict=True)
        ]
    view["rows"] = table["base_ref"] + " vs " + table["variant_ref"]
    view["GPU"] = table["env_stack"].str.split(" | ", regex=False).str[0]
    return view


def cells_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every loaded row in one line: configuration, status, GPUs, budget, peaks in GiB, where it ran.
    A multi-GPU row's peaks and budget are per GPU (the max over its ranks)."""
    return pd.DataFrame(
        [
            {
                "row": row_ref(r),
                "model": r["model"],
                "config": describe_spec(r["spec"]),
                "status": r["status"],
                "GPUs": r["gpus"] if is_present(r.get("gpus")) else 1,
                "budget": r["budget_gb"] if is_present(r["budget_gb"]) else "-",
                "allocated GiB": r["peak_allocated_gib"],
                "reserved GiB": r["peak_reserved_gib"],
                "NVML GiB": r["nvml_peak_process_gib"],
                "GPU": r["env_gpu_name"],
                "emulated": bool(r["budget_emulated"]),
                "stack": r["env_stack"],
            }
            for r in frame.to_dict("records")
        ]
    )


PREDICTED_MEASURES = (
    ("allocated", "peak_allocated_bytes", "peak_allocated_bytes"),
    ("reserved", "peak_reserved_bytes", "peak_reserved_bytes"),
    ("NVML process", "nvml_peak_process_bytes", "nvml_process_bytes"),
)


def measured_vs_predicted(frame: pd.DataFrame, predict: Callable) -> pd.DataFrame:
    """Long table: per ok row and measure, measured and predicted GiB and the error in %."""
    records = []
    ok = frame[(frame["status"] == "ok") & frame["footprint_bytes"].notna()]
    for row in ok.to_dict("records"):
        prediction = predict_spec(predict, row["spec"])
        for measure, column, attribute in PREDICTED_MEASURES if prediction is not None else ():
            measured, predicted = row[column], getattr(prediction, attribute, None)
            if is_present(measured) and predicted is not None:
                records.append(
                    {
                        "row": row_ref(row),
                        "config": describe_spec(row["spec"]),
                        "measure": measure,
                        "measured_gib": measured / GIB,
                        "predicted_gib": predicted / GIB,
                        "error_pct": 100 * (predicted - measured) / measured,
                    }
                )
    return pd.DataFrame(
        records, columns=["row", "config", "measure", "measured_gib", "predicted_gib", "error_pct"]
    )


def predictions_table(guide: Guide) -> pd.DataFrame:
    """The other published predictions: as published (GB) or computed from the estimator's formula."""
    model = guide.defaults.get("model", "qwen3-14b")
    records = []
    for pid, prediction in guide.predictions.items():
        n_bytes = prediction_bytes(prediction, model)
        records.append(
            {
                "id": pid,
                "label": prediction["label"],
                "source": prediction["source"],
                "what": prediction["what"],
                "how": "as published" if "gb" in prediction else f"computed for {model} (model states only)",
                "GB": n_bytes / GB,
                "GiB": n_bytes / GIB,
            }
        )
    return pd.DataFrame(records)


def guide_table_title(table: str) -> str:
    return f"The guide's table {GUIDE_TABLES[table]}"


def claim_spec_text(guide: Guide, claim: Claim) -> str:
    """The spec ftmem predicts for a claim, in words."""
    spec = example_spec(guide, claim)
    return describe_spec(spec) if spec else "-"


def gib_text(gib: float) -> str:
    """GiB to a tenth, or to a hundredth under 10 GiB (tiny models on CPU differ there)."""
    return f"{gib:.1f}" if gib >= 10 else f"{gib:.2f}"


def peaks_table(frame: pd.DataFrame, families: int | None = None) -> pd.DataFrame:
    """The measured peaks: per family (a model and a configuration but for seq_len, batch and budget;
    the largest `families` by rows, or all) and sequence length, a column per batch size holding the
    process peak in GiB, or "OOM > X" where the cell only ran out of memory (under a cap of X GiB)."""
    rows = with_family(measured_rows(frame))
    if rows.empty:
        return pd.DataFrame(columns=["family", "seq_len"])
    order = rows["family"].value_counts(sort=True).index[:families]
    rows = rows[rows["family"].isin(order)]
    keys = ["family", "seq_len", "batch_size"]
    ok = rows[rows["status"] == "ok"].groupby(keys)["footprint_gib"].max()
    oom = rows[rows["status"] == "oom"].groupby(keys)["cap_bytes"].max().astype("float64") / GIB
    cells = ok.map(gib_text).combine_first(oom.map(lambda gib: f"OOM > {gib_text(gib)}"))
    table = cells.unstack("batch_size").fillna("-")
    table.columns = [f"batch {b}" for b in table.columns]
    table = table.reset_index()
    table["family"] = pd.Categorical(table["family"], categories=list(order), ordered=True)
    return table.sort_values(["family", "seq_len"]).astype({"family": str}).reset_index(drop=True)


def accuracy_summary(compared: pd.DataFrame) -> pd.DataFrame:
    """How far ftmem's predictor is from the measurement, per measure: rows, the median error (its
    bias), the median, 95th percentile and largest absolute error, and the share within 3%."""
    columns = [
        "measure",
        "rows",
        "median error %",
        "median abs error %",
        "p95 abs error %",
        "max abs error %",
        "within 3%",
    ]
    if compared.empty:
        return pd.DataFrame(columns=columns)
    grouped = compared.assign(abs_error=compared["error_pct"].abs()).groupby("measure", sort=False)
    table = pd.DataFrame(
        {
            "rows": grouped.size(),
            "median error %": grouped["error_pct"].median(),
            "median abs error %": grouped["abs_error"].median(),
            "p95 abs error %": grouped["abs_error"].quantile(0.95),
            "max abs error %": grouped["abs_error"].max(),
            "within 3%": grouped["abs_error"].apply(lambda e: f"{(e <= 3).mean():.0%}"),
        }
    )
    return table.reset_index()[columns]
