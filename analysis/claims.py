"""The guide's claims (claims.yaml) judged against measured rows.

Each claim implies a configuration (filters on spec columns) and asserts something about memory;
a verdict comes only from rows: supported, refuted, marginal (within 5% of the budget), not
measured (no row answers it yet) or not measurable (not a memory claim). Every verdict carries
the figures behind it: which rows, the measured GiB, the budget GiB, and whether the budget was
emulated by capping a larger GPU. Never imports torch.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.load import describe_spec, is_present, row_ref, spec_key
from bench.cards import CARD_MIB, GB, GIB, MIB
from bench.model.registry import architecture, linear_shapes, parameter_counts
from bench.spec import CellSpec, SpecError

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
VERDICTS = (
    "supported",
    "supported in part",
    "marginal",
    "mixed",
    "refuted",
    "not measured",
    "not measurable",
)
#: What each verdict means, for the report's legend.
VERDICT_MEANINGS = {
    "supported": "the measurements agree with the claim by more than the margin",
    "supported in part": "every measured part holds; some part has no rows yet",
    "marginal": "too close to call: within 5% of the card, or within 2 points of the stated saving",
    "mixed": "the claim names alternatives (ZeRO stage 2 or 3), each judged apart, and they disagree",
    "refuted": "the measurements contradict the claim by more than the margin",
    "not measured": "no row answers it yet",
    "not measurable": "not a claim about memory",
}
#: A footprint within this fraction of a budget (either side) is marginal, not a clear fit or miss.
MARGIN = 0.05
#: A saving within this many percentage points of an edge of the claimed range, on either side, is
#: marginal: one rule for "saves 30-40%" and "saves something" (a 0.0% and a -0.3% saving alike).
SAVING_MARGIN_PCT = 2.0
#: Fields that change with a flag (None when it is off), so a pair may differ in them too.
DEPENDENT = {"gradient_checkpointing": ("gc_reentrant",)}
TUPLE_COLUMNS = ("lora_targets",)
_RANK = {"refuted": 0, "marginal": 1, "supported": 2}
#: Spec fields of multi-GPU cells; the spec of a 1-GPU baseline differs from its multi-GPU cell in these.
MULTI_GPU_FIELDS = ("gpus", "dist", "zero_offload")


@dataclass(frozen=True)
class Claim:
    """One claim of the guide, as claims.yaml states it."""

    id: str
    table: str
    method: str
    guide_figure: str
    statement: str
    config: dict[str, Any]
    checks: tuple[dict[str, Any], ...]
    others: tuple[str, ...] = ()
    example: dict[str, Any] = field(default_factory=dict)
    assumes: str = ""
    parts: str = "all"  # all: every check must hold; each: alternatives, judged and reported apart


@dataclass(frozen=True)
class Guide:
    """Everything claims.yaml holds: default filters, the claims, other published predictions."""

    defaults: dict[str, Any]
    claims: tuple[Claim, ...]
    predictions: dict[str, dict[str, Any]]

    def claim(self, claim_id: str) -> Claim:
        return next(c for c in self.claims if c.id == claim_id)


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one assertion of a claim and the figures it rests on."""

    kind: str
    verdict: str
    summary: str
    rows: tuple[str, ...] = ()
    measured_gib: float | None = None
    budget_gib: float | None = None
    headline: str = ""  # the deciding figure in a few words, memory in GiB without the unit
    decided_by: tuple[str, ...] = ()  # cell_id of the deciding row (a pair: base, variant)
    label: str = ""  # the part of the claim this check judges (claims.yaml `label`), if it names one


@dataclass(frozen=True)
class ClaimResult:
    """A claim's overall verdict (from its checks) with every check's figures."""

    claim: Claim
    verdict: str
    checks: tuple[CheckResult, ...]

    @property
    def figures(self) -> str:
        if len(self.checks) == 1:
            return self.checks[0].summary
        return "; ".join(f"[{c.kind} {c.verdict}] {c.summary}" for c in self.checks)

    @property
    def decisive(self) -> tuple[CheckResult, ...]:
        """The checks that decided the verdict: every part of a claim judged by parts, else the first
        check whose verdict is the claim's."""
        if self.claim.parts == "each":
            return tuple(c for c in self.checks if c.headline)
        verdict = "supported" if self.verdict == "supported in part" else self.verdict
        return tuple([c for c in self.checks if c.verdict == verdict and c.headline][:1])

    @property
    def headline(self) -> str:
        """The figure that decided the verdict, in a few words (README and summary tables); each part's
        figure and verdict for a claim judged by parts."""
        if self.claim.parts == "each":
            return "; ".join(f"{c.label or c.kind}: {c.headline}, {c.verdict}" for c in self.decisive)
        return self.decisive[0].headline if self.decisive else ""

    @property
    def decided_by(self) -> tuple[str, ...]:
        """cell_id of the rows that decided the verdict."""
        return tuple(dict.fromkeys(cell for c in self.decisive for cell in c.decided_by))

    @property
    def rows(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for c in self.checks for r in c.rows))


