"""`ftmem sweep FILE`: run (or --dry-run) a sweep with a progress bar; the last line is a JSON summary."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from analysis.predict import fit_verdict, predict
from bench.cards import gib
from bench.cell.procs import terminate_as_interrupt
from bench.cell.runner import DEFAULT_TIMEOUT_S
from bench.devices import NoCuda, require_cuda
from bench.spec import FIELD_NAMES, CellSpec
from bench.store import RESUME_KEYS, ResultsError, read_rows
from bench.sweep.grid import MAX_CELLS, Sweep, SweepError, check_size, load_sweep
from bench.sweep.run import Only, Plan, Shard, make_plan, run_sweep
from ftmem.argtypes import positive_int, positive_seconds


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
        "--max-cells",
        type=positive_int,
        default=MAX_CELLS,
        help=f"refuse a sweep of more cells than this, counted before expanding them (default {MAX_CELLS:,})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        help=f"wall-clock limit per cell, s (default: the sweep's timeout_s, else {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--stop-after",
        type=positive_seconds,
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
    """analysis.predict's prediction for a dry run, "?" where it cannot answer."""
    try:
        return predict(spec.to_dict(), simulate="cached")
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


#: Columns of every plan (header, value of a spec); every other spec field that varies across the
#: cells gets a column of its own, so no two rows of the table look alike.
PLAN_COLUMNS: tuple[tuple[str, Callable[[CellSpec], str]], ...] = (
    ("model", lambda s: s.model),
    ("method", lambda s: s.method),
    ("precision", lambda s: s.precision),
    ("seq", lambda s: str(s.seq_len)),
    ("batch", lambda s: str(s.batch_size)),
    ("GC", lambda s: "on" if s.gradient_checkpointing else "off"),
    ("attn", lambda s: s.attn_impl),
    ("gpus", lambda s: "1" if s.dist == "none" else f"{s.gpus} {s.dist}"),
    ("budget", lambda s: str(s.budget_gb or "-")),
)
#: The spec fields PLAN_COLUMNS show.
_IN_PLAN_COLUMNS = frozenset(
    ("model", "method", "precision", "seq_len", "batch_size", "gradient_checkpointing")
    + ("attn_impl", "gpus", "dist", "budget_gb")
)


def varying_fields(specs: list[CellSpec]) -> list[str]:
    """Spec fields outside PLAN_COLUMNS that take two values or more among the cells, in spec order.
    None (a field that does not apply to the cell's method, bench.spec) is no value of its own: the
    method column already sets those cells apart."""
    return [
        name
        for name in FIELD_NAMES
        if name not in _IN_PLAN_COLUMNS
        and len({repr(getattr(s, name)) for s in specs if getattr(s, name) is not None}) > 1
    ]


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return ",".join(value) if isinstance(value, tuple) else str(value)


