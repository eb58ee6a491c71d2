"""Least-squares fits of peak memory against the shape of a batch, and the capacity they imply.

Within one family (every spec field equal but seq_len, batch_size and budget, on one software
stack) memory is a fixed part (weights, optimizer state, workspace) plus activations, which grow
with the tokens of a micro-batch; eager attention also materialises the (batch x heads x seq x seq)
score matrix, so its family gets a third term:

    peak = a + b * tokens (+ c * batch * seq^2 for eager attention)

The fits give a capacity frontier (the longest sequence per batch size that fits a card), shown
beside the measured boundary (the longest sequence seen to fit, the shortest seen not to).
Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.load import describe_spec, row_ref, spec_key
from bench.cards import CARD_MIB, GIB, MIB
from bench.model.registry import UnknownModelError, architecture
from bench.spec import LATER_FIELDS, at_later_default

#: The standard cards a result is placed on: 16, 24, 40, 48 and 80 GB classes (nvidia-smi totals).
STANDARD_CARDS = ("t4-16gb", "rtx4090-24gb", "a100-40gb", "l40-48gb", "h100-80gb")
MEASURES = ("footprint_bytes", "peak_allocated_bytes", "peak_reserved_bytes")
#: Spec fields that vary within a family (the fit's variables) or do not change memory's shape.
_FREE = ("seq_len", "batch_size", "budget_gb")


@dataclass(frozen=True)
class FamilyFit:
    """peak = a + b * tokens (+ c * batch * seq^2) for one family and one measure, in bytes."""

    family: str
    key: str
    spec: dict
    measure: str
    a: float
    b: float
    c: float | None
    r2: float
    n: int
    residuals: pd.Series

    def peak(self, seq_len: float, batch_size: float) -> float:
        """Predicted bytes at one shape."""
        quadratic = (self.c or 0.0) * batch_size * seq_len**2
        return self.a + self.b * batch_size * seq_len + quadratic

    def max_seq_len(self, budget_bytes: int, batch_size: int) -> int:
        """The longest sequence whose fitted peak stays within the budget (0 if none; capped at the
        model's max_position_embeddings when the fit never reaches the budget)."""
        limit = _max_positions(self.spec)
        quad, lin, const = (self.c or 0.0) * batch_size, self.b * batch_size, self.a - budget_bytes
        if const > 0:
            return 0
        roots = np.roots([quad, lin, const])  # leading zeros are dropped: linear without eager
        positive = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0]
        return int(min(min(positive), limit)) if positive else limit


def _max_positions(spec: dict) -> int:
    try:
        return int(architecture(spec["model"])["max_position_embeddings"])
    except (UnknownModelError, KeyError, FileNotFoundError):
        return 10**9


def family_key(spec: dict, env_stack: str) -> str:
    """Rows with equal keys belong to one family: same spec but for seq_len, batch and budget."""
    return spec_key(spec, drop=_FREE) + "|" + env_stack


