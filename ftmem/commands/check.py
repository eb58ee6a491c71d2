"""`ftmem check CONFIG`: will a LLaMA-Factory / axolotl / TRL / HF TrainingArguments config fit?

Registered by analysis.cli like the predictor's commands. Reading, mapping and judging live in
analysis.check (torch-free); this module parses the command line, prints, and for `--verify` runs the
cell on the local GPU through bench.cell.runner.run_cell, imported only then. Bad input exits 2 with one
line naming the file, the key and the value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from analysis.check import CheckResult, ConfigError, check, prediction_dict
from analysis.check.advice import Card, card, default_cards
from analysis.check.formats import FORMATS
from bench.cards import CARD_MIB, GIB
from bench.spec import CellSpec

#: Spec fields left at their defaults that say nothing about the config (run mechanics).
QUIET_FIELDS = (
    "warmup_steps",
    "steps",
    "seed",
    "device",
    "profile_memory",
    "snapshot",
    "budget_gb",
    "expandable_segments",
)


class CheckError(Exception):
    """A bad command line or an answer refused: printed as one line, exit code 2."""


def _gib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _cards(names: list[str] | None) -> list[Card]:
    """The cards named (bench/cards.py names or decimal GB), else the common ones and the local GPU."""
    if names:
        try:
            return [card(n) for n in names]
        except ValueError:
            bad = next(n for n in names if _bad_card(n))
            raise CheckError(
                f"--card: {bad!r} is not a card; allowed: a number of GB (10^9 bytes) or "
                f"{', '.join(CARD_MIB)}"
            ) from None
    return default_cards() + _local_gpu()


def _bad_card(name: str) -> bool:
    try:
        card(name)
        return False
    except ValueError:
        return True


def _local_gpu() -> list[Card]:
    """The GPU this process would use, as NVML reports it (no torch import); none where there is none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return []
    from bench.cell import nvml

    info = nvml.device_info()
    return [Card(f"local: {info['name']}", info["total_bytes"])] if info else []


def run_flags(spec: CellSpec) -> str:
    """The `ftmem run` command line of a spec: every field away from its default."""
    defaults = {name: f.default for name, f in CellSpec.__dataclass_fields__.items()}
    parts = ["ftmem run"]
    for name, value in spec.to_dict().items():
        default = defaults[name]
        if value is None or value == default or (isinstance(default, tuple) and tuple(value) == default):
            if name not in ("model", "method", "seq_len", "batch_size"):
                continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------------------
def _table(title: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]], right: tuple[str, ...] = ()):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*[str(v) for v in row])
    return table


def _spec_table(result: CheckResult):
    spec = result.spec.to_dict()
    rows = [
        (k, ",".join(v) if isinstance(v, list) else v, result.sources.get(k, "ftmem default"))
        for k, v in spec.items()
        if v is not None and k not in QUIET_FIELDS
    ]
    return _table("Assumed spec (the cell ftmem predicts)", ("field", "value", "from"), rows)


def _verdict_table(result: CheckResult):
    rows = [
        (
            v.card,
            _gib(v.total_bytes),
            _gib(v.predicted_bytes),
            _gib(v.headroom_bytes),
            v.verdict + (" (tight)" if v.tight else ""),
            v.note,
        )
        for v in result.verdicts
    ]
    return _table(
        "Fits? predicted NVML process peak against the card's nvidia-smi total (GiB = 2^30 bytes)",
        ("card", "total GiB", "predicted GiB", "headroom GiB", "verdict", "note"),
        rows,
        ("total GiB", "predicted GiB", "headroom GiB"),
    )


def _unmodelled_table(result: CheckResult):
    rows = [(f"{os.path.basename(u.file)}: {u.key}", u.value, u.effect, u.why) for u in result.unmodelled]
    return _table(
        "Keys that change memory and ftmem does not model (effect: lower = the prediction is an upper "
        "bound, higher = a lower bound)",
        ("key", "value", "effect", "why"),
        rows,
    )