def load_guide(path: str | Path = CLAIMS_FILE) -> Guide:
    """Read claims.yaml; a claim with a check kind this module cannot judge is an error."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    claims = tuple(_claim(entry) for entry in data["claims"])
    for claim in claims:
        for check in claim.checks:
            if check["kind"] not in _CHECKS:
                raise ValueError(
                    f"{path}: {claim.id}: unknown check kind {check['kind']!r}; allowed: {', '.join(_CHECKS)}"
                )
    return Guide(
        defaults=data.get("defaults") or {}, claims=claims, predictions=data.get("predictions") or {}
    )


def _claim(entry: dict[str, Any]) -> Claim:
    return Claim(
        id=entry["id"],
        table=entry["table"],
        method=entry["method"],
        guide_figure=entry["guide_figure"],
        statement=" ".join(entry["statement"].split()),
        config=dict(entry.get("config") or {}),
        checks=tuple(entry["checks"]),
        others=tuple(entry.get("others") or ()),
        example=dict(entry.get("example") or {}),
        assumes=" ".join((entry.get("assumes") or "").split()),
        parts=entry.get("parts", "all"),
    )


# -- matching rows -------------------------------------------------------------------------------
def condition_mask(column: pd.Series, condition: Any) -> pd.Series:
    """Rows whose value meets a filter: a value, a list (any of; null in it matches a missing value),
    or {min, max}."""
    if column.name in TUPLE_COLUMNS and isinstance(condition, list):
        wanted = set(condition)
        return column.map(lambda v: isinstance(v, tuple) and set(v) == wanted).astype(bool)
    if isinstance(condition, dict):
        mask = pd.Series(True, index=column.index)
        if condition.get("min") is not None:
            mask &= column.ge(condition["min"]).fillna(False).astype(bool)
        if condition.get("max") is not None:
            mask &= column.le(condition["max"]).fillna(False).astype(bool)
        return mask
    values = condition if isinstance(condition, list) else [condition]
    mask = column.astype(object).isin([v for v in values if v is not None]).astype(bool)
    return mask | column.isna() if None in values else mask  # null: the knob does not apply (or predates)


def match_rows(frame: pd.DataFrame, filters: dict[str, Any]) -> pd.DataFrame:
    """The rows of `frame` meeting every filter; a filter on a column no row has matches none."""
    mask = pd.Series(True, index=frame.index)
    for name, condition in filters.items():
        if name not in frame.columns:
            return frame.iloc[0:0]
        mask &= condition_mask(frame[name], condition)
    return frame[mask]


def claim_rows(
    frame: pd.DataFrame, guide: Guide, claim: Claim, check: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Rows of the configuration a claim (and one of its checks) names: the guide's defaults (knobs the
    guide never names held at ftmem's defaults), the claim's config, the check's config."""
    return match_rows(frame, claim_filters(guide, claim, check))


def claim_filters(guide: Guide, claim: Claim, check: dict[str, Any] | None = None) -> dict[str, Any]:
    """The filters of `claim_rows`. A default gives way where a check varies that knob itself: a
    multi_gpu check picks its multi-GPU rows and their 1-GPU baselines (`multi_gpu_rows`), a
    saving_percent check pairs rows that differ in its flag."""
    check = check or {}
    varied: tuple[str, ...] = ()
    if check.get("kind") == "multi_gpu":
        varied = MULTI_GPU_FIELDS
    elif check.get("kind") == "saving_percent":
        varied = (check["flag"], *DEPENDENT.get(check["flag"], ()))
    defaults = {k: v for k, v in guide.defaults.items() if k not in varied}
    return {**defaults, **claim.config, **(check.get("config") or {})}


# -- budgets and fits ----------------------------------------------------------------------------
def budget_of(check: dict[str, Any]) -> tuple[int, str]:
    """Bytes and label of a check's budget: a card's nvidia-smi total, or decimal GB."""
    if "card" in check:
        return CARD_MIB[check["card"]] * MIB, check["card"]
    return int(check["gb"] * GB), f"{check['gb']:g} GB"


def fit_verdict(footprint: int, budget: int) -> str:
    """Supported below 95% of the budget, refuted above 105%, marginal between."""
    if footprint <= budget * (1 - MARGIN):
        return "supported"
    return "marginal" if footprint <= budget * (1 + MARGIN) else "refuted"


