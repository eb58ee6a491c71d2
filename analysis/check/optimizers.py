"""Optimizer names of the tools, mapped to ftmem's (bench.spec.OPTIMIZERS), and the ones ftmem does not
build with what the prediction assumes instead. Imports no torch."""

from __future__ import annotations

from typing import Any

from analysis.check.source import Config, Reading

#: HF TrainingArguments `optim` (transformers training_args.OptimizerNames; axolotl's `optimizer` takes the
#: same names) -> ftmem optimizer. transformers trainer_optimizer.py: adamw_torch is torch.optim.AdamW with
#: torch's default implementation (foreach on CUDA), adamw_torch_fused passes fused=True; the bitsandbytes
#: names build bnb.optim.AdamW with optim_bits 8/32 and is_paged; sgd is torch.optim.SGD, no momentum.
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw_fused",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "sgd": "sgd",
}

#: Name prefix -> (effect against the AdamW ftmem predicts instead, why).
UNMODELLED = {
    "adafactor": ("lower", "Adafactor keeps factored second moments (a row and a column per matrix)"),
    "adamw_torch_4bit": ("lower", "torchao 4-bit AdamW states"),
    "adamw_torch_8bit": ("lower", "torchao 8-bit AdamW states"),
    "lion": ("lower", "Lion keeps one moment"),
    "paged_lion": ("lower", "Lion keeps one moment"),
    "adagrad": ("lower", "Adagrad keeps one state"),
    "rmsprop": ("lower", "RMSprop keeps one state"),
    "galore": ("lower", "GaLore projects the optimizer state to a low rank"),
    "apollo": ("lower", "APOLLO keeps low-rank auxiliary state"),
    "lomo": ("lower", "LOMO fuses the update into backward and keeps no moments"),
    "adalomo": ("lower", "AdaLomo fuses the update into backward"),
    "muon": ("lower", "Muon keeps one momentum buffer for matrices"),
    "adam_mini": ("lower", "Adam-mini keeps one second-moment scalar per block"),
    "badam": ("lower", "BAdam updates one block of layers at a time"),
    "ademamix": ("higher", "AdEMAMix keeps three moments"),
    "paged_ademamix": ("higher", "AdEMAMix keeps three moments"),
}


def _unmodelled(name: str) -> tuple[str, str]:
    for prefix in sorted(UNMODELLED, key=len, reverse=True):
        if name.startswith(prefix):
            return UNMODELLED[prefix]
    return "unknown", "an optimizer ftmem does not build"


def map_optimizer(r: Reading, cfg: Config, key: str, default: str, doc: str) -> None:
    """Set r.fields['optimizer'] from the tool's optimizer name; an unmodelled one is flagged and
    predicted as torch AdamW (adamw)."""
    name = cfg.get(key, default, (str,))
    if not cfg.has(key) and default == "adamw_torch_fused":
        r.assume(
            f"{key} unset: transformers' default adamw_torch_fused needs torch >= 2.8; with older torch it is "
            "adamw_torch, whose foreach step holds a temporary as large as the trainable parameters"
        )
    if name in OPTIMIZERS:
        r.set("optimizer", OPTIMIZERS[name], cfg.src(key, doc))
        _check_sgd_momentum(r, cfg, name)
        return
    effect, why = _unmodelled(name)
    r.flag(key, name, f"{why}; predicted as torch AdamW (adamw), which {effect_words(effect)}", effect)
    r.set("optimizer", "adamw", f"{cfg.path.name}: {key} (unmodelled: predicted as adamw)")


def _check_sgd_momentum(r: Reading, cfg: Config, name: str) -> None:
    """optim_args momentum=... gives SGD a momentum buffer ftmem's sgd cell does not keep."""
    args: Any = cfg.get("optim_args", None, (str, dict))
    text = str(args or "")
    if name == "sgd" and "momentum" in text:
        r.flag(
            "optim_args", args, "SGD momentum keeps one buffer per parameter ftmem's sgd cell lacks", "higher"
        )


def override_optimizer(r: Reading, key: str, value: Any, name: str) -> None:
    """A tool switch that replaces the Trainer's optimizer (LLaMA-Factory use_galore, use_badam...)."""
    effect, why = _unmodelled(name)
    r.flag(key, value, f"{why}; predicted with the configured optimizer instead", effect)


def effect_words(effect: str) -> str:
    return {
        "lower": "needs more than the real one (the prediction is an upper bound)",
        "higher": "needs less than the real one (the prediction is a lower bound)",
        "unknown": "may need more or less",
    }[effect]