def print_plan(plan: Plan, console: Console) -> None:
    table = Table(
        title=f"sweep {plan.sweep.name}: {len(plan.todo)} to run, {len(plan.done)} done, "
        f"{len(plan.invalid)} invalid"
    )
    extra = varying_fields([cell.spec for cell, _ in plan.todo])
    headers = ["cell_id", "rep", *(h for h, _ in PLAN_COLUMNS), *extra, "claims", "pred. GiB", "fits?"]
    for col in headers:
        table.add_column(col, no_wrap=col in ("cell_id", "model"))
    warnings = []
    host_total = psutil.virtual_memory().total
    for cell, repeat in plan.todo:
        s = cell.spec
        prediction = _prediction(s)
        predicted, fits = ("?" if prediction == "?" else "-"), "-"
        if prediction != "?":
            predicted = f"{gib(prediction.peak_allocated_bytes):.1f}"
            if s.budget_bytes is not None:  # the predictor's own verdict (predicted NVML peak vs the card)
                word = fit_verdict(prediction, s.budget_bytes)
                fits = {"fits": "yes", "marginal": "[yellow]marginal[/yellow]"}.get(word, "[red]OOM?[/red]")
            warnings.append(host_memory_warning(cell, prediction, host_total))
        table.add_row(
            cell.cell_id,
            str(repeat),
            *(value(s) for _, value in PLAN_COLUMNS),
            *(_shown(getattr(s, name)) for name in extra),
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


def _refuse(console: Console, exc: Exception) -> int:
    console.print(f"[red]ftmem sweep: error:[/red] {escape(str(exc))}", highlight=False)
    return 2


def cmd_sweep(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True)  # an error is one line in a log, not cut at 80 columns
    try:
        sweep = load_sweep(args.file)
        check_size(sweep, args.max_cells)
        shard = Shard.parse(args.shard) if args.shard else None
        only = Only.parse(args.only) if args.only else None
    except (SweepError, ValueError) as exc:
        return _refuse(console, exc)
    out = args.out or str(Path("results") / f"{sweep.name}.jsonl")
    try:
        if args.dry_run:
            return dry_run(sweep, out, shard, only, args, console)
        return run(sweep, out, shard, only, args, console)
    except (ResultsError, NoCuda) as exc:
        return _refuse(console, exc)


def dry_run(
    sweep: Sweep, out: str, shard: Shard | None, only: Only | None, args: argparse.Namespace, console: Console
) -> int:
    plan = make_plan(sweep, read_rows(out, RESUME_KEYS), shard, args.retry_failed, only)
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
    try:
        require_cuda(cell.spec for cell, _ in plan.todo)
    except NoCuda as exc:
        console.print(f"[yellow]a run here would stop:[/yellow] {escape(str(exc))}", highlight=False)
    print(json.dumps(summary))
    return 0


class SweepLog:
    """What a running sweep shows: a progress bar on a terminal, and where stdout is not one (a log
    file, a pipe) a line per cell there, since rich draws no bar off a terminal."""

    def __init__(self, progress: Progress, sweep: Sweep, out: str):
        self.progress, self.sweep, self.out = progress, sweep, out
        self.task = progress.add_task(sweep.name, total=None, last="")
        self.to_log = not sys.stdout.isatty()
        self.counts: Counter[str] = Counter()
        self.already_done = 0

    def say(self, text: str) -> None:
        if self.to_log:
            print(text, flush=True)
        else:
            self.progress.console.print(text, highlight=False, markup=False)

    def on_plan(self, plan: Plan) -> None:
        """Called once the sweep is past its checks: no bar is drawn for a sweep refused before."""
        to_run = len(plan.todo) + len(plan.invalid)
        self.progress.update(self.task, total=to_run)
        self.progress.start()
        self.already_done = len(plan.done)
        if plan.done:
            self.say(f"resuming {self.out}: {len(plan.done)} cells already done, {to_run} to run")

    def on_row(self, row: dict, done: int, total: int) -> None:
        self.counts[row["status"]] += 1
        peak = row.get("peak_allocated_bytes") or row.get("peak_rss_bytes")
        shown = f"{gib(peak):.2f} GiB" if peak else "-"
        self.progress.update(
            self.task, completed=done, last=f"last: {row['cell_id']} {row['status']} peak {shown}"
        )
        if self.to_log:
            self.say(cell_line(row, done, total, shown))

    def summary(self, **extra: Any) -> str:
        """The last line printed: one JSON document for scripts."""
        done = {"already_done": self.already_done} if self.already_done else {}
        return json.dumps({"sweep": self.sweep.name, "out": self.out, **done, **self.counts, **extra})


def cell_line(row: dict, done: int, total: int, peak: str) -> str:
    """One cell's line in a log: where the sweep is, what ran, how it went."""
    spec = row.get("spec") or {}
    wall = row.get("cell_wall_time_s")
    took = f", {wall:.0f} s" if isinstance(wall, (int, float)) else ""
    return (
        f"[{done}/{total}] {row['cell_id']} {spec.get('method')} seq {spec.get('seq_len')} x batch "
        f"{spec.get('batch_size')}: {row['status']}, peak {peak}{took}"
    )


def run(
    sweep: Sweep, out: str, shard: Shard | None, only: Only | None, args: argparse.Namespace, console: Console
) -> int:
    terminate_as_interrupt()  # SIGTERM kills the running cell's processes, as Ctrl-C does
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, TimeRemainingColumn(), TextColumn("{task.fields[last]}"), console=console)
    log = SweepLog(progress, sweep, out)
    try:
        run_sweep(
            sweep,
            out,
            shard,
            args.retry_failed,
            not args.no_prune,
            args.timeout or sweep.timeout_s or DEFAULT_TIMEOUT_S,
            on_plan=log.on_plan,
            on_row=log.on_row,
            stop_after_s=args.stop_after,
            preload=args.preload,
            only=only,
        )
    except KeyboardInterrupt as exc:
        progress.stop()
        console.print(f"[yellow]ftmem sweep: interrupted ({exc or 'Ctrl-C'}); run again to resume[/yellow]")
        print(log.summary(interrupted=True))
        return 130
    finally:
        progress.stop()
    task = progress.tasks[0]
    left = task.total - task.completed if task.total else 0
    print(log.summary(**({"not_started": left} if left else {})))
    return 0
