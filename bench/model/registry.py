"""Which model a name means, and its config: shipped configs, hub ids, local folders, the HF cache.

Memory does not depend on weight values, so ftmem builds models from configs with random weights.
`bench/model/configs/*.json` are the published config.json files of the families people fine-tune (their
architecture fields; `_name_or_path` is the hub id), named by a short name. A model is a short name, a
hub id of a shipped config (`meta-llama/Llama-3.1-8B`), a local folder holding a config.json (weights
optional), or a hub id found in the local Hugging Face cache. Nothing is downloaded.

A multimodal config (a `text_config` inside) trains its language model: `architecture()` returns the
text config, marked `_multimodal`. This module imports no torch, so `analysis/` can use it anywhere.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bench.model.arch import FAMILIES, Arch, UnsupportedArchitecture, describe

CONFIG_DIR = Path(__file__).parent / "configs"

#: Standard deviation of ftmem's random weights (bench.model.build draws every weight from N(0, INIT_STD^2);
#: norm weights are ones). It fixes how many outliers LLM.int8 meets (analysis.predict.int8).
INIT_STD = 0.02

#: Qwen3's (and Llama's, Mistral's, ...) seven projections: the default LoRA targets of a spec.
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"

_TINY = {"head_dim": 16, "num_key_value_heads": 2, "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 1}


def _tiny(base: str, **extra: Any) -> dict:
    """A test config of the family of shipped config `base` at a size that trains on a CPU in seconds."""
    config = {k: v for k, v in _load_json(CONFIG_DIR / f"{base}.json").items() if k != "_name_or_path"}
    small = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4}
    if "pad_token_id" in config:  # inside the tiny vocabulary
        small["pad_token_id"] = 0
    return {**config, **small, **_TINY, "tie_word_embeddings": False, **extra}


class UnknownModelError(ValueError):
    """A model name that is neither shipped, nor a folder with a config.json, nor in the local HF cache."""


class ModelConfigError(UnknownModelError):
    """A config.json that cannot describe a model: the message names the file, the key and the value."""

    def __init__(self, path: str, key: str, value: Any, allowed: str):
        self.path, self.key, self.value = path, key, value
        super().__init__(f"{path}: {key}: {value!r} is not usable; {allowed}")


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelConfigError(str(path), "(file)", "unreadable", f"a readable JSON object is needed ({err})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(str(path), "(file)", type(data).__name__, "a JSON object is needed")
    return data


@cache
def _shipped() -> MappingProxyType:
    configs = {p.stem: MappingProxyType(_load_json(p)) for p in sorted(CONFIG_DIR.glob("*.json"))}
    configs["qwen3-tiny"] = MappingProxyType(_tiny("qwen3-8b"))
    configs["qwen3-tiny-tied"] = MappingProxyType(_tiny("qwen3-8b", tie_word_embeddings=True))
    for family, base in (("llama", "llama-3.2-1b"), ("mistral", "mistral-7b-v0.3"), ("qwen2", "qwen2.5-7b"),
                         ("phi3", "phi-4"), ("olmo2", "olmo-2-7b")):
        configs[f"{family}-tiny"] = MappingProxyType(_tiny(base))
    # Gemma 3's pattern (sliding layers, then a full one) with a window the tests' sequences pass.
    moe = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    configs["qwen3moe-tiny"] = MappingProxyType(_tiny("qwen3-30b-a3b", **moe))
    configs["qwen2moe-tiny"] = MappingProxyType(_tiny("qwen1.5-moe-a2.7b", **moe, shared_expert_intermediate_size=64))
    configs["mixtral-tiny"] = MappingProxyType(_tiny("mixtral-8x7b", num_local_experts=4, intermediate_size=48))
    pattern = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    configs["gemma3-tiny"] = MappingProxyType(_tiny("gemma-3-1b", num_hidden_layers=6, sliding_window=8,
                                                    layer_types=pattern, query_pre_attn_scalar=16))
    return MappingProxyType(configs)


#: name -> config dict of every shipped model.
ARCHITECTURES: MappingProxyType[str, MappingProxyType] = _shipped()

#: hub id (lower case) -> shipped short name.
HUB_IDS: MappingProxyType[str, str] = MappingProxyType(
    {c["_name_or_path"].lower(): name for name, c in ARCHITECTURES.items() if "_name_or_path" in c}
)


def is_checkpoint_dir(model: str) -> bool:
    """A local folder with a config.json (its weights, where saved, are loaded)."""
    return (Path(model) / "config.json").is_file()


def _hf_cache_snapshot(model_id: str) -> Path | None:
    """The newest snapshot folder of `model_id` in the local Hugging Face cache that holds a config.json."""
    if model_id.count("/") != 1:
        return None
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub"
    )
    snapshots = Path(home) / f"models--{model_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def resolve(model: str) -> str:
    """The shipped short name or local folder that `model` means (a hub id of a shipped config becomes
    its short name, so both name one cell); UnknownModelError, with what is allowed, otherwise."""
    if model in ARCHITECTURES:
        return model
    if model.lower() in HUB_IDS:
        return HUB_IDS[model.lower()]
    if is_checkpoint_dir(model):
        return model
    cached = _hf_cache_snapshot(model)
    if cached is not None:
        return str(cached)
    raise UnknownModelError(
        f"model: {model!r} is not a shipped model (`ftmem models` lists them, by short name or hub id), "
        "a folder holding a config.json, nor a hub id in the local Hugging Face cache (nothing is downloaded)"
    )


def architecture(model: str) -> dict:
    """The (text) config dict of a model name, hub id or folder; multimodal configs give their text_config
    with `_multimodal: True`. Raises UnknownModelError / ModelConfigError naming what is wrong."""
    name = resolve(model)
    if name in ARCHITECTURES:
        return text_config(dict(ARCHITECTURES[name]), f"bench/model/configs/{name}.json")
    path = Path(name) / "config.json"
    return text_config(_load_json(path), str(path))


def text_config(config: dict, source: str) -> dict:
    """The language model's config: a multimodal config's `text_config`, else the config itself, checked."""
    inner = config.get("text_config")
    if inner is not None:
        if not isinstance(inner, dict):
            raise ModelConfigError(source, "text_config", inner, "a JSON object (the language model's config)")
        outer = config.get("model_type")
        config = {**inner, "_multimodal": True, "_multimodal_type": outer}
        config.setdefault("model_type", f"{outer}_text")
    check_config(config, source)
    return config


#: Fields every decoder-only config needs, with the type each must have (a family's defaults may fill them).
_REQUIRED = {
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "vocab_size": int,
    "max_position_embeddings": int,
}


def check_config(config: dict, source: str) -> None:
    """Refuse a config whose memory-relevant fields are missing or of the wrong type, naming the field."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelConfigError(source, "model_type", model_type, "a transformers model_type such as 'llama'")
    defaults = FAMILIES[model_type].defaults if model_type in FAMILIES else {}
    for key, kind in _REQUIRED.items():
        value = config.get(key, defaults.get(key))
        if value is None and model_type not in FAMILIES:
            continue  # transformers' own defaults apply; the predictor refuses such a model anyway
        if isinstance(value, bool) or not isinstance(value, kind) or value < 1:
            raise ModelConfigError(source, key, value, "a positive integer")
    for key in ("num_key_value_heads", "head_dim"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelConfigError(source, key, value, "a positive integer or null")


def description(model: str) -> Arch:
    """The architecture description (bench.model.arch) of a model; UnsupportedArchitecture for other families."""
    return describe(architecture(model))


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the linear projections of one decoder layer, by module name."""
    return {p.name: (p.fan_in, p.fan_out) for p in describe(arch).projections}


def parameter_counts(arch: dict) -> dict[str, int]:
    """Parameter counts by group: embedding, lm_head (0 when tied), linear layers, norms and biases, total."""
    a = describe(arch)
    norms = a.layers * (sum(a.layer_norm_widths) + sum(a.layer_bias_widths)) + a.hidden
    linear = a.total_params - a.embedding_params - a.lm_head_params - norms
    return {
        "embedding": a.embedding_params,
        "lm_head": a.lm_head_params,
        "linear": linear,
        "norms": norms,
        "total": a.total_params,
    }


def lora_targets(arch: dict, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The projections LoRA adapts: `all-linear` is every linear layer of a decoder layer (never lm_head,
    never the experts' 3-D parameters, which peft targets by parameter name)."""
    return describe(arch).projection_names if tuple(targets) == (ALL_LINEAR,) else tuple(targets)


def lora_target_names(arch: dict) -> tuple[str, ...]:
    """Every name a spec's lora_targets may hold for this model: its linear layers and, for an MoE model,
    its experts' parameters."""
    a = describe(arch)
    return a.projection_names + (a.moe.expert_parameter_names if a.moe else ())


def lora_shapes(arch: dict, target: str) -> tuple[int, int, int]:
    """(copies, in, out) of LoRA on one target of a layer: a linear layer has one A (r x in) and B (out x r);
    an expert parameter (E x out x in) under peft's ParamWrapper has A (E r x in) and B (out x E r)."""
    a = describe(arch)
    if a.moe is not None and target in a.moe.expert_parameter_names:
        return a.moe.stacks(a.hidden)[target]
    p = a.projection(target)
    return 1, p.fan_in, p.fan_out


def lora_parameter_count(arch: dict, r: int, targets: tuple[str, ...]) -> int:
    """LoRA A and B parameters over every decoder layer's targeted projections (and expert parameters,
    on the MoE layers)."""
    a = describe(arch)
    total = 0
    for t in lora_targets(arch, targets):
        copies, fan_in, fan_out = lora_shapes(arch, t)
        layers = sum(a.moe.sparse) if copies > 1 or (a.moe and t.startswith("shared")) else a.layers
        total += layers * copies * r * (fan_in + fan_out)
    return total


__all__ = [
    "ALL_LINEAR",
    "ARCHITECTURES",
    "HUB_IDS",
    "LINEAR_PROJECTIONS",
    "ModelConfigError",
    "UnknownModelError",
    "UnsupportedArchitecture",
    "architecture",
    "description",
    "is_checkpoint_dir",
    "linear_shapes",
    "lora_parameter_count",
    "lora_targets",
    "parameter_counts",
    "resolve",
]
