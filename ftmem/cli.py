"""`ftmem`: the thin command-line entry point. Each subcommand parses, validates and calls the library;
bad input is refused with a message and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys

from bench.devices import NoCuda
from bench.model.arch import UnsupportedArchitecture
from bench.model.registry import UnknownModelError
from bench.spec import SpecError
from bench.store import ResultsError
from ftmem.args import CliError
from ftmem.commands import check, predict, report, run, sweep

#: What a command refuses with a message and exit code 2, never a traceback: bad input, a results
#: file that cannot be used, CUDA cells on a machine without CUDA, a model the predictor cannot describe.
REFUSALS: tuple[type[Exception], ...] = (SpecError, CliError, ResultsError, NoCuda, UnsupportedArchitecture, UnknownModelError)


COMMANDS = (run, sweep, predict, report, check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftmem", description="Measure and predict the GPU memory of LLM fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


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
