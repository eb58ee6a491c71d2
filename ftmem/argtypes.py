"""argparse types for the CLI's own flags: a bad value is argparse's clean exit 2, naming the flag.

Spec fields are checked by bench.spec; these are the flags that are not spec fields (timeouts,
grids of seq_len / batch_size), so that no one flag accepts what another refuses.
"""

from __future__ import annotations

import argparse
import math


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0 (--timeout, --stop-after)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; seconds, a finite number > 0")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (--max-cells)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; an integer >= 1")
    return value


def positive_int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1, at least one (--seq-lens 512,1024)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = tuple(int(item) for item in items)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed; comma-separated integers >= 1, e.g. 512,1024"
        )
    return values
