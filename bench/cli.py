"""`ftmem`: the thin command-line entry point. Each subcommand parses, validates and calls the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

from bench.argtypes import positive_seconds
from bench.cards import gib
from bench.devices import NoCuda, require_cuda
from bench.models import ARCHITECTURES, parameter_counts
from bench.spec import CellSpec, SpecError
from bench.store import ResultsError, append_row, held


class CliError(Exception):
    """A bad command line: printed without a traceback, exit code 2."""


#: What a command refuses with a message and exit code 2, never a traceback: bad input, a results
#: file that cannot be used, CUDA cells on a machine without CUDA.
REFUSALS: tuple[type[Exception], ...] = (SpecError, CliError, ResultsError, NoCuda)


def _budget(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


_PARSERS = {int: int, float: float, str: str}
_SPECIAL = {"budget_gb": _budget, "lora_targets": _targets, "lora_alpha": float, "lora_dropout": float}


def add_spec_arguments(parser: argparse.ArgumentParser, required: tuple[str, ...] = ()) -> None:
    """One --flag per CellSpec field, with the field's help text; unset flags keep the spec default."""
    for f in dataclasses.fields(CellSpec):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f"{text} (default {default})"
            )
            continue
        kind = _SPECIAL.get(f.name) or _PARSERS.get(type(default), str)
        if f.name in ("seq_len", "batch_size"):
            kind = int
        parser.add_argument(
            flag,
            type=kind,
            default=None,
            required=f.name in required,
            help=f"{text}" + (f" (default {default})" if default is not None else ""),
        )


def spec_from_args(args: argparse.Namespace) -> CellSpec:
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(CellSpec)
        if getattr(args, f.name) is not None
    }
    return CellSpec.create(**given)


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Shipped architectures (random weights built from these configs)")
    for col in ("model", "params", "layers", "hidden", "heads (q/kv)", "vocab", "tied", "bf16 weights GiB"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name, arch in ARCHITECTURES.items():
        total = parameter_counts(arch)["total"]
        table.add_row(
            name,
            f"{total / 1e9:.3f} B" if total > 1e8 else f"{total:,}",
            str(arch["num_hidden_layers"]),
            str(arch["hidden_size"]),
            f"{arch['num_attention_heads']}/{arch['num_key_value_heads']}",
            str(arch["vocab_size"]),
            str(arch["tie_word_embeddings"]),
            f"{gib(2 * total):.2f}",
        )
    Console().print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.artifacts import beside
    from bench.report_cell import print_summary
    from bench.runner import run_cell

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftmem", description="Measure the GPU memory of LLM fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the shipped architectures").set_defaults(func=cmd_models)

    run = sub.add_parser("run", help="measure one cell in a fresh process")
    add_spec_arguments(run, required=("model", "method", "seq_len", "batch_size"))
    run.add_argument(
        "--timeout", type=positive_seconds, default=900.0, help="wall-clock limit of the cell, seconds"
    )
    run.add_argument("--out", help="also append the row to this JSONL results file")
    run.add_argument("--json", action="store_true", help="print the row as JSON instead of a summary")
    run.set_defaults(func=cmd_run)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    """Subcommands of other modules (sweep, predict, report...): each exposes register(subparsers)."""
    import importlib

    found = []
    for module in ("bench.sweep_cli", "analysis.cli"):
        try:
            found.append(importlib.import_module(module).register)
        except ModuleNotFoundError as exc:
            if exc.name not in (module, module.split(".")[0]):
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except REFUSALS as exc:
        print(f"ftmem {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
