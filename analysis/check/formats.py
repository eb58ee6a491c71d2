"""Which tool a config file is for, recognised by the keys only that tool uses. Imports no torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis.check import axolotl, llamafactory, trl
from analysis.check.source import Config, ConfigError, Reading, missing

#: Format name -> (tool, keys that only that tool's configs hold).
SIGNATURES: dict[str, tuple[str, frozenset[str]]] = {
    "llamafactory": (
        "LLaMA-Factory",
        frozenset(
            {
                "finetuning_type",
                "stage",
                "cutoff_len",
                "template",
                "lora_target",
                "lora_rank",
                "quantization_bit",
                "dataset_dir",
                "flash_attn",
                "enable_liger_kernel",
                "disable_gradient_checkpointing",
                "pure_bf16",
                "neat_packing",
                "use_reentrant_gc",
                "double_quantization",
                "quantization_type",
                "additional_target",
            }
        ),
    ),
    "axolotl": (
        "axolotl",
        frozenset(
            {
                "base_model",
                "adapter",
                "sequence_len",
                "micro_batch_size",
                "sample_packing",
                "lora_target_linear",
                "flash_attention",
                "sdp_attention",
                "optimizer",
                "num_epochs",
                "val_set_size",
                "lora_model_dir",
                "pad_to_sequence_len",
                "special_tokens",
                "plugins",
                "wandb_project",
                "dataset_prepared_path",
            }
        ),
    ),
    "trl": (
        "TRL",
        frozenset(
            {
                "use_peft",
                "max_length",
                "max_seq_length",
                "packing",
                "padding_free",
                "lora_r",
                "lora_target_modules",
                "dataset_text_field",
                "completion_only_loss",
                "assistant_only_loss",
                "use_bnb_nested_quant",
                "bnb_4bit_quant_type",
                "loss_type",
                "activation_offloading",
                "model_init_kwargs",
                "packing_strategy",
                "dataset_train_split",
                "lora_modules_to_save",
                "eos_token",
            }
        ),
    ),
    "hf": (
        "HF TrainingArguments",
        frozenset(
            {
                "per_device_train_batch_size",
                "output_dir",
                "block_size",
                "logging_steps",
                "save_strategy",
                "overwrite_output_dir",
                "train_file",
                "num_train_epochs",
                "eval_strategy",
                "lr_scheduler_type",
            }
        ),
    ),
}
DEEPSPEED_KEYS = frozenset(
    {
        "zero_optimization",
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "zero_allow_untested_optimizer",
        "steps_per_print",
        "wall_clock_breakdown",
    }
)
ACCELERATE_KEYS = frozenset(
    {
        "distributed_type",
        "compute_environment",
        "num_processes",
        "machine_rank",
        "main_training_function",
        "num_machines",
    }
)
READERS: dict[str, Callable[[Config], Reading]] = {
    "llamafactory": llamafactory.read,
    "axolotl": axolotl.read,
    "trl": trl.read_trl,
    "hf": trl.read_hf,
}
FORMATS = tuple(READERS)


def _scores(data: dict[str, Any]) -> dict[str, int]:
    keys = set(data)
    scores = {name: len(keys & sig) for name, (_, sig) in SIGNATURES.items()}
    # HF TrainingArguments keys sit in every Trainer-based config: they only decide when nothing else does.
    if any(scores[n] for n in ("llamafactory", "trl")):
        scores["hf"] = 0
    return scores


def detect(path: Path, data: dict[str, Any]) -> str:
    """The training format of a config, or a ConfigError saying what each format is recognised by."""
    if data.keys() & DEEPSPEED_KEYS:
        raise missing(
            path, "(format)", "is a DeepSpeed config: pass it beside the training config with --deepspeed"
        )
    if data.keys() & ACCELERATE_KEYS:
        raise missing(
            path,
            "(format)",
            "is an accelerate config: pass it beside the training config with --accelerate-config",
        )
    scores = _scores(data)
    best = max(scores.values())
    winners = [name for name, score in scores.items() if score == best]
    if best == 0 or len(winners) > 1:
        hints = "; ".join(f"{tool}: {', '.join(sorted(sig)[:6])}..." for tool, sig in SIGNATURES.values())
        found = "holds no key of any" if best == 0 else f"holds keys of {' and '.join(winners)} alike:"
        raise missing(
            path,
            "(format)",
            f"{found} training format ftmem reads; pass --format "
            f"{{{', '.join(FORMATS)}}} or use a tool's keys ({hints})",
        )
    return winners[0]


def read_training(path: Path, data: dict[str, Any], fmt: str | None = None) -> Reading:
    name = fmt or detect(path, data)
    if name not in READERS:
        raise ConfigError(path, "--format", name, f"allowed: {', '.join(FORMATS)}")
    reading = READERS[name](Config(path, data, SIGNATURES[name][0]))
    reading.raw = data
    return reading
