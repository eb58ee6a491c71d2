"""`ftmem predict | capacity | accuracy`: the predictor's subcommands, registered by ftmem.cli.

Each command's `func(args)` returns an exit code. Only `capacity --verify` touches the GPU (through
bench.cell.runner.run_cell, imported there and then); the rest is prediction: `predict` runs the cell's
step on the meta device for the allocator's simulation (torch on the CPU, no GPU), the others read
simulations already made and otherwise the analytic slack.
"""

from __future__ import annotations

import argparse
from typing import Any

from analysis.predict import Prediction, fit_verdict, nvml_uncapped, predict
from bench.cards import CARD_MIB, GIB, MIB, budget_bytes

DEFAULT_VERIFY_OUT = "results/capacity-verify.jsonl"


def _gib(n: float | int) -> str:
    return f"{n / GIB:.2f}"


def _console():
    from rich.console import Console

    return Console()


def components_table(pred: Prediction, title: str):
    """The peak's terms, then what lies outside torch's allocated figure, in GiB (2^30 bytes)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("term", no_wrap=True)
    table.add_column("GiB (2^30 B)", justify="right")
    for name, value in sorted(pred.components.items(), key=lambda kv: -kv[1]):
        table.add_row(name, _gib(value))
    rest = pred.peak_allocated_bytes - sum(pred.components.values())
    if rest:  # the terms are the walk's; a simulated peak is the replay's own
        table.add_row("replay beyond the walk's terms", _gib(rest))
    table.add_row(
        f"[bold]peak allocated ({pred.peak_phase})[/bold]", f"[bold]{_gib(pred.peak_allocated_bytes)}[/bold]"
    )
    for name, value in pred.outside_allocated.items():
        table.add_row(f"+ {name}", _gib(value))
    table.add_row("[bold]peak reserved[/bold]", f"[bold]{_gib(pred.peak_reserved_bytes)}[/bold]")
    table.add_row("[bold]nvidia-smi (process)[/bold]", f"[bold]{_gib(pred.nvml_process_bytes)}[/bold]")
    return table


def verdict_table(pred: Prediction, extra_budget: Any = None):
    """Fit verdict for every standard card (nvidia-smi total) and the --budget-gb one."""
    from rich.table import Table

    budgets = {name: mib * MIB for name, mib in CARD_MIB.items()}
    if extra_budget is not None:
        budgets = {f"--budget-gb {extra_budget}": budget_bytes(extra_budget), **budgets}
    table = Table(title="Fits? (predicted nvidia-smi process peak <= the card's total; GiB = 2^30 bytes)")
    for col in ("budget", "GiB", "verdict", "margin GiB"):
        table.add_column(col, justify="left" if col in ("budget", "verdict") else "right")
    peak = nvml_uncapped(pred)
    for name, total in budgets.items():
        margin = total - peak
        word = _verdict(pred, total, margin / total)
        if name.startswith("--budget-gb") and word.startswith("[yellow]marginal") and pred.simulated:
            # the prediction was simulated under this very cap: its outcome, as a lean, not a verdict
            word += "; simulated under this cap it " + ("fits" if pred.nvml_process_bytes <= total else "does not")
        table.add_row(name, _gib(total), word, _gib(margin))
    return table


def _verdict(pred: Prediction, budget: int, margin: float) -> str:
    """fits / OOM by the predicted NVML process peak, flagged tight within 3% of the budget (the reserved
    and NVML figures are predicted less closely than allocated); marginal where only the allocator's slack
    does not fit (analysis.predict.fit_verdict), which expandable segments save."""
    word = fit_verdict(pred, budget)
    if word == "marginal":
        return ("[yellow]marginal[/yellow] (allocated fits, the allocator's slack does not: fits or not by where "
                "its blocks lie; expandable segments make it fit)")
    tight = " [yellow](tight)[/yellow]" if abs(margin) <= 0.03 else ""
    return ("[green]fits[/green]" if word == "fits" else "[red]OOM[/red]") + tight


def cmd_predict(args: argparse.Namespace) -> int:
    from ftmem.args import spec_from_args

    spec = spec_from_args(args)
    console = _console()
    if getattr(args, "analytic", False):
        pred = predict(spec)
    else:
        with console.status("simulating the caching allocator over the cell's allocations (meta device)..."):
            pred = predict(spec, simulate=True)
    console.print(
        components_table(
            pred,
            f"Predicted memory of {spec.model} {spec.method}, seq {spec.seq_len} x batch {spec.batch_size}",
        )
    )
    console.print(verdict_table(pred, spec.budget_gb))
    for note in pred.notes:
        console.print(f"Note: {note}")
    return 0


def _capacity_base(args: argparse.Namespace) -> dict[str, Any]:
    """The spec without seq_len / batch_size (swept) and without the budget (given apart)."""
    from ftmem.args import spec_from_args

    if args.seq_len is None:
        args.seq_len = min(args.seq_lens)
    if args.batch_size is None:
        args.batch_size = min(args.batch_sizes)
    data = spec_from_args(args).to_dict()
    data.pop("budget_gb")
    return data


def _frontier_tables(cap, budget_label: str):
    from rich.table import Table

    by_batch = Table(title=f"Largest seq_len predicted to fit {budget_label}")
    by_batch.add_column("batch_size", justify="right")
    by_batch.add_column("max seq_len", justify="right")
    for b, s in cap.max_seq_by_batch.items():
        by_batch.add_row(str(b), str(s) if s else "none")
    by_seq = Table(title=f"Largest batch_size predicted to fit {budget_label}")
    by_seq.add_column("seq_len", justify="right")
    by_seq.add_column("max batch_size", justify="right")
    for s, b in cap.max_batch_by_seq.items():
        by_seq.add_row(str(s), str(b) if b else "none")
    return by_batch, by_seq


def cmd_capacity(args: argparse.Namespace) -> int:
    from analysis.capacity import capacity, frontier_cells, verify

    base, budget = _capacity_base(args), budget_bytes(args.budget_gb)
    cap = capacity(base, budget, args.seq_lens, args.batch_sizes)
    console = _console()
    for table in _frontier_tables(cap, f"{args.budget_gb} ({_gib(budget)} GiB)"):
        console.print(table)
    if not args.verify:
        return 0
    from bench.store import held

    with held(args.out):  # checked and locked before the first cell: one runner per results file
        cells = frontier_cells(base, budget, args.seq_lens, args.batch_sizes)
        results = verify(cells, _runner(args), args.seq_lens, args.batch_sizes)
    for result in results:
        point = result.point
        console.print(
            f"{point.axis} frontier at {point.fixed}: runs {[s for _, s in result.runs]}, agrees={result.agrees}"
        )
    return 0


def _runner(args: argparse.Namespace):
    """bench.cell.runner.run_cell, appending each row to --out as it comes; a cell this machine cannot
    run (no CUDA) is refused before it starts, so the first refusal comes before any row."""
    from bench.cell.runner import run_cell
    from bench.devices import require_cuda
    from bench.store import append_row

    def run(spec):
        require_cuda([spec], "--verify measures the frontier on a GPU: run it on a machine with one")
        row = run_cell(spec, timeout_s=args.timeout)
        append_row(args.out, row)
        return row

    return run


def cmd_accuracy(args: argparse.Namespace) -> int:
    from analysis.accuracy import accuracy, accuracy_markdown, write_readme_section

    table = accuracy(args.results)
    markdown = accuracy_markdown(table)
    print(markdown)
    if args.write_readme:
        written = write_readme_section(args.readme, markdown)
        print(f"{args.readme}: {'updated' if written else 'no accuracy markers, left as is'}")
    return 0


def register(subparsers) -> None:
    """Add the predict, capacity and accuracy subcommands to ftmem.cli's parser."""
    from analysis.capacity import BATCH_SIZES, SEQ_LENS
    from ftmem.args import add_spec_arguments
    from ftmem.argtypes import positive_int_list, positive_seconds

    p = subparsers.add_parser("predict", help="predict the GPU memory of one cell (no GPU needed)")
    add_spec_arguments(p, required=("model", "method", "seq_len", "batch_size"))
    p.add_argument(
        "--analytic",
        action="store_true",
        help="skip the allocator's simulation (running the step on the meta device, seconds the first time a "
        "cell is seen): reserved and NVML then come from the analytic estimate of the allocator's slack",
    )
    p.set_defaults(func=cmd_predict)

    c = subparsers.add_parser("capacity", help="largest seq_len / batch_size predicted to fit a budget")
    add_spec_arguments(c, required=("model", "method", "budget_gb"))
    c.add_argument(
        "--seq-lens", type=positive_int_list, default=SEQ_LENS, help="comma-separated grid of seq_len"
    )
    c.add_argument(
        "--batch-sizes",
        type=positive_int_list,
        default=BATCH_SIZES,
        help="comma-separated grid of batch_size",
    )
    c.add_argument("--verify", action="store_true", help="run the frontier cells on the GPU (<= 3 per point)")
    c.add_argument(
        "--out", default=DEFAULT_VERIFY_OUT, help="JSONL file the verification rows are appended to"
    )
    c.add_argument(
        "--timeout",
        type=positive_seconds,
        default=900.0,
        help="wall-clock limit of each verification cell, s",
    )
    c.set_defaults(func=cmd_capacity)

    a = subparsers.add_parser("accuracy", help="predicted vs measured peak memory of the results rows")
    a.add_argument("--results", default="results", help="folder searched for **/*.jsonl rows")
    a.add_argument("--write-readme", action="store_true", help="replace README.md's accuracy section")
    a.add_argument("--readme", default="README.md", help="README holding <!-- accuracy:start/end --> markers")
    a.set_defaults(func=cmd_accuracy)