def _prediction_table(result: CheckResult):
    """The peak's terms with their share of it, then what lies outside torch's allocated figure."""
    pred = result.prediction
    peak = pred.peak_allocated_bytes
    rows = [
        (name, _gib(value), f"{100 * value / peak:.1f}%")
        for name, value in sorted(pred.components.items(), key=lambda kv: -kv[1])
    ]
    rows.append((f"peak allocated ({pred.peak_phase})", _gib(peak), "100%"))
    rows += [(f"+ {name}", _gib(value), "") for name, value in pred.outside_allocated.items()]
    rows += [
        ("peak reserved", _gib(pred.peak_reserved_bytes), ""),
        ("NVML process peak (nvidia-smi)", _gib(pred.nvml_process_bytes), ""),
    ]
    return _table(
        f"Predicted memory per GPU ({result.spec.gpus} GPU{'s' if result.spec.gpus > 1 else ''})",
        ("term", "GiB", "of peak"),
        rows,
        ("GiB", "of peak"),
    )


def _suggestion_table(result: CheckResult):
    rows = [(s.card, s.change, _gib(s.predicted_bytes), _gib(s.headroom_bytes)) for s in result.suggestions]
    return _table(
        "To fit, cheapest change first (each re-predicted)",
        ("card", "change", "predicted GiB", "headroom GiB"),
        rows,
        ("predicted GiB", "headroom GiB"),
    )


#: Columns of the closest measured rows: header, and how to show a row's value.
NEAREST = (
    ("cell_id", lambda r: r["cell_id"]),
    ("model", lambda r: r["model"]),
    ("method", lambda r: r["method"]),
    ("precision", lambda r: r["precision"]),
    ("seq", lambda r: r["seq_len"]),
    ("batch", lambda r: r["batch_size"]),
    ("gpus", lambda r: f"{r['gpus']} {r['dist']}"),
    ("budget GiB", lambda r: _gib(r["budget_bytes"])),
    ("status", lambda r: r["status"]),
    ("allocated GiB", lambda r: _gib(r["peak_allocated_bytes"])),
    ("NVML GiB", lambda r: _gib(r["nvml_peak_process_bytes"])),
    ("row (file:line)", lambda r: os.path.basename(r["row"])),
)


def _nearest_table(result: CheckResult):
    rows = [tuple(show(r) for _, show in NEAREST) for r in result.nearest]
    return _table(
        "Closest measured rows (results/, --json for their paths; budget: the cap it ran under, - for the whole GPU)",
        tuple(name for name, _ in NEAREST),
        rows,
        ("budget GiB", "allocated GiB", "NVML GiB"),
    )


def print_result(result: CheckResult) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]ftmem check[/bold]: {', '.join(result.files)} read as {result.tool}")
    console.print(_spec_table(result))
    console.print(run_flags(result.spec), soft_wrap=True)
    console.print(_prediction_table(result))
    console.print(_verdict_table(result))
    if result.unmodelled:
        console.print(_unmodelled_table(result))
    for title, items in (
        ("Keys ftmem does not know (check they do not change memory)", result.unrecognised),
        ("Assumed", result.assumptions),
    ):
        if items:
            console.print(f"[bold]{title}[/bold]")
            for item in items:
                console.print(f"  - {item}", highlight=False)
    if result.suggestions:
        console.print(_suggestion_table(result))
    elif any(v.predicted_bytes > v.total_bytes for v in result.verdicts):
        console.print("No change ftmem models makes it fit the cards it does not fit.")
    if result.nearest:
        console.print(_nearest_table(result))