@dataclass(frozen=True)
class ConfigFit:
    """How one configuration (rows equal but for their budget) stands against a budget."""

    verdict: str
    row: dict[str, Any]
    text: str
    pressure: float  # footprint (an OOM: its cap, a lower bound) over the budget


def config_keys(rows: pd.DataFrame) -> pd.Series:
    """Each row's configuration: its spec without the budget (bench.load's `config_key` column)."""
    if "config_key" in rows.columns:
        return rows["config_key"]
    return rows["spec"].map(lambda s: spec_key(s, drop=("budget_gb",)))


def config_fits(rows: pd.DataFrame, budget: int, label: str) -> list[ConfigFit]:
    """How each configuration among `rows` with an ok or OOM row stands against a budget, in
    configuration order. An OOM under at least this much memory refutes; else the configuration's
    largest measured footprint (NVML, else reserved, else allocated) against the budget. Where it also
    ran under a cap of at most this budget, those rows decide: under a cap the caching allocator holds
    less, as it would on the smaller card. One grouped pass over the rows, whatever their number."""
    if rows.empty:
        return []
    rows = rows if rows.index.is_unique else rows.reset_index(drop=True)
    key = config_keys(rows)
    footprint, cap = rows["footprint_bytes"].astype("float64"), rows["cap_bytes"].astype("float64")
    ok = (rows["status"] == "ok") & footprint.notna()
    capped = ok & (cap <= budget)
    judged = capped | (ok & ~capped.groupby(key).transform("any").astype(bool))
    oom_cap = cap.where((rows["status"] == "oom") & (cap >= budget))
    peak_rows, oom_rows = _row_of_max(footprint.where(judged), key), _row_of_max(oom_cap, key)
    fits = []
    for config in sorted(set(peak_rows.index) | set(oom_rows.index)):
        largest = float(footprint[peak_rows[config]]) if config in peak_rows.index else 0.0
        if config in oom_rows.index:
            row = rows.loc[oom_rows[config]].to_dict()
            fits.append(_oom_fit(row, budget, label, largest))
        else:
            row = rows.loc[peak_rows[config]].to_dict()
            fits.append(_peak_fit(row, budget, label, largest))
    return fits


def _row_of_max(values: pd.Series, key: pd.Series) -> pd.Series:
    """Per key, the index of the row with the largest value (the last such row on ties); keys
    whose values are all missing are left out."""
    present = values.dropna().sort_values(kind="stable")
    return pd.Series(present.index, index=key[present.index].to_numpy()).groupby(level=0).last()


def _oom_fit(row: dict[str, Any], budget: int, label: str, largest: float) -> ConfigFit:
    text = (
        f"{describe_spec(row['spec'])}: OOM under {row['cap_bytes'] / GIB:.2f} GiB (>= {label} "
        f"{budget / GIB:.2f} GiB){_where(row)}"
    )
    return ConfigFit("refuted", row, text, max(float(row["cap_bytes"]), largest) / budget)


def _peak_fit(row: dict[str, Any], budget: int, label: str, largest: float) -> ConfigFit:
    text = (
        f"{describe_spec(row['spec'])}: {row['footprint_basis']} peak {row['footprint_gib']:.2f} GiB vs {label} "
        f"{budget / GIB:.2f} GiB ({largest / budget - 1:+.0%}){_where(row)}"
    )
    return ConfigFit(fit_verdict(int(largest), budget), row, text, largest / budget)


def _where(row: dict[str, Any]) -> str:
    """Where a figure was measured: the row, the GPU, and whether its budget was emulated."""
    gpu, budget = row.get("env_gpu_name"), row.get("budget_gb")
    if row.get("budget_emulated"):
        how = f"budget {budget} emulated on {gpu}"
    else:
        how = f"on {gpu}, capped at {budget}" if is_present(budget) else f"on {gpu}, no cap"
    return f" [{row_ref(row)}, {how}]"


def _invert(verdict: str) -> str:
    return {"supported": "refuted", "refuted": "supported"}.get(verdict, verdict)


