"""`ftmem sweep FILE`: run (or --dry-run) a sweep with a progress bar; the last line is a JSON summary."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.cards import gib
from bench.procs import terminate_as_interrupt
from bench.runner import DEFAULT_TIMEOUT_S
from bench.store import ResultsLocked, read_rows
from bench.sweep import SweepError, load_sweep
from bench.sweep_run import Only, Plan, Shard, make_plan, run_sweep


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sweep", help="run every cell of a sweep file, resuming where it stopped")
    parser.add_argument("file", help="sweep YAML file (sweeps/*.yaml)")
    parser.add_argument("--out", help="results JSONL file (default results/<sweep name>.jsonl)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and counts; run nothing")
    parser.add_argument("--retry-failed", action="store_true", help="run error and timeout cells again")
    parser.add_argument("--no-prune", action="store_true", help="run cells that a smaller OOM cell implies")
    parser.add_argument("--shard", help="i/n: run only this machine's share of the cells")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only cells whose spec has this value (repeatable: keys AND, values of one key OR), "
        "e.g. --only zero_offload=none --only method=lora",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help=f"wall-clock limit per cell, s (default: the sweep's timeout_s, else {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--stop-after",
        type=float,
        metavar="SECONDS",
        help="start no cell after this many seconds (a rented machine's time limit); run again to resume",
    )
    parser.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fork each cell from a server that imported torch and transformers once (default; measured "
        "the same as fresh cells, seconds faster); --no-preload starts a fresh interpreter per cell",
    )
    parser.set_defaults(func=cmd_sweep)


def _prediction(spec) -> Any:
    """analysis.predict's prediction for a dry run: None without the analysis package, "?" on failure."""
    try:
        from analysis.predict import predict
    except ImportError:
        return None
    try:
        return predict(spec.to_dict())
    except Exception:  # a prediction is a hint in a dry run, never a failure
        return "?"


#: Warn in a dry run when ZeRO-Offload's predicted host state alone passes this share of host memory:
#: the prediction is a lower bound (libraries, CUDA's pinned staging and the build come on top).
HOST_WARN_SHARE = 0.8


def host_memory_warning(cell, prediction: Any, host_total: int) -> str | None:
    """A dry-run warning for a cell whose CPU offload may not fit in this host's memory."""
    host = prediction.outside_allocated.get("host_bytes", 0)
    need = host * cell.spec.gpus
    if not host or need <= HOST_WARN_SHARE * host_total:
        return None
    return (
        f"[yellow]host memory[/yellow] {cell.cell_id}: {cell.spec.dist} offload {cell.spec.zero_offload} keeps "
        f"about {gib(host):.1f} GiB per rank x {cell.spec.gpus} = {gib(need):.1f} GiB in host memory (state "
        f"alone, a lower bound) against this host's {gib(host_total):.1f} GiB: it may run out of host memory"
    )


