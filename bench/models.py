"""Shipped architecture configs (no weights) and the arithmetic of their parameter counts.

Memory does not depend on weight values, so ftmem builds models from these configs with random
weights. The full-size entries copy the architecture fields of the published Qwen3 config.json
files; the tiny entries keep the same architecture (GQA, QK-norm, SwiGLU, RMSNorm) at a size that
trains on a CPU in seconds. This module imports no torch, so `analysis/` can use it anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

_QWEN3_COMMON = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_act": "silu",
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "initializer_range": 0.02,
    "use_cache": False,
}


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tie: bool, **extra: Any) -> dict:
    return {
        **_QWEN3_COMMON,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "tie_word_embeddings": tie,
        **extra,
    }


_TINY = {"head_dim": 16, "num_key_value_heads": 2, "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 1}

ARCHITECTURES: MappingProxyType[str, dict] = MappingProxyType(
    {
        "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tie=True),
        "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tie=True),
        "qwen3-4b": _qwen3(2560, 9728, 36, 32, tie=True),
        "qwen3-8b": _qwen3(4096, 12288, 36, 32, tie=False),
        "qwen3-14b": _qwen3(5120, 17408, 40, 40, tie=False),
        "qwen3-32b": _qwen3(5120, 25600, 64, 64, tie=False),
        # Tiny test configs of the same architecture (GQA 4:2, QK-norm, untied head).
        "qwen3-tiny": _qwen3(64, 192, 2, 4, tie=False, **_TINY),
        "qwen3-tiny-tied": _qwen3(64, 192, 2, 4, tie=True, **_TINY),
    }
)

LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnknownModelError(ValueError):
    """Raised for a model name that is neither shipped nor a checkpoint folder."""


def is_checkpoint_dir(model: str) -> bool:
    """A local folder with a config.json counts as a checkpoint (real weights where present)."""
    return (Path(model) / "config.json").is_file()


def architecture(model: str) -> dict:
    """The config dict of a shipped architecture name or of a local checkpoint folder."""
    if model in ARCHITECTURES:
        return dict(ARCHITECTURES[model])
    if is_checkpoint_dir(model):
        return json.loads((Path(model) / "config.json").read_text())
    raise UnknownModelError(
        f"model: {model!r} is not a shipped architecture ({', '.join(ARCHITECTURES)}) "
        "nor a folder holding a config.json"
    )


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the seven linear projections of one decoder layer."""
    hidden, inter = arch["hidden_size"], arch["intermediate_size"]
    head_dim = arch.get("head_dim") or hidden // arch["num_attention_heads"]
    q_out = arch["num_attention_heads"] * head_dim
    kv_out = arch["num_key_value_heads"] * head_dim
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def parameter_counts(arch: dict) -> dict[str, int]:
    """Parameter counts by group: embedding, lm_head (0 when tied), linear layers, norms, total."""
    hidden, layers, vocab = arch["hidden_size"], arch["num_hidden_layers"], arch["vocab_size"]
    head_dim = arch.get("head_dim") or hidden // arch["num_attention_heads"]
    linear = layers * sum(i * o for i, o in linear_shapes(arch).values())
    # input_layernorm + post_attention_layernorm (hidden each), q_norm + k_norm (head_dim each); final norm.
    norms = layers * (2 * hidden + 2 * head_dim) + hidden
    embedding = vocab * hidden
    lm_head = 0 if arch.get("tie_word_embeddings") else vocab * hidden
    total = embedding + lm_head + linear + norms
    return {"embedding": embedding, "lm_head": lm_head, "linear": linear, "norms": norms, "total": total}


def lora_parameter_count(arch: dict, r: int, targets: tuple[str, ...]) -> int:
    """LoRA A (r x in) and B (out x r) parameters over every decoder layer's targeted projections."""
    shapes = linear_shapes(arch)
    return arch["num_hidden_layers"] * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