# ------------------------------------------------------------------------------------------------
# --verify: the cell on the local GPU
# ------------------------------------------------------------------------------------------------
def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def verify(spec: CellSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Run the spec for a few real steps (bench.cell.runner.run_cell, as `ftmem run`); --out appends the row."""
    devices = _cuda_devices()
    if devices == 0:
        raise CheckError("--verify runs the cell on this machine's GPU, and torch sees no CUDA device here")
    if spec.gpus > devices:
        raise CheckError(
            f"--verify: the cell needs {spec.gpus} GPUs and torch sees {devices}; pass --gpus {devices}"
        )
    from bench.cell.artifacts import beside
    from bench.cell.runner import run_cell

    row = run_cell(spec, timeout_s=args.timeout, artifacts_dir=beside(args.out) if args.out else None)
    if args.out:
        from bench.store import append_row

        append_row(args.out, row)
    return row


def comparison(result: CheckResult, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Predicted against measured, per figure, with the relative error where both exist."""
    pred = prediction_dict(result.prediction)
    out = []
    for label, ours, theirs in (
        ("peak allocated", "peak_allocated_bytes", "peak_allocated_bytes"),
        ("peak reserved", "peak_reserved_bytes", "peak_reserved_bytes"),
        ("NVML process peak", "nvml_process_bytes", "nvml_peak_process_bytes"),
    ):
        measured = row.get(theirs)
        error = None if not measured else (pred[ours] - measured) / measured
        out.append(
            {"figure": label, "predicted_bytes": pred[ours], "measured_bytes": measured, "error": error}
        )
    return out


def _print_verify(result: CheckResult, row: dict[str, Any]) -> None:
    from rich.console import Console

    rows = [
        (
            c["figure"],
            _gib(c["predicted_bytes"]),
            _gib(c["measured_bytes"]),
            "-" if c["error"] is None else f"{100 * c['error']:+.2f}%",
        )
        for c in comparison(result, row)
    ]
    title = f"--verify: cell {row.get('cell_id')} ran {row.get('status')} on this GPU"
    Console().print(
        _table(
            title,
            ("figure", "predicted GiB", "measured GiB", "error"),
            rows,
            ("predicted GiB", "measured GiB", "error"),
        )
    )
    if row.get("status") != "ok":
        Console().print(f"status {row.get('status')}: {row.get('error') or row.get('oom_message') or ''}")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> tuple[CheckResult, dict[str, Any] | None]:
    if args.out and not args.verify:
        raise CheckError("--out appends the --verify row; pass --verify too")
    cards = _cards(args.card)
    result = check(
        args.config,
        deepspeed=args.deepspeed,
        accelerate=args.accelerate_config,
        gpus=args.gpus,
        cards=cards,
        fmt=args.format,
        model=args.model,
        seq_len=args.seq_len,
        results=args.results,
        nearest=not args.no_measured,
    )
    return result, verify(result.spec, args) if args.verify else None


def cmd_check(args: argparse.Namespace) -> int:
    try:
        result, row = _run(args)
    except (ConfigError, CheckError) as exc:
        print(f"ftmem check: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = result.to_json()
        if row is not None:
            out["verify"] = {
                "cell_id": row.get("cell_id"),
                "status": row.get("status"),
                "comparison": comparison(result, row),
            }
        print(json.dumps(out, indent=1, default=str))
    else:
        print_result(result)
        if row is not None:
            _print_verify(result, row)
    return 1 if row is not None and row.get("status") != "ok" else 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be an integer >= 1")
    return number


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="will a LLaMA-Factory / axolotl / TRL / HF TrainingArguments config fit? (no GPU needed)",
    )
    p.add_argument("config", help="the training config (YAML or JSON), recognised by its keys")
    p.add_argument(
        "--deepspeed", help="DeepSpeed JSON beside the config (wins over the config's deepspeed key)"
    )
    p.add_argument(
        "--accelerate-config",
        help="accelerate config (accelerate launch --config_file): processes, "
        "DeepSpeed or FSDP, mixed precision",
    )
    p.add_argument(
        "--gpus", type=_positive, help="GPUs of the run (default: accelerate num_processes, else 1)"
    )
    p.add_argument(
        "--card",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="cards to judge against: names of "
        "bench/cards.py or decimal GB (default: 16/24/40/48/80 GB cards and the local GPU)",
    )
    p.add_argument("--format", choices=FORMATS, help="the config's tool, when its keys do not say")
    p.add_argument(
        "--model", help="the model, where the config names none (HF TrainingArguments) or to override"
    )
    p.add_argument(
        "--seq-len", type=_positive, help="the sequence length, where the config has none or to override"
    )
    p.add_argument(
        "--results",
        action="append",
        help="results files or folders for the closest measured rows (default: results/)",
    )
    p.add_argument("--no-measured", action="store_true", help="skip the closest measured rows")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes raw)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the cell for a few real steps on the local GPU "
        "(as ftmem run) and print predicted against measured",
    )
    p.add_argument("--out", help="with --verify: append the measured row to this JSONL results file")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="with --verify: wall-clock limit of the cell, s"
    )
    p.set_defaults(func=cmd_check)
