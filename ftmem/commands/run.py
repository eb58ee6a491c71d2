"""`ftmem models` and `ftmem run`: the shipped models, and one cell measured in a process of its own."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from bench.cards import gib
from bench.devices import require_cuda
from bench.model.registry import ARCHITECTURES, description
from bench.store import append_row, held
from ftmem.args import add_spec_arguments, positive_seconds, spec_from_args


def cmd_models(args: argparse.Namespace) -> int:
    """The shipped models, by family: short name, hub id, size, and the widths memory depends on."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Shipped models: random weights built from these configs (GiB = 2^30 bytes)")
    columns = ("model", "hub id", "family", "params", "layers", "hidden", "heads q/kv", "experts", "bf16 GiB")
    for col in columns:
        table.add_column(col, justify="left" if col in columns[:3] else "right", no_wrap=col == "model")
    for name, config in sorted(ARCHITECTURES.items(), key=lambda item: (description(item[0]).model_type, item[0])):
        a = description(name)
        table.add_row(
            name,
            config.get("_name_or_path", "-"),
            a.model_type + (" (text)" if a.multimodal else ""),
            f"{a.total_params / 1e9:.2f} B" if a.total_params > 1e8 else f"{a.total_params:,}",
            str(a.layers),
            str(a.hidden),
            f"{a.heads}/{a.kv_heads}",
            f"{a.moe.experts} (top {a.moe.top_k})" if a.moe else "-",
            f"{gib(2 * a.total_params):.2f}",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print("Also: a folder holding a config.json (weights optional), or a hub id in the local HF cache. "
          "docs/models.md says which families the predictor describes.")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.cell.artifacts import beside
    from bench.cell.runner import run_cell
    from bench.cell.summary import print_summary

    spec = spec_from_args(args)
    require_cuda([spec])
    # --out is checked and locked before the cell runs, so a measurement is never made in vain.
    with held(args.out) if args.out else contextlib.nullcontext():
        row = run_cell(spec, timeout_s=args.timeout, artifacts_dir=beside(args.out) if args.out else None)
        if args.out:
            append_row(args.out, row)
    if args.json:
        print(json.dumps(row))
    else:
        print_summary(row)
        print(json.dumps({"cell_id": row["cell_id"], "status": row["status"]}))
    return 0 if row["status"] in ("ok", "oom") else 1


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list the shipped models (short names, hub ids, sizes)").set_defaults(
        func=cmd_models
    )
    run = sub.add_parser("run", help="measure one cell in a process of its own")
    add_spec_arguments(run, required=("model", "method", "seq_len", "batch_size"))
    run.add_argument(
        "--timeout", type=positive_seconds, default=900.0, help="wall-clock limit of the cell, seconds"
    )
    run.add_argument("--out", help="also append the row to this JSONL results file")
    run.add_argument("--json", action="store_true", help="print the row as JSON instead of a summary")
    run.set_defaults(func=cmd_run)