def check_fits(rows: pd.DataFrame, check: dict[str, Any]) -> CheckResult:
    """fits_budget / min_memory: the best (over any) or worst (over all) configuration decides;
    expect false asserts that no configuration fits; `covers` names values that must be measured
    before an 'all' verdict can hold (a recommendation for batch 1-4 needs batch 4 measured)."""
    budget, label = budget_of(check)
    expect = check.get("expect", True)
    over = check.get("over", "any" if expect else "all")
    fits = config_fits(rows, budget, label)
    if not fits:
        return CheckResult(
            check["kind"],
            "not measured",
            f"no ok or OOM row of this configuration for {label}",
            budget_gib=budget / GIB,
        )
    verdicts = [f.verdict if expect else _invert(f.verdict) for f in fits]
    # Ties go to a configuration with a measured peak (an OOM only bounds it), then to the one with the
    # most room (any) or the least (all); expect false flips the room.
    sign, pick = (-1 if expect else 1), (max if over == "any" else min)
    has_peak = [(1 if pick is max else -1) * (f.row["status"] == "ok") for f in fits]
    deciding = pick(
        range(len(fits)), key=lambda i: (_RANK[verdicts[i]], has_peak[i], sign * fits[i].pressure)
    )
    verdict, row = verdicts[deciding], fits[deciding].row
    fitting = sum(f.verdict == "supported" for f in fits)
    summary = f"{fits[deciding].text}; {fitting} of {_count(len(fits), 'configuration')} fit {label} with 5% to spare"
    missing = uncovered([f.row for f in fits], check.get("covers") or {})
    if missing and verdict != "refuted":
        verdict, summary = "not measured", f"{summary}; not measured yet: {missing}"
    measured = float(row["footprint_gib"]) if row["status"] == "ok" else None  # an OOM row's peak is partial
    headline = f"{'OOM' if measured is None else f'{measured:.1f}'} vs {label} {budget / GIB:.1f}"
    refs = tuple(row_ref(f.row) for f in fits)
    return CheckResult(
        check["kind"], verdict, summary, refs, measured, budget / GIB, headline, (row["cell_id"],)
    )


def uncovered(rows: list[dict[str, Any]], covers: dict[str, list[Any]]) -> str:
    """The values a check must see measured that no row has, e.g. 'batch_size 4'; '' if none."""
    missing = [
        f"{name} {value}"
        for name, values in covers.items()
        for value in values
        if not any(row["spec"].get(name) == value for row in rows)
    ]
    return ", ".join(missing)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# -- memory figures ------------------------------------------------------------------------------
def figure_verdict(row: dict[str, Any], low: float | None, high: float | None) -> str | None:
    """A row against a stated range of bytes: an ok row by its footprint, an OOM row as a lower
    bound (it needed more than its cap); None where the row says nothing about the range."""
    if row["status"] == "oom":
        cap = row["cap_bytes"]
        if high is not None and cap > high * (1 + MARGIN):
            return "refuted"
        return "supported" if high is None and low is not None and cap >= low else None
    value = row["footprint_bytes"]
    if (low is None or value >= low) and (high is None or value <= high):
        return "supported"
    near = (low is None or value >= low * (1 - MARGIN)) and (high is None or value <= high * (1 + MARGIN))
    return "marginal" if near else "refuted"


def check_memory_figure(rows: pd.DataFrame, check: dict[str, Any]) -> CheckResult:
    """memory_figure: some measured configuration shows process memory in the stated range."""
    low_gb, high_gb = check.get("min_gb"), check.get("max_gb")
    low = None if low_gb is None else low_gb * GB
    high = None if high_gb is None else high_gb * GB
    stated = _range_text(low_gb, high_gb, "GB")
    usable = rows[
        ((rows["status"] == "ok") & rows["footprint_bytes"].notna())
        | ((rows["status"] == "oom") & rows["cap_bytes"].notna())
    ]
    judged = [(figure_verdict(r, low, high), r) for r in usable.to_dict("records")]
    judged = [(v, r) for v, r in judged if v is not None]
    if not judged:
        return CheckResult(
            "memory_figure", "not measured", f"no row of this configuration speaks to {stated}"
        )
    verdict, row = max(judged, key=lambda vr: _RANK[vr[0]])
    summary = f"guide {stated}; {_spread(usable)}; deciding {_figure_text(row)}"
    measured = None if row["status"] == "oom" else float(row["footprint_gib"])
    figure = f"OOM, needs > {row['cap_bytes'] / GIB:.1f}" if measured is None else f"{measured:.1f}"
    guide_gib = _range_text(*(None if v is None else v * GB / GIB for v in (low_gb, high_gb)), "", digits=1)
    return CheckResult(
        "memory_figure",
        verdict,
        summary,
        tuple(row_ref(r) for _, r in judged),
        measured,
        headline=f"{figure} vs guide {guide_gib}",
        decided_by=(row["cell_id"],),
    )


def _spread(rows: pd.DataFrame) -> str:
    """The ok rows' footprints in GB, e.g. '3 ok rows at 30.1-36.2 GB'."""
    ok = [float(v) / GB for v in rows.loc[rows["status"] == "ok", "footprint_bytes"]]
    if not ok:
        return "OOM rows only"
    spread = f"{min(ok):.1f}-{max(ok):.1f}" if min(ok) != max(ok) else f"{ok[0]:.1f}"
    return f"{_count(len(ok), 'ok row')} at {spread} GB"


