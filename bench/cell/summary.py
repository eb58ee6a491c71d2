"""A readable summary of one row on the terminal (GiB = 2^30 bytes)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.cards import gib

_MEMORY = (
    ("context (NVML)", "context_bytes"),
    ("build peak allocated", "build_peak_allocated_bytes"),
    ("first step peak allocated", "first_step_peak_allocated_bytes"),
    ("steady peak allocated", "peak_allocated_bytes"),
    ("steady peak reserved", "peak_reserved_bytes"),
    ("NVML process peak", "nvml_peak_process_bytes"),
    ("NVML device peak", "nvml_peak_device_bytes"),
    ("CPU peak RSS", "peak_rss_bytes"),
    ("parameters", "param_bytes"),
    ("trainable parameters", "trainable_param_bytes"),
    ("gradients", "grad_bytes"),
    ("optimizer state", "optimizer_state_bytes"),
    ("budget", "budget_bytes"),
    ("OOM: requested", "oom_requested_bytes"),
    ("OOM: allocated then", "oom_allocated_bytes"),
)


def print_summary(row: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    spec = row["spec"]
    title = (
        f"{spec.get('model')} {spec.get('method')} {spec.get('precision')} seq {spec.get('seq_len')} "
        f"x batch {spec.get('batch_size')}: [bold]{row['status']}[/bold]  (cell {row['cell_id']})"
    )
    table = Table(title=title)
    table.add_column("memory")
    table.add_column("GiB (2^30 B)", justify="right")
    table.add_column("bytes", justify="right")
    for label, key in _MEMORY:
        value = row.get(key)
        if value is not None:
            table.add_row(label, f"{gib(value):.3f}", f"{value:,}")
    console.print(table)
    if row.get("step_time_s") is not None:
        console.print(
            f"step time {row['step_time_s']:.3f} s (median), {row['tokens_per_s']:.0f} tokens/s; "
            f"process start to first step {row['startup_to_first_step_s']:.1f} s"
        )
    stages = row.get("startup_breakdown_s") or {}
    if stages:
        parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f}" for name, seconds in stages.items())
        console.print(f"[dim]start-up, s: {parts}[/dim]")
    if row.get("fits_budget") is not None:
        console.print(f"fits the budget: {row['fits_budget']}")
    if row.get("error"):
        console.print(f"[red]{row['error'][:500]}[/red]")
    env = row.get("env") or {}
    console.print(
        f"[dim]{env.get('gpu_name') or 'CPU'}, torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, commit {str(env.get('git_commit'))[:10]}[/dim]"
    )