def with_family(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with `family_key` and a readable `family` column."""
    keys = [family_key(s, e) for s, e in zip(frame["spec"], frame["env_stack"], strict=True)]
    names = [f"{s.get('model')} {describe_spec(s, shape=False)}" for s in frame["spec"]]
    return frame.assign(
        family_key=keys, family=_distinct_names(keys, names, list(frame["spec"]), list(frame["env_stack"]))
    )


def _field(spec: dict, name: str) -> str:
    """A spec value as text; a knob added later reads as its default in rows written before it."""
    value = spec.get(name)
    return str(LATER_FIELDS[name] if at_later_default(name, value) else value)


def _distinct_names(
    keys: list[str], names: list[str], specs: list[dict], stacks: list[str] | None = None
) -> list[str]:
    """Families that read alike (their specs differ in fields the short name leaves out, such as
    steps, or they ran on different software stacks) get what tells them apart appended:
    "qlora r8 bf16_mixed GC [steps 3]", "... [without cuda 13.0]"."""
    stacks = stacks or [""] * len(keys)
    first = {}
    for key, spec, stack in zip(keys, specs, stacks, strict=True):
        first.setdefault(key, (spec, stack))
    labels = {key: name for key, name in zip(keys, names, strict=True)}
    for extra in (_spec_difference, _stack_difference):
        by_label: dict[str, set[str]] = {}
        for key, label in labels.items():
            by_label.setdefault(label, set()).add(key)
        for alike in (group for group in by_label.values() if len(group) > 1):
            for key in alike:
                text = extra(key, alike, first)
                if text:
                    labels[key] += f" [{text}]"
    return [labels[key] for key in keys]


def _spec_difference(key: str, alike: set[str], first: dict) -> str:
    spec = first[key][0]
    differ = sorted(f for f in spec if f not in _FREE and len({_field(first[k][0], f) for k in alike}) > 1)
    return ", ".join(f"{f} {spec.get(f)}" for f in differ)


def _stack_difference(key: str, alike: set[str], first: dict) -> str:
    parts = {k: set(first[k][1].split(" | ")) for k in alike}
    common = set.intersection(*parts.values())
    own = sorted(parts[key] - common)
    return ", ".join(own) if own else "without " + ", ".join(sorted(set.union(*parts.values()) - common))


def fit_family(rows: pd.DataFrame, measure: str = "footprint_bytes") -> FamilyFit | None:
    """Least squares on one family's ok rows; None when the rows cannot pin the coefficients."""
    rows = rows[(rows["status"] == "ok") & rows[measure].notna()]
    spec = rows["spec"].iloc[0] if len(rows) else {}
    eager = spec.get("attn_impl") == "eager"
    seq = rows["seq_len"].to_numpy(dtype=float)
    batch = rows["batch_size"].to_numpy(dtype=float)
    columns = [np.ones_like(seq), seq * batch] + ([batch * seq**2] if eager else [])
    design = np.column_stack(columns) if len(rows) else np.empty((0, len(columns)))
    if len(rows) < len(columns) or np.linalg.matrix_rank(design) < len(columns):
        return None
    target = rows[measure].to_numpy(dtype=float)
    scale = np.abs(design).max(axis=0)
    coef = np.linalg.lstsq(design / scale, target, rcond=None)[0] / scale
    fitted = design @ coef
    spread = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - float(((target - fitted) ** 2).sum()) / spread if spread > 0 else float("nan")
    residuals = pd.Series(target - fitted, index=[row_ref(r) for r in rows.to_dict("records")])
    return FamilyFit(
        rows["family"].iloc[0],
        rows["family_key"].iloc[0],
        spec,
        measure,
        float(coef[0]),
        float(coef[1]),
        float(coef[2]) if eager else None,
        r2,
        len(rows),
        residuals,
    )


def fit_families(frame: pd.DataFrame, measures: tuple[str, ...] = MEASURES) -> list[FamilyFit]:
    """A fit per family and measure, wherever the family's rows allow one."""
    frame = with_family(frame[frame["status"] == "ok"])
    fits = []
    for _, rows in frame.groupby("family_key", sort=True):
        fits += [f for f in (fit_family(rows, m) for m in measures) if f is not None]
    return fits


def fits_table(fits: list[FamilyFit]) -> pd.DataFrame:
    """The coefficients in readable units: a in GiB, b in MiB per token, c in bytes per batch*seq^2."""
    return pd.DataFrame(
        [
            {
                "family": f.family,
                "measure": f.measure,
                "rows": f.n,
                "a_gib": f.a / GIB,
                "b_mib_per_token": f.b / MIB,
                "c_bytes_per_batch_seq2": f.c,
                "r2": f.r2,
                "max_abs_residual_gib": float(np.abs(f.residuals).max()) / GIB,
                "env_stack": f.key.split("|", 1)[1],
            }
            for f in fits
        ]
    )


def residuals_table(fits: list[FamilyFit]) -> pd.DataFrame:
    """Every fitted row's residual (measured - fitted) in GiB."""
    return pd.DataFrame(
        [
            {"family": f.family, "measure": f.measure, "row": ref, "residual_gib": value / GIB}
            for f in fits
            for ref, value in f.residuals.items()
        ]
    )


def measured_boundary(rows: pd.DataFrame, budget: int) -> tuple[int | None, int | None]:
    """(longest seq seen to fit the budget, shortest seq seen not to) among one family's rows at
    one batch size: fits = ok with footprint <= budget; not = larger footprint or an OOM under a
    cap at least as large as the budget."""
    ok = rows[(rows["status"] == "ok") & rows["footprint_bytes"].notna()]
    oom = rows[(rows["status"] == "oom") & rows["cap_bytes"].ge(budget).fillna(False).astype(bool)]
    fit_seqs = ok.loc[ok["footprint_bytes"] <= budget, "seq_len"]
    miss_seqs = pd.concat([ok.loc[ok["footprint_bytes"] > budget, "seq_len"], oom["seq_len"]])
    return (int(fit_seqs.max()) if len(fit_seqs) else None, int(miss_seqs.min()) if len(miss_seqs) else None)


def capacity_frontier(
    frame: pd.DataFrame,
    fits: list[FamilyFit],
    cards: tuple[str, ...] = STANDARD_CARDS,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
) -> pd.DataFrame:
    """Per footprint fit, card and batch size: the fit's longest sequence beside the measured one."""
    frame = with_family(frame)
    records = []
    for fit in [f for f in fits if f.measure == "footprint_bytes"]:
        family_rows = frame[frame["family_key"] == fit.key]
        for card in cards:
            budget = CARD_MIB[card] * MIB
            for batch in batch_sizes:
                seen_fit, seen_miss = measured_boundary(
                    family_rows[family_rows["batch_size"] == batch], budget
                )
                records.append(
                    {
                        "family": fit.family,
                        "card": card,
                        "batch_size": batch,
                        "fit_max_seq_len": fit.max_seq_len(budget, batch),
                        "measured_longest_fitting": seen_fit,
                        "measured_shortest_not_fitting": seen_miss,
                    }
                )
    measured = ["measured_longest_fitting", "measured_shortest_not_fitting"]
    return pd.DataFrame(
        records, columns=["family", "card", "batch_size", "fit_max_seq_len", *measured]
    ).astype({column: "Int64" for column in measured})