def _figure_text(row: dict[str, Any]) -> str:
    if row["status"] == "oom":
        return f"{describe_spec(row['spec'])}: OOM, needs > {row['cap_bytes'] / GB:.1f} GB{_where(row)}"
    return (
        f"{describe_spec(row['spec'])}: {row['footprint_basis']} peak {row['footprint_bytes'] / GB:.1f} GB "
        f"({row['footprint_gib']:.2f} GiB){_where(row)}"
    )


def _range_text(low: float | None, high: float | None, unit: str, digits: int | None = None) -> str:
    """'80-120 GB', '> 0%', '< 23 GB'; `digits` rounds (a converted figure), else as stated."""
    space = " " if unit and unit != "%" else ""

    def num(value: float) -> str:
        return f"{value:.{digits}f}" if digits is not None else f"{value:g}"

    if low is not None and high is not None:
        return f"{num(low)}-{num(high)}{space}{unit}"
    return f"> {num(low)}{space}{unit}" if low is not None else f"< {num(high)}{space}{unit}"


# -- savings -------------------------------------------------------------------------------------
def savings_pairs(frame: pd.DataFrame, flag: str, base: Any, variant: Any) -> pd.DataFrame:
    """Pairs of ok rows equal in every spec field (and software stack) but `flag`: base -> variant.

    Columns: config (the pair's shared configuration), base_ref, variant_ref, and per measure
    (allocated, reserved, nvml, footprint): base and variant GiB, saved GiB and saved percent.
    """
    ok = frame[(frame["status"] == "ok") & frame["footprint_bytes"].notna()]
    if flag not in ok.columns or ok.empty:
        return pd.DataFrame()
    ok = ok.sort_values("footprint_bytes").drop_duplicates(["cell_id", "env_stack"], keep="last")
    drop = (flag, *DEPENDENT.get(flag, ()))
    ok = ok.assign(_key=ok["spec"].map(lambda s: spec_key(s, drop)) + "|" + ok["env_stack"])
    left = ok[condition_mask(ok[flag], base)]
    right = ok[condition_mask(ok[flag], variant)]
    pairs = left.merge(right, on="_key", suffixes=("_base", "_variant"))
    return pd.DataFrame([_pair_record(p, flag) for p in pairs.to_dict("records")])


def _pair_record(pair: dict[str, Any], flag: str) -> dict[str, Any]:
    record = {
        "flag": flag,
        "change": f"{pair[flag + '_base']} -> {pair[flag + '_variant']}",
        "config": describe_spec(pair["spec_base"]),
        "env_stack": pair["env_stack_base"],
        "base_ref": row_ref({k[:-5]: v for k, v in pair.items() if k.endswith("_base")}),
        "variant_ref": row_ref({k[:-8]: v for k, v in pair.items() if k.endswith("_variant")}),
        "base_cell": pair["cell_id_base"],
        "variant_cell": pair["cell_id_variant"],
    }
    for measure, column in (
        ("allocated", "peak_allocated_bytes"),
        ("reserved", "peak_reserved_bytes"),
        ("nvml", "nvml_peak_process_bytes"),
        ("footprint", "footprint_bytes"),
    ):
        before, after = pair[column + "_base"], pair[column + "_variant"]
        known = not (pd.isna(before) or pd.isna(after))
        record[f"{measure}_base_gib"] = before / GIB if known else None
        record[f"{measure}_variant_gib"] = after / GIB if known else None
        record[f"{measure}_saved_gib"] = (before - after) / GIB if known else None
        record[f"{measure}_saved_pct"] = 100 * (before - after) / before if known else None
    return record


def saving_verdict(saved_pct: float, low: float | None, high: float | None) -> str:
    """Within SAVING_MARGIN_PCT points of an edge of the range, on either side: marginal (too close to
    call); inside the range by more: supported; outside by more: refuted."""
    edges = [edge for edge in (low, high) if edge is not None]
    if any(abs(saved_pct - edge) <= SAVING_MARGIN_PCT for edge in edges):
        return "marginal"
    inside = (low is None or saved_pct > low) and (high is None or saved_pct < high)
    return "supported" if inside else "refuted"


