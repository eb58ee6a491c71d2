"""The command line's building blocks: CliError, one --flag per spec field, and argument types that
refuse a bad value naming the flag."""

from __future__ import annotations

import argparse
import dataclasses

from bench.spec import CellSpec
from ftmem.argtypes import positive_int, positive_int_list, positive_seconds  # noqa: F401  (re-exported for commands)


class CliError(Exception):
    """A bad command line: printed without a traceback, exit code 2."""


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
