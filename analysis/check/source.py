"""Reading one config file: YAML/JSON loading, typed key access that remembers where each value
came from, and the `Reading` a tool's reader fills in. Imports no torch.

Every bad input becomes a `ConfigError` naming the file, the key, the value and what is allowed;
every key a reader looks at is marked used, so the keys nobody looked at can be reported
(`unrecognised`) instead of being dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: What an unmodelled key does to the real run's memory, against ftmem's prediction:
#: "lower": the run needs at most the prediction (an upper bound); "higher": at least (a lower bound);
#: "unknown": either.
EFFECTS = ("lower", "higher", "unknown")
_MISSING = object()


class ConfigError(ValueError):
    """A config ftmem cannot read or answer for: names the file, the key, the value and what is allowed."""

    def __init__(self, path: Path | str, key: str, value: Any, allowed: str):
        self.path, self.key, self.value, self.allowed = str(path), key, value, allowed
        shown = "" if value is _MISSING else f" {value!r}"
        super().__init__(f"{path}: {key}:{shown} {allowed}")


def missing(path: Path | str, key: str, allowed: str) -> ConfigError:
    """The error for a required key that is absent (no value to show)."""
    return ConfigError(path, key, _MISSING, allowed)


@dataclass(frozen=True)
class Unmodelled:
    """A key that changes memory in a way ftmem does not model, and how the prediction stands to it."""

    file: str
    key: str
    value: Any
    why: str
    effect: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "key": self.key,
            "value": self.value,
            "why": self.why,
            "effect": self.effect,
        }


def load_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML or JSON file (JSON is read by the YAML parser too)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "(file)", _MISSING, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "(file)", _MISSING, f"cannot be read as text: {exc}") from None
    try:
        # JSON first: YAML 1.1 reads JSON's 1e9 as a string.
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _yaml(text, path)
    if not isinstance(data, dict):
        raise ConfigError(path, "(file)", _MISSING, f"must hold a mapping of keys, not {type(data).__name__}")
    return data


def _yaml(text: str, path: Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(path, "(file)", _MISSING, f"is not YAML or JSON{line}") from None


_KIND_NAMES = {
    bool: "true/false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _is_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


class Config:
    """Typed access to one file's keys; `doc` of a default says which tool file or page it comes from."""

    def __init__(self, path: str | Path, data: dict[str, Any], tool: str):
        self.path, self.data, self.tool = Path(path), data, tool
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        self.used.add(key)
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default: Any, kinds: tuple[type, ...], allowed: str = "") -> Any:
        """The key's value (default when absent or null), checked against `kinds`; `allowed` replaces the
        message's "must be <kinds>"."""
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            return default
        if not _is_kind(value, kinds):
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise ConfigError(self.path, key, value, allowed or f"must be {names}")
        return value

    def choice(self, key: str, default: Any, allowed: tuple[Any, ...]) -> Any:
        value = self.get(key, default, (str, int, bool))
        if value not in allowed:
            raise ConfigError(self.path, key, value, f"allowed: {', '.join(map(str, allowed))}")
        return value

    def positive(self, key: str, default: int | None) -> int | None:
        value = self.get(key, default, (int,), "must be an integer >= 1")
        if value is not None and value < 1:
            raise ConfigError(self.path, key, value, "must be an integer >= 1")
        return value

    def src(self, key: str, doc: str) -> str:
        """Where a value came from: the file's key, or the tool's default (with its source)."""
        if key in self.data and self.data[key] is not None:
            return f"{self.path.name}: {key}"
        return f"{self.tool} default ({doc})"

    def unused(self) -> list[str]:
        return sorted(k for k in self.data if k not in self.used)


@dataclass
class Reading:
    """What a reader made of one training config: spec fields with their sources, the precision
    inputs (resolved with the distributed setup in analysis.check.mapping), and what it could not model."""

    tool: str
    path: Path
    fields: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    unmodelled: list[Unmodelled] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    model_key: str = "model_name_or_path"
    #: Mixed precision (autocast) dtype: "bf16" / "fp16" / None, and the key that set it.
    amp: str | None = None
    amp_source: str = ""
    #: Dtype the model's weights are loaded in: "bf16" / "fp16" / "fp32" / "auto" (the checkpoint's own).
    load_dtype: str = "auto"
    load_source: str = ""
    #: The tool casts trainable parameters to fp32 itself (LLaMA-Factory without pure_bf16).
    trainable_fp32: bool = False
    #: A DeepSpeed config the file names (path string or inline dict) and the key naming it.
    deepspeed: Any = None
    deepspeed_key: str = ""
    #: FSDP settings the file holds (analysis.check.distributed.FsdpSetting), if any.
    fsdp: Any = None
    #: The file's own keys and values, for errors that quote what the file says.
    raw: dict[str, Any] = field(default_factory=dict)
    #: Facts a reader leaves for the mapping, which knows the model (rope_scaling, default LoRA targets).
    later: dict[str, Any] = field(default_factory=dict)
    #: Liger kernels asked for: {"key", "kernels": {name: on}, "file"}; resolved once the model is known.
    liger: dict[str, Any] | None = None

    def set(self, name: str, value: Any, source: str) -> None:
        self.fields[name], self.sources[name] = value, source

    def flag(self, key: str, value: Any, why: str, effect: str, file: Path | None = None) -> None:
        assert effect in EFFECTS, effect
        self.unmodelled.append(Unmodelled(str(file or self.path), key, value, why, effect))

    def assume(self, text: str) -> None:
        self.assumptions.append(text)