def check_saving(rows: pd.DataFrame, check: dict[str, Any]) -> CheckResult:
    """saving_percent: the median saving of process memory over every matching pair of rows."""
    pairs = savings_pairs(rows, check["flag"], check["from"], check["to"])
    stated = _range_text(check.get("min_pct"), check.get("max_pct"), "%")
    change = f"{check['flag']} {check['from']} -> {check['to']}"
    if pairs.empty:
        return CheckResult("saving_percent", "not measured", f"no pair of ok rows differing only by {change}")
    median = statistics.median(pairs["footprint_saved_pct"])
    verdict = saving_verdict(median, check.get("min_pct"), check.get("max_pct"))
    typical = pairs.loc[(pairs["footprint_saved_pct"] - median).abs().idxmin()]  # the pair nearest the median
    summary = (
        f"{change}: median saving {median:.1f}% of process memory over {_count(len(pairs), 'pair')} "
        f"(guide {stated}); nearest the median: {typical['config']}: {typical['footprint_base_gib']:.2f} -> "
        f"{typical['footprint_variant_gib']:.2f} GiB [{typical['base_ref']} vs {typical['variant_ref']}]"
    )
    refs = tuple(pairs["base_ref"]) + tuple(pairs["variant_ref"])
    return CheckResult(
        "saving_percent",
        verdict,
        summary,
        refs,
        headline=f"saves {median:.1f}% vs guide {stated}",
        decided_by=(typical["base_cell"], typical["variant_cell"]),
    )


# -- several GPUs ----------------------------------------------------------------------------------
def multi_gpu_rows(rows: pd.DataFrame, check: dict[str, Any]) -> pd.DataFrame:
    """The multi-GPU rows a multi_gpu check speaks of: gpus as the check says (a count, a list or
    {min, max}; default at least 2) and, if the check names one, the strategy (`dist`)."""
    if rows.empty or "multi_gpu" not in rows.columns:
        return rows.iloc[0:0]
    mask = rows["multi_gpu"].astype(bool) & condition_mask(rows["gpus"], check.get("gpus", {"min": 2}))
    if check.get("dist") is not None:
        mask &= condition_mask(rows["dist"], check["dist"])
    return rows[mask]


def _gpus_text(check: dict[str, Any]) -> str:
    gpus = check.get("gpus", {"min": 2})
    if isinstance(gpus, dict):
        return f"{gpus.get('min', 2)}+"
    return " or ".join(map(str, gpus)) if isinstance(gpus, list) else str(gpus)


def check_multi_gpu(rows: pd.DataFrame, check: dict[str, Any]) -> CheckResult:
    """multi_gpu: a claim about several GPUs of one job, judged on rows with gpus >= 2 (per-rank peaks,
    the row's headline being the max over ranks; the budget is per GPU). By default (`compare` absent)
    like fits_budget over those rows (any configuration fits the card, or with expect false none does);
    `compare: one_gpu` asks whether the multi-GPU cells hold less per card than their 1-GPU baselines
    (`check_lower_per_card`). Without such rows: not measured."""
    multi = multi_gpu_rows(rows, check)
    budget, label = budget_of(check)
    if multi.empty or not multi["status"].isin(["ok", "oom"]).any():
        strategy = f" under {check['dist']}" if check.get("dist") else ""
        return CheckResult(
            "multi_gpu",
            "not measured",
            f"needs rows of {_gpus_text(check)} x {label} in one job{strategy}; no multi-GPU row of this "
            "configuration yet",
            budget_gib=budget / GIB,
        )
    if check.get("compare") == "one_gpu":
        return check_lower_per_card(rows, multi, check)
    over = check.get("over", "any" if check.get("expect", True) else "all")
    result = check_fits(multi, {**check, "over": over})
    result = dataclasses.replace(
        result,
        summary=f"{_gpus_text(check)} GPUs, budget per GPU: {result.summary}",
        headline=f"{result.headline} per GPU" if result.headline else "",
    )
    return _unsettled(result, multi) if over == "any" and result.verdict == "refuted" else result


def _unsettled(result: CheckResult, multi: pd.DataFrame) -> CheckResult:
    """ "Some configuration fits" is refuted only when every configuration has an answer: a
    strategy whose cells did not finish (timeout, error) or ran out of host memory rather than GPU
    memory (host_oom: CPU offload on a host too small) might still fit the GPUs, so the check waits."""
    host_oom = multi["host_oom"].fillna(False).astype(bool)
    unfinished = multi[~multi["status"].isin(["ok", "oom"]) | host_oom]
    if unfinished.empty:
        return result
    pending = ", ".join(sorted({_pending_text(row) for row in unfinished.to_dict("records")}))
    return dataclasses.replace(
        result,
        verdict="not measured",
        summary=f"not settled: no configuration measured so far fits, but {pending} did not finish; "
        f"{result.summary}",
    )


def _pending_text(row: dict[str, Any]) -> str:
    strategy = row["dist"] + (f" offload {row['zero_offload']}" if row["zero_offload"] != "none" else "")
    if is_present(row.get("host_oom")) and bool(row["host_oom"]):
        total = row.get("host_total_bytes")
        host = f" of {total / GIB:.1f} GiB" if is_present(total) else ""
        return f"{strategy} (ran out of host memory{host}, {row_ref(row)})"
    return f"{strategy} ({row['status']})"