def plan_console() -> Console:
    """stdout; when it is not a terminal (a log file, a pipe) wide enough that the plan's columns are
    not cut to a few letters (rich's default there is 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_plan(plan: Plan, console: Console) -> None:
    table = Table(
        title=f"sweep {plan.sweep.name}: {len(plan.todo)} to run, {len(plan.done)} done, "
        f"{len(plan.invalid)} invalid"
    )
    for col in (
        "cell_id",
        "rep",
        "method",
        "precision",
        "seq",
        "batch",
        "GC",
        "attn",
        "gpus",
        "budget",
        "claims",
        "pred. GiB",
        "fits?",
    ):
        table.add_column(col)
    warnings = []
    host_total = psutil.virtual_memory().total
    for cell, repeat in plan.todo:
        s = cell.spec
        prediction = _prediction(s)
        predicted, fits = ("?" if prediction == "?" else "-"), "-"
        if prediction not in (None, "?"):
            predicted = f"{gib(prediction.peak_allocated_bytes):.1f}"
            if s.budget_bytes is not None:
                fits = "yes" if prediction.peak_allocated_bytes <= s.budget_bytes else "[red]OOM?[/red]"
            warnings.append(host_memory_warning(cell, prediction, host_total))
        table.add_row(
            cell.cell_id,
            str(repeat),
            s.method,
            s.precision,
            str(s.seq_len),
            str(s.batch_size),
            "on" if s.gradient_checkpointing else "off",
            s.attn_impl,
            "1" if s.dist == "none" else f"{s.gpus} {s.dist}",
            str(s.budget_gb or "-"),
            ",".join(cell.claims),
            predicted,
            fits,
        )
    console.print(table)
    for warning in filter(None, warnings):
        console.print(warning)
    for cell, _ in plan.invalid:
        console.print(f"[yellow]invalid[/yellow] {cell.cell_id}: {cell.invalid_reason}")


def time_estimate(plan: Plan) -> float | None:
    """Seconds the cells still to run would take at the median wall time of those already done
    (ok or oom rows with a wall time); None without such rows."""
    walls = [
        r["cell_wall_time_s"]
        for r in plan.done.values()
        if r.get("status") in ("ok", "oom") and isinstance(r.get("cell_wall_time_s"), (int, float))
    ]
    if not walls or not plan.todo:
        return None
    return len(plan.todo) * statistics.median(walls)


def cmd_sweep(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        sweep = load_sweep(args.file)
        shard = Shard.parse(args.shard) if args.shard else None
        only = Only.parse(args.only) if args.only else None
    except (SweepError, ValueError) as exc:
        console.print(f"[red]ftmem sweep: error:[/red] {exc}")
        return 2
    out = args.out or str(Path("results") / f"{sweep.name}.jsonl")
    if args.dry_run:
        plan = make_plan(sweep, read_rows(out), shard, args.retry_failed, only)
        print_plan(plan, plan_console())
        summary = {
            "sweep": sweep.name,
            "to_run": len(plan.todo),
            "done": len(plan.done),
            "invalid": len(plan.invalid),
        }
        estimate = time_estimate(plan)
        if estimate is not None:
            console.print(
                f"about {estimate / 60:.0f} min for the {len(plan.todo)} cells to run, at the median wall time "
                "of the cells already in the results file (OOM pruning may skip some)"
            )
            summary["estimated_s"] = round(estimate)
        print(json.dumps(summary))
        return 0
    if args.timeout is not None and args.timeout <= 0:
        console.print(f"[red]ftmem sweep: error:[/red] --timeout must be > 0 seconds, got {args.timeout:g}")
        return 2
    if args.stop_after is not None and args.stop_after <= 0:
        console.print(
            f"[red]ftmem sweep: error:[/red] --stop-after must be > 0 seconds, got {args.stop_after:g}"
        )
        return 2
    terminate_as_interrupt()  # SIGTERM kills the running cell's processes, as Ctrl-C does
    counts: Counter[str] = Counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
    ) as progress:
        task = progress.add_task(sweep.name, total=None, last="")

        def on_plan(plan: Plan) -> None:
            progress.update(task, total=len(plan.todo) + len(plan.invalid))

        def on_row(row: dict, done: int, total: int) -> None:
            counts[row["status"]] += 1
            peak = row.get("peak_allocated_bytes") or row.get("peak_rss_bytes")
            shown = f"{gib(peak):.2f} GiB" if peak else "-"
            progress.update(task, completed=done, last=f"last: {row['cell_id']} {row['status']} peak {shown}")

        try:
            run_sweep(
                sweep,
                out,
                shard,
                args.retry_failed,
                not args.no_prune,
                args.timeout or sweep.timeout_s or DEFAULT_TIMEOUT_S,
                on_plan=on_plan,
                on_row=on_row,
                stop_after_s=args.stop_after,
                preload=args.preload,
                only=only,
            )
        except ResultsLocked as exc:
            console.print(f"[red]ftmem sweep: error:[/red] {exc}")
            return 2
        except KeyboardInterrupt as exc:
            console.print(
                f"[yellow]ftmem sweep: interrupted ({exc or 'Ctrl-C'}); run again to resume[/yellow]"
            )
            print(json.dumps({"sweep": sweep.name, "out": out, **counts, "interrupted": True}))
            return 130
    left = progress.tasks[0].total - progress.tasks[0].completed if progress.tasks[0].total else 0
    summary = {"sweep": sweep.name, "out": out, **counts}
    if left:
        summary["not_started"] = left
    print(json.dumps(summary))
    return 0
