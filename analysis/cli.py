"""Subcommands of the analysis side (predict, capacity, accuracy, report, check); torch-free."""

from __future__ import annotations

import argparse
import importlib


def register(sub: argparse._SubParsersAction) -> None:
    for name in ("analysis.predict_cli", "analysis.report_cli", "analysis.check_cli"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