def one_gpu_verdict(multi: dict[str, Any], base: dict[str, Any]) -> tuple[str, str] | None:
    """Does a multi-GPU row hold less per card than its 1-GPU baseline? Both ok: the saving of their
    footprints against "saves more than 0%" (`saving_verdict`, the rule of every saving claim); the
    baseline OOM under a cap at least the multi-GPU footprint: supported; the multi-GPU row OOM under a
    cap at least the baseline's footprint: refuted; else None (no answer). The text gives GiB, unnamed."""
    ok_m, ok_b = multi["status"] == "ok", base["status"] == "ok"
    if ok_m and ok_b:
        before, after = float(base["footprint_bytes"]), float(multi["footprint_bytes"])
        saved = 100 * (before - after) / before
        return saving_verdict(
            saved, 0, None
        ), f"{before / GIB:.2f} -> {after / GIB:.2f} per card ({saved:+.1f}% saved)"
    if ok_m and base["status"] == "oom" and is_present(base["cap_bytes"]):
        if float(base["cap_bytes"]) >= float(multi["footprint_bytes"]):
            return "supported", (
                f"1 GPU OOM under {base['cap_bytes'] / GIB:.2f} -> {multi['footprint_gib']:.2f} per card"
            )
    if multi["status"] == "oom" and ok_b and is_present(multi["cap_bytes"]):
        if float(multi["cap_bytes"]) >= float(base["footprint_bytes"]):
            return "refuted", (
                f"{base['footprint_gib']:.2f} on 1 GPU -> OOM under {multi['cap_bytes'] / GIB:.2f} per card"
            )
    return None


