"""Named GPU cards and the memory budget a cell is capped at.

A named card means the total memory that `nvidia-smi` reports on the real card, in MiB (2^20
bytes), not a round number of decimal gigabytes: an RTX 4090 reports 24564 MiB = 25.76 x 10^9
bytes, 1.6 GiB more than "24 GB" read as 24 x 10^9 bytes. That difference is enough to flip a
verdict, so sweeps name cards; a bare number is read as decimal gigabytes (10^9 bytes).
"""

from __future__ import annotations

MIB = 2**20
GIB = 2**30
GB = 10**9

#: Card name -> total memory in MiB as nvidia-smi shows it (memory.total).
CARD_MIB: dict[str, int] = {
    "rtx3060-12gb": 12288,
    "t4-16gb": 15360,
    "rtx4090-24gb": 24564,
    "a10-24gb": 24564,
    "a100-40gb": 40536,
    "l40-48gb": 46068,
    "l40s-48gb": 46068,
    "a100-80gb": 81920,
    "h100-80gb": 81559,
    "h200-141gb": 143771,
}


#: Largest budget taken as a number, per GPU: past any card made, and inf or 1e400 are refused.
MAX_BUDGET_GB = 1000
#: What a budget may be, for error messages.
BUDGET_ALLOWED = f"a number of GB (10^9 bytes) > 0 and <= {MAX_BUDGET_GB}, or a card: {', '.join(CARD_MIB)}"


def budget_bytes(budget: float | int | str | None) -> int | None:
    """Bytes of a budget: a card name (nvidia-smi total) or a number of decimal GB (10^9 bytes)."""
    if budget is None:
        return None
    if isinstance(budget, str):
        if budget not in CARD_MIB:
            raise ValueError(f"budget_gb: {budget!r} is not a known card; allowed: {BUDGET_ALLOWED}")
        return CARD_MIB[budget] * MIB
    # `not 0 < budget <= MAX` also refuses NaN; inf would overflow int() below.
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= MAX_BUDGET_GB:
        raise ValueError(f"budget_gb: {budget!r} is not allowed; {BUDGET_ALLOWED}")
    return int(budget * GB)


def gib(n_bytes: float | int | None) -> float | None:
    """Bytes shown as GiB (2^30 bytes), for display only."""
    return None if n_bytes is None else n_bytes / GIB
