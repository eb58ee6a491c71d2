"""`ftmem check`: will a LLaMA-Factory / axolotl / TRL / HF TrainingArguments config fit?

`check(config, ...)` reads the config (recognised by its keys, analysis.check.formats) with its tool's
defaults, adds a DeepSpeed JSON or accelerate config beside it, maps all of it onto one CellSpec
(analysis.check.mapping), predicts it per GPU (analysis.predict), judges each card on the predicted
NVML process peak (analysis.check.advice), suggests re-predicted changes where it does not fit, and
lists the closest measured rows (analysis.check.nearest). Keys that change memory in ways ftmem does not
model are returned as `unmodelled`, keys it does not know as `unrecognised`: none is dropped silently.
Imports no torch and nothing from bench.cell.runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.check.advice import Card, Suggestion, Verdict, default_cards, suggestions, verdict
from analysis.check.distributed import read_accelerate
from analysis.check.formats import read_training
from analysis.check.mapping import Setup, build
from analysis.check.source import ConfigError, Reading, Unmodelled, load_mapping
from analysis.predict import Prediction, predict
from bench.spec import CellSpec

__all__ = ["CheckResult", "ConfigError", "check", "prediction_dict"]


@dataclass
class CheckResult:
    tool: str
    files: list[str]
    spec: CellSpec
    sources: dict[str, str]
    prediction: Prediction
    verdicts: list[Verdict]
    suggestions: list[Suggestion]
    unmodelled: list[Unmodelled]
    unrecognised: list[str]
    assumptions: list[str]
    nearest: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """One object: the spec as `ftmem run` takes it, the prediction in raw bytes, verdicts, suggestions,
        unmodelled keys, and the rest of what the check found."""
        return {
            "format": self.tool,
            "files": self.files,
            "spec": self.spec.to_dict(),
            "spec_sources": self.sources,
            "prediction": prediction_dict(self.prediction),
            "verdicts": [v.to_dict() for v in self.verdicts],
            "suggestions": [s.to_dict() for s in self.suggestions],
            "unmodelled_keys": [u.to_dict() for u in self.unmodelled],
            "unrecognised_keys": self.unrecognised,
            "assumptions": self.assumptions,
            "nearest_measured": self.nearest,
        }


def prediction_dict(pred: Prediction) -> dict[str, Any]:
    return {
        "peak_allocated_bytes": pred.peak_allocated_bytes,
        "peak_reserved_bytes": pred.peak_reserved_bytes,
        "nvml_process_bytes": pred.nvml_process_bytes,
        "peak_phase": pred.peak_phase,
        "components": dict(pred.components),
        "outside_allocated": dict(pred.outside_allocated),
    }


def _accelerate(path: str | Path | None, reading: Reading):
    if path is None:
        return None
    data = load_mapping(path)
    if "distributed_type" not in data and "compute_environment" not in data:
        raise ConfigError(
            path, "(format)", "not accelerate", "has no distributed_type: not an accelerate config"
        )
    setting = read_accelerate(Path(path), data)
    reading.unrecognised += [f"{setting.file.name}: {k}" for k in setting.unrecognised]
    return setting


def check(
    config: str | Path,
    *,
    deepspeed: str | Path | None = None,
    accelerate: str | Path | None = None,
    gpus: int | None = None,
    cards: list[Card] | None = None,
    fmt: str | None = None,
    model: str | None = None,
    seq_len: int | None = None,
    results: list[str | Path] | None = None,
    nearest: bool = True,
) -> CheckResult:
    """Read, map, predict and judge one training config; ConfigError on anything it cannot answer."""
    path = Path(config)
    reading = read_training(path, load_mapping(path), fmt)
    setup = Setup(
        gpus, Path(deepspeed) if deepspeed else None, _accelerate(accelerate, reading), model, seq_len
    )
    spec = build(reading, setup)
    pred, cards = predict(spec, simulate=True), cards or default_cards()
    files = [str(path)] + [str(p) for p in (deepspeed, accelerate) if p]
    near = []
    if nearest:
        from analysis.check.nearest import nearest_rows

        near = nearest_rows(spec, results)
    return CheckResult(
        reading.tool,
        files,
        spec,
        dict(sorted(reading.sources.items())),
        pred,
        [verdict(pred, c, reading.unmodelled) for c in cards],
        suggestions(spec, cards),
        reading.unmodelled,
        reading.unrecognised,
        reading.assumptions,
        near,
    )