def check_lower_per_card(rows: pd.DataFrame, multi: pd.DataFrame, check: dict[str, Any]) -> CheckResult:
    """compare one_gpu: pairs of a multi-GPU row and its 1-GPU baseline (the same spec but gpus 1,
    dist none, zero_offload none, any budget; the same software stack), each judged by
    `one_gpu_verdict`; over all (default) the worst pair decides, over any the best."""
    base = rows[~rows["multi_gpu"].astype(bool) & rows["status"].isin(["ok", "oom"])]
    drop = (*MULTI_GPU_FIELDS, "budget_gb")
    keyed = {}
    for row in base.to_dict("records"):
        keyed.setdefault((spec_key(row["spec"], drop), row["env_stack"]), []).append(row)
    judged = []
    for m in multi[multi["status"].isin(["ok", "oom"])].to_dict("records"):
        for b in keyed.get((spec_key(m["spec"], drop), m["env_stack"]), []):
            answer = one_gpu_verdict(m, b)
            if answer is not None:
                judged.append((answer[0], answer[1], m, b))
    if not judged:
        return CheckResult(
            "multi_gpu",
            "not measured",
            f"{_count(len(multi), 'multi-GPU row')} but no 1-GPU baseline row (same spec with gpus 1, dist none) "
            "that answers whether memory per card is lower",
        )
    judged = same_run_pairs(judged)
    pick = max if check.get("over", "all") == "any" else min
    verdict, text, m, b = pick(judged, key=lambda j: _RANK[j[0]])
    counts = {v: sum(j[0] == v for j in judged) for v in _RANK}
    summary = (
        f"{describe_spec(m['spec'])} vs 1 GPU, GiB: {text} [{row_ref(m)} vs {row_ref(b)}]; over "
        f"{_count(len(judged), 'pair')}: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    )
    refs = tuple(dict.fromkeys(r for j in judged for r in (row_ref(j[2]), row_ref(j[3]))))
    measured = float(m["footprint_gib"]) if m["status"] == "ok" else None
    return CheckResult(
        "multi_gpu", verdict, summary, refs, measured, headline=text, decided_by=(m["cell_id"], b["cell_id"])
    )


def same_run_pairs(judged: list[tuple]) -> list[tuple]:
    """Where some multi-GPU row has its baseline from the same run (the same results file and the same
    code commit: one sweep on one machine), judge by those pairs alone; other pairs mix machines and days."""
    run = ("source_file", "env_git_commit")
    same = [j for j in judged if all(j[2].get(k) == j[3].get(k) for k in run)]
    return same or judged


def check_qualitative(rows: pd.DataFrame, check: dict[str, Any]) -> CheckResult:
    return CheckResult("qualitative", "not measurable", check["reason"])


_CHECKS = {
    "min_memory": check_fits,
    "fits_budget": check_fits,
    "memory_figure": check_memory_figure,
    "saving_percent": check_saving,
    "multi_gpu": check_multi_gpu,
    "qualitative": check_qualitative,
}


def evaluate_claim(frame: pd.DataFrame, guide: Guide, claim: Claim) -> ClaimResult:
    """Every check of a claim on its rows, and the claim's verdict from them."""
    results = []
    for check in claim.checks:
        result = _CHECKS[check["kind"]](claim_rows(frame, guide, claim, check), check)
        results.append(dataclasses.replace(result, label=check.get("label", "")))
    verdicts = [r.verdict for r in results]
    verdict = combine_parts(verdicts) if claim.parts == "each" else combine(verdicts)
    return ClaimResult(claim, verdict, tuple(results))


def combine(verdicts: list[str]) -> str:
    """A claim's verdict: refuted if any part is; else the weakest measured part, and "supported in
    part" where every measured part is supported but some part is not measured yet; a claim none of
    whose parts is measured is not measured (or not measurable, if no part is about memory)."""
    measured = [v for v in verdicts if v in _RANK]
    if not measured:
        return "not measurable" if all(v == "not measurable" for v in verdicts) else "not measured"
    worst = min(measured, key=_RANK.__getitem__)
    return "supported in part" if worst == "supported" and "not measured" in verdicts else worst


def combine_parts(verdicts: list[str]) -> str:
    """A claim of alternatives judged apart (`parts: each`): their common verdict where the measured
    ones agree (as `combine`), else mixed."""
    return "mixed" if len({v for v in verdicts if v in _RANK}) > 1 else combine(verdicts)


def evaluate_claims(frame: pd.DataFrame, guide: Guide | None = None) -> list[ClaimResult]:
    """Verdicts of every claim of the guide (default: claims.yaml) on the rows of `frame`."""
    guide = guide or load_guide()
    return [evaluate_claim(frame, guide, claim) for claim in guide.claims]


# -- the claim's own configuration and other published predictions --------------------------------
def example_spec(guide: Guide, claim: Claim) -> dict[str, Any] | None:
    """The one spec a claim stands for (its single-valued filters, its example, CellSpec defaults),
    which ftmem's predictor is asked about; None for claims without an example."""
    if not claim.example:
        return None
    values = {
        k: v
        for k, v in {**guide.defaults, **claim.config}.items()
        if not isinstance(v, (dict, list)) or k in TUPLE_COLUMNS
    }
    try:
        return CellSpec.create(**{**values, **claim.example}).to_dict()
    except SpecError:
        return None


def prediction_bytes(prediction: dict[str, Any], model: str = "qwen3-14b") -> int:
    """Bytes of a published prediction: its stated GB, or the estimator's formula (model states
    only: weights, gradients and Adam moments; no activations) on the model's parameter counts."""
    if "gb" in prediction:
        return int(prediction["gb"] * GB)
    formula = prediction["formula"]
    arch = architecture(model)
    if "accelerate" in formula:
        return accelerate_estimate(arch, formula["accelerate"], formula["dtype"])
    return deepspeed_estimate(arch, formula["deepspeed"], formula["gpus"])


def accelerate_estimate(arch: dict[str, Any], what: str, dtype: str) -> int:
    """`accelerate estimate-memory`: it builds AutoModel (no lm_head) in fp32; load size is that
    over 1/2/4/8 for float32/16/int8/int4; 'Training using Adam' is the largest of its stages,
    twice the fp32 size for float16 (fp32 Adam moments), four times for float32."""
    counts = parameter_counts(arch)
    fp32 = 4 * (counts["total"] - counts["lm_head"])
    if what == "load":
        return fp32 // {"float32": 1, "float16": 2, "int8": 4, "int4": 8}[dtype]
    return fp32 * {"float16": 2, "float32": 4}[dtype]


def deepspeed_estimate(arch: dict[str, Any], stage: str, gpus: int) -> int:
    """DeepSpeed's model-state estimators without offload, per GPU: ZeRO-2 4P + 16P/N;
    ZeRO-3 4 x largest layer + 18P/N (P: every parameter, lm_head included)."""
    total = parameter_counts(arch)["total"]
    if stage == "zero2":
        return 4 * total + 16 * total // gpus
    largest = max(arch["vocab_size"] * arch["hidden_size"], *(i * o for i, o in linear_shapes(arch).values()))
    return 4 * largest + 18 * total // gpus


def predictions_text(guide: Guide, claim: Claim) -> str:
    """Other predictions in one cell: stated GB figures as published, computed ones in GiB too."""
    parts = []
    for pid in claim.others:
        prediction = guide.predictions[pid]
        n_bytes = prediction_bytes(prediction, guide.defaults.get("model", "qwen3-14b"))
        shown = f"{prediction['gb']:g} GB" if "gb" in prediction else f"{n_bytes / GIB:.1f} GiB (computed)"
        parts.append(f"{prediction['label']}: {shown}")
    return "; ".join(parts)
