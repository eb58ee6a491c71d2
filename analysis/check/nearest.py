"""The measured rows closest to a spec, from results/ through analysis.load (read only). Imports no torch.

Closeness is a weighted count of differing knobs (the model and method first), plus how far seq_len and
batch_size are apart in powers of two, so the rows listed are the measurements most like the config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.spec import CellSpec

#: Weight of a differing spec field: the knobs that move memory most weigh most.
WEIGHTS = {
    "model": 100.0,
    "method": 30.0,
    "dist": 10.0,
    "gpus": 10.0,
    "zero_offload": 8.0,
    "precision": 6.0,
    "gradient_checkpointing": 6.0,
    "optimizer": 3.0,
    "attn_impl": 2.0,
    "fused_ce": 2.0,
    "lora_r": 1.0,
    "lora_targets": 1.0,
    "quant_type": 1.0,
    "double_quant": 0.5,
    "kbit_fp32_upcast": 1.0,
    "grad_accum": 0.5,
    "compile": 1.0,
    "gc_reentrant": 0.5,
}
SHAPE_WEIGHT = 3.0
COLUMNS = (
    "cell_id",
    "model",
    "method",
    "precision",
    "seq_len",
    "batch_size",
    "gpus",
    "dist",
    "status",
    "budget_bytes",
    "peak_allocated_bytes",
    "nvml_peak_process_bytes",
)


def _value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def distance(spec: dict[str, Any], row: dict[str, Any]) -> float:
    total = sum(w for k, w in WEIGHTS.items() if _value(spec.get(k)) != _value(row.get(k)))
    for key in ("seq_len", "batch_size"):
        if row.get(key):
            total += SHAPE_WEIGHT * abs(math.log2(spec[key] / float(row[key])))
    return total


def _row(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: (None if _value(record.get(k)) is None else record.get(k)) for k in COLUMNS}
    for key in (
        "seq_len",
        "batch_size",
        "gpus",
        "budget_bytes",
        "peak_allocated_bytes",
        "nvml_peak_process_bytes",
    ):
        out[key] = None if out[key] is None else int(out[key])
    out["row"] = f"{record['source_file']}:{record['source_line']}"
    return out


def nearest_rows(
    spec: CellSpec, results: list[str | Path] | None = None, limit: int = 5
) -> list[dict[str, Any]]:
    """Up to `limit` measured rows (status ok or oom) closest to `spec`, closest first."""
    from analysis.load import load_results

    frame = load_results(results)
    if frame.empty:
        return []
    frame = frame[frame["status"].isin(["ok", "oom"])]
    target = spec.to_dict()
    records = frame.to_dict("records")
    ranked = sorted(records, key=lambda rec: (distance(target, rec), rec["source_file"], rec["source_line"]))
    return [{**_row(rec), "distance": round(distance(target, rec), 2)} for rec in ranked[:limit]]
