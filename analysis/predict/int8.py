"""LLM.int8's outliers: the input columns bitsandbytes keeps in 16/32 bits, and how many there are.

Linear8bitLt (threshold 6, transformers' llm_int8_threshold) finds the input columns holding any value
beyond the threshold, multiplies them apart in the input's dtype, and MatMul8bitLt keeps those columns
(`subA`, tokens x outlier columns) on its ctx with the input itself until the graph is freed. How many
columns that is depends on the values: for ftmem's random weights (N(0, INIT_STD^2), unit norm weights)
each input's distribution is known. A norm's output has unit RMS per token: a value beyond 6 has odds of
2e-9, so q/k/v and gate/up inputs have none. down_proj reads act(g) * u with g and u ~ N(0, s^2), s =
INIT_STD sqrt(hidden): beyond 6 with probability p(s), and a column of T tokens holds one with
probability 1 - (1 - p)^T. Real checkpoints concentrate outliers in a few systematic features (Dettmers
et al., 2022), so for real weights this count is the random model's, not theirs.
"""

from __future__ import annotations

import math
from functools import cache

from bench.model.registry import INIT_STD

THRESHOLD = 6.0


def _act(name: str, g: float) -> float:
    if name == "silu":
        return g / (1.0 + math.exp(-g)) if g > -50 else 0.0
    # gelu (tanh approximation for gelu_pytorch_tanh; close enough for the erf form too)
    return 0.5 * g * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))


@cache
def gated_tail(act: str, s: float, steps: int = 4000) -> float:
    """P(|act(g) u| > THRESHOLD) for independent g, u ~ N(0, s^2): the trapezoid rule over g of the normal
    density times the two-sided tail of u beyond THRESHOLD / |act(g)|."""
    lo, hi = -10.0 * s, 10.0 * s
    step, total = (hi - lo) / steps, 0.0
    for k in range(steps + 1):
        g = lo + k * step
        a = abs(_act(act, g))
        tail = math.erfc(THRESHOLD / (a * s * math.sqrt(2.0))) if a > 0 else 0.0
        density = math.exp(-0.5 * (g / s) ** 2) / (s * math.sqrt(2.0 * math.pi))
        total += (0.5 if k in (0, steps) else 1.0) * density * tail
    return total * step


def outlier_columns(role: str, fan_in: int, hidden: int, act: str, tokens: int) -> int:
    """Expected input columns beyond the threshold of one int8 projection (see the module docstring)."""
    if role != "down":
        return 0
    p = gated_tail(act, INIT_STD * math.sqrt(hidden))
    return round(fan_in * (1.0 - (1.0 - p) ** tokens))
