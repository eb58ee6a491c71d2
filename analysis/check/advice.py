"""Verdicts per card and what to change to fit, each change re-predicted. Imports no torch.

A card fits when the predicted NVML process peak (`Prediction.nvml_process_bytes`, what nvidia-smi
shows for the process) is at most the card's nvidia-smi total (bench/cards.py). Unmodelled keys make
a verdict only as strong as their direction allows: an upper bound that fits still fits, a lower
bound that does not fit still does not; anything else is "unknown". Where only the caching allocator's
slack does not fit, the verdict is "marginal" (analysis.predict.fit_verdict).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

from analysis.check.source import Unmodelled
from analysis.predict import Prediction, fit_verdict, predict
from bench.cards import CARD_MIB, GIB, MIB, budget_bytes
from bench.spec import CellSpec, SpecError

#: One card of each common size (bench/cards.py); for 80 GB the H100, the smaller of the two 80 GB totals.
DEFAULT_CARDS = ("t4-16gb", "rtx4090-24gb", "a100-40gb", "l40s-48gb", "h100-80gb")
#: Within 3% of the card the call is flagged tight: the predictor's error reaches ~1.5% and the allocator's
#: fragmentation near a full card costs a few hundred MB (README, Predictor accuracy).
TIGHT = 0.03
MARGINAL = ("the allocated peak fits, the allocator's slack does not: it fits or not by where its blocks lie "
            "(analysis.predict.fit_verdict); expandable segments make it fit")


@dataclass(frozen=True)
class Card:
    name: str
    total_bytes: int


def card(name: str) -> Card:
    """A card name of bench/cards.py, or a number of decimal GB (10^9 bytes)."""
    try:
        value: float | str = float(name)
    except ValueError:
        value = name
    return Card(name, budget_bytes(value))


def default_cards() -> list[Card]:
    return [Card(name, CARD_MIB[name] * MIB) for name in DEFAULT_CARDS]


@dataclass(frozen=True)
class Verdict:
    card: str
    total_bytes: int
    predicted_bytes: int
    headroom_bytes: int
    verdict: str
    tight: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fits(pred: Prediction, total: int) -> bool:
    return pred.nvml_process_bytes <= total


def verdict(pred: Prediction, c: Card, unmodelled: list[Unmodelled]) -> Verdict:
    ok, headroom = fits(pred, c.total_bytes), c.total_bytes - pred.nvml_process_bytes
    effects = {u.effect for u in unmodelled}
    word, note = ("fits" if ok else "OOM"), ""
    if not ok and fit_verdict(pred, c.total_bytes) == "marginal":
        word, note = "marginal", MARGINAL
    if effects and ok and effects <= {"lower"}:
        note = "the unmodelled keys only lower memory: an upper bound fits"
    elif effects and not ok and effects <= {"higher"}:
        note = "the unmodelled keys only add memory: a lower bound does not fit"
    elif effects:
        keys = ", ".join(sorted({u.key for u in unmodelled if u.effect != ("lower" if ok else "higher")}))
        word, note = "unknown", f"predicted to {'fit' if ok else 'run out'}, but {keys} may change that"
    return Verdict(
        c.name,
        c.total_bytes,
        pred.nvml_process_bytes,
        headroom,
        word,
        abs(headroom) <= TIGHT * c.total_bytes,
        note,
    )


# ------------------------------------------------------------------------------------------------
# Suggestions: the cheapest changes first, each re-predicted
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Suggestion:
    card: str
    rank: int
    change: str
    changes: dict[str, list[Any]]
    predicted_bytes: int
    headroom_bytes: int
    spec: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Candidate = tuple[str, dict[str, Any]]


def _expandable(spec: dict[str, Any]) -> Iterator[Candidate]:
    """The caching allocator's expandable segments: no change to training, and the slack that a marginal
    verdict misses by mostly goes (analysis.predict.fit_verdict)."""
    if not spec["expandable_segments"]:
        yield "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", {**spec, "expandable_segments": True}


def _checkpointing(spec: dict[str, Any]) -> Iterator[Candidate]:
    if not spec["gradient_checkpointing"]:
        yield "gradient checkpointing on", {**spec, "gradient_checkpointing": True, "gc_reentrant": False}


def _micro_batch(spec: dict[str, Any]) -> Iterator[Candidate]:
    """Halve the micro-batch and double the accumulation: the same sequences per optimizer step."""
    batch, accum = spec["batch_size"], spec["grad_accum"]
    while batch > 1 and batch % 2 == 0:
        batch, accum = batch // 2, accum * 2
        yield (
            f"micro-batch {batch} x accumulation {accum} (same {batch * accum} sequences per step)",
            {**spec, "batch_size": batch, "grad_accum": accum},
        )


def _optimizer(spec: dict[str, Any]) -> Iterator[Candidate]:
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        if spec["optimizer"] != name:
            yield f"bitsandbytes optimizer {name}", {**spec, "optimizer": name}


_QLORA_FIELDS = (
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "quant_type",
    "double_quant",
    "kbit_fp32_upcast",
)


def _qlora(spec: dict[str, Any]) -> Iterator[Candidate]:
    """A 4-bit NF4 base with bf16 (fp16) compute; LoRA settings kept, else ftmem's defaults (r 8 on every
    projection) when the config trained in full."""
    if spec["method"] == "qlora":
        return
    defaults = {f.name: f.default for f in fields(CellSpec) if f.name in _QLORA_FIELDS}
    filled = {k: spec[k] if spec.get(k) is not None else defaults[k] for k in _QLORA_FIELDS}
    compute = {"fp16_mixed": "fp16", "fp32": "fp32"}.get(spec["precision"], "bf16")
    words = "QLoRA (4-bit NF4 base)" + (
        "" if spec["method"] != "full" else ", LoRA r 8 on every projection instead of full fine-tuning"
    )
    yield words, {**spec, **filled, "method": "qlora", "quant_compute_dtype": compute}


#: Sharding rungs, cheapest first: (dist, zero_offload).
SHARDING = (
    ("deepspeed_zero2", "none"),
    ("deepspeed_zero3", "none"),
    ("fsdp2", "none"),
    ("deepspeed_zero3", "optimizer"),
    ("deepspeed_zero3", "optimizer_and_params"),
)


def _sharding(spec: dict[str, Any]) -> Iterator[Candidate]:
    if spec["gpus"] < 2:
        return
    current = (spec["dist"], spec["zero_offload"])
    later = SHARDING[SHARDING.index(current) + 1 :] if current in SHARDING else SHARDING
    for dist, offload in later:
        optimizer = (
            spec["optimizer"]
            if spec["optimizer"].startswith("adamw") and "8bit" not in spec["optimizer"]
            else "adamw"
        )
        words = f"{dist}" + (f" with {offload.replace('_', ' ')} offload" if offload != "none" else "")
        yield words, {**spec, "dist": dist, "zero_offload": offload, "optimizer": optimizer}


def _sequence(spec: dict[str, Any]) -> Iterator[Candidate]:
    seq = spec["seq_len"]
    while seq > 256:
        seq //= 2
        yield f"sequence length {seq}", {**spec, "seq_len": seq}


#: The ladder of changes, cheapest first (the order the issue gives).
LADDER: tuple[Callable[[dict[str, Any]], Iterator[Candidate]], ...] = (
    _expandable,
    _checkpointing,
    _micro_batch,
    _optimizer,
    _qlora,
    _sharding,
    _sequence,
)


def _predicted(candidate: dict[str, Any], simulate: bool | str = "cached") -> Prediction | None:
    try:
        return predict(CellSpec.create(**candidate), simulate=simulate)
    except (SpecError, ValueError):
        return None


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    spec_new = CellSpec.create(**new).to_dict()
    return {k: [old[k], v] for k, v in spec_new.items() if old.get(k) != v}


def _first_fit(spec: dict[str, Any], rung, total: int) -> tuple[str, dict[str, Any], Prediction] | None:
    for words, candidate in rung(spec):
        # the allocator's setting alone is re-simulated (the cell's trace is cached: no time); other
        # changes read the simulation cache, else the analytic slack
        pred = _predicted(candidate, True if rung is _expandable else "cached")
        if pred is not None and fits(pred, total):
            return words, candidate, pred
    return None


def _suggestion(c: Card, rank: int, spec: dict[str, Any], found) -> Suggestion:
    words, candidate, pred = found
    full = CellSpec.create(**candidate).to_dict()
    return Suggestion(
        c.name,
        rank,
        words,
        _diff(spec, candidate),
        pred.nvml_process_bytes,
        c.total_bytes - pred.nvml_process_bytes,
        full,
    )


def _combined(spec: dict[str, Any], c: Card) -> Suggestion | None:
    """No single change fits: apply the rungs one after the other until the card fits. A rung with a
    step that fits ends it there (its cheapest such step); otherwise its most saving step is kept, if it
    saves anything."""
    current, steps = dict(spec), []
    now = _predicted(current)
    for rung in LADDER:
        hit = _first_fit(current, rung, c.total_bytes)
        if hit:
            words, candidate, pred = hit
            return _suggestion(c, len(LADDER), spec, (" + ".join(steps + [words]), candidate, pred))
        options = [(w, cand, p) for w, cand in rung(current) if (p := _predicted(cand)) is not None]
        best = min(options, key=lambda option: option[2].nvml_process_bytes, default=None)
        if best is not None and (now is None or best[2].nvml_process_bytes < now.nvml_process_bytes):
            words, current, now = best  # a step that saves nothing is not kept
            steps.append(words)
    return None


def suggestions(spec: CellSpec, cards: list[Card]) -> list[Suggestion]:
    """For every card the spec is predicted not to fit: each single change of the ladder that fits,
    cheapest first; if none does, the changes combined."""
    base, pred, found = spec.to_dict(), predict(spec, simulate=True), []
    for c in cards:
        if fits(pred, c.total_bytes):
            continue
        singles = [
            _suggestion(c, rank, base, hit)
            for rank, rung in enumerate(LADDER)
            if (hit := _first_fit(base, rung, c.total_bytes))
        ]
        combined = None if singles else _combined(base, c)
        found += singles or ([combined] if combined else [])
    return found


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"
