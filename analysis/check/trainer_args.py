"""The HF TrainingArguments keys that change memory, shared by the readers of LLaMA-Factory (whose
TrainingArguments subclass transformers' Seq2SeqTrainingArguments), TRL (SFTConfig subclasses
TrainingArguments) and plain HF TrainingArguments JSON. Each tool passes its own defaults.

Defaults cited from transformers 5.17, src/transformers/training_args.py unless said otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from analysis.check.distributed import read_trainer_fsdp
from analysis.check.optimizers import map_optimizer
from analysis.check.source import Config, ConfigError, Reading

TA = "transformers training_args.py"


@dataclass(frozen=True)
class TrainerDefaults:
    """A tool's defaults for the TrainingArguments keys it inherits."""

    gradient_checkpointing: bool = False
    gc_doc: str = f"{TA}: gradient_checkpointing False"
    #: None: "True unless fp16" (TRL's _BaseConfig.__post_init__).
    bf16: bool | None = False
    bf16_doc: str = f"{TA}: bf16 False"


def read_trainer_args(cfg: Config, r: Reading, d: TrainerDefaults) -> None:
    """Batch, accumulation, optimizer, mixed precision, checkpointing, kernels, extras, DeepSpeed/FSDP refs."""
    batch = cfg.positive("per_device_train_batch_size", 8)
    r.set("batch_size", batch, cfg.src("per_device_train_batch_size", f"{TA}: 8"))
    accum = cfg.positive("gradient_accumulation_steps", 1)
    r.set("grad_accum", accum, cfg.src("gradient_accumulation_steps", f"{TA}: 1"))
    # training_args.py: default_optim is adamw_torch_fused with torch >= 2.8, else adamw_torch.
    map_optimizer(r, cfg, "optim", "adamw_torch_fused", f"{TA}: adamw_torch_fused (torch >= 2.8)")
    read_amp(cfg, r, d)
    read_checkpointing(cfg, r, d.gradient_checkpointing, d.gc_doc)
    read_liger(cfg, r, "use_liger_kernel")
    read_extras(cfg, r)
    read_distributed_refs(cfg, r)


def read_amp(cfg: Config, r: Reading, d: TrainerDefaults) -> None:
    fp16 = cfg.get("fp16", False, (bool,))
    bf16 = cfg.get("bf16", d.bf16, (bool,))
    if bf16 is None:
        bf16 = not fp16
    if bf16 and fp16:
        raise ConfigError(
            cfg.path, "bf16", True, "and fp16: true cannot both be set (transformers refuses it)"
        )
    r.amp = "bf16" if bf16 else "fp16" if fp16 else None
    key = "bf16" if bf16 or not fp16 else "fp16"
    r.amp_source = cfg.src(key, d.bf16_doc if key == "bf16" else f"{TA}: fp16 False")


def gc_kwargs(cfg: Config, key: str = "gradient_checkpointing_kwargs") -> dict[str, Any]:
    """gradient_checkpointing_kwargs as a dict (HfArgumentParser also takes it as a JSON string)."""
    value = cfg.get(key, {}, (dict, str))
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(cfg.path, key, value, "must be a mapping or a JSON object string") from None
    if not isinstance(value, dict):
        raise ConfigError(cfg.path, key, value, "must be a mapping")
    return value


def read_checkpointing(cfg: Config, r: Reading, default: bool, doc: str) -> None:
    on = cfg.get("gradient_checkpointing", default, (bool,))
    r.set("gradient_checkpointing", on, cfg.src("gradient_checkpointing", doc))
    if on:
        read_gc_kwargs(
            cfg,
            r,
            "gradient_checkpointing_kwargs",
            False,
            "transformers modeling_utils.py gradient_checkpointing_enable: use_reentrant False",
        )


def read_gc_kwargs(cfg: Config, r: Reading, key: str, default: bool, doc: str) -> None:
    """use_reentrant -> gc_reentrant; offload / every_n_layers change memory in ways ftmem does not model."""
    kwargs = gc_kwargs(cfg, key)
    reentrant = kwargs.get("use_reentrant", default)
    if not isinstance(reentrant, bool):
        raise ConfigError(cfg.path, f"{key}.use_reentrant", reentrant, "must be true/false")
    r.set(
        "gc_reentrant",
        reentrant,
        f"{cfg.path.name}: {key}.use_reentrant" if "use_reentrant" in kwargs else doc,
    )
    for name, value in kwargs.items():
        if name == "offload" and value:
            r.flag(f"{key}.offload", value, "checkpointed activations held in host memory", "lower")
        elif name == "every_n_layers" and value not in (None, 1):
            r.flag(f"{key}.every_n_layers", value, "only every n-th layer is checkpointed", "higher")
        elif name not in ("use_reentrant", "offload", "every_n_layers", "preserve_rng_state"):
            r.flag(f"{key}.{name}", value, "a torch.utils.checkpoint option ftmem does not model", "unknown")


def read_liger(cfg: Config, r: Reading, key: str) -> None:
    """Liger kernels: only the fused linear cross-entropy is an ftmem knob; the rest is flagged once the
    model is known (analysis.check.mapping.apply_liger). liger_kernel_config may turn kernels off."""
    if not cfg.get(key, False, (bool,)):
        return
    kernels = {"fused_linear_cross_entropy": True, "rms_norm": True, "swiglu": True, "rope": True}
    kernels.update(cfg.get("liger_kernel_config", {}, (dict,)))
    r.liger = {"key": key, "kernels": kernels, "file": cfg.path}


def read_extras(cfg: Config, r: Reading) -> None:
    """TrainingArguments keys that change memory and that ftmem does not model."""
    alpha = cfg.get("neftune_noise_alpha", None, (int, float))
    if alpha:
        r.flag(
            "neftune_noise_alpha",
            alpha,
            "NEFTune adds a noise tensor to the embeddings in every forward",
            "higher",
        )
    if (
        cfg.get("torch_compile", False, (bool,))
        or cfg.has("torch_compile_backend")
        or cfg.has("torch_compile_mode")
    ):
        r.flag(
            "torch_compile",
            True,
            "the Trainer compiles the whole model; ftmem models eager layers",
            "unknown",
        )
    if cfg.get("auto_find_batch_size", False, (bool,)):
        r.flag("auto_find_batch_size", True, "the Trainer halves the batch after an OOM", "lower")
    steps = cfg.get("torch_empty_cache_steps", None, (int,))
    if steps:
        r.flag(
            "torch_empty_cache_steps", steps, "emptying the allocator cache lowers reserved memory", "lower"
        )
    read_eval(cfg, r)


def read_eval(cfg: Config, r: Reading) -> None:
    strategy = cfg.get("eval_strategy", None, (str,)) or cfg.get("evaluation_strategy", "no", (str,))
    if strategy != "no" or cfg.get("do_eval", False, (bool,)):
        size = cfg.get("per_device_eval_batch_size", 8, (int,))
        r.flag(
            "per_device_eval_batch_size",
            size,
            f"evaluation (eval_strategy {strategy}) runs no-grad forwards at this batch; ftmem predicts "
            "the training step only",
            "unknown",
        )


def read_distributed_refs(cfg: Config, r: Reading) -> None:
    """The DeepSpeed config and the FSDP settings the file names (read in analysis.check.distributed)."""
    ds = cfg.get("deepspeed", None, (str, dict))
    if ds is not None:
        r.deepspeed, r.deepspeed_key = ds, "deepspeed"
    read_trainer_fsdp(cfg, r)


#: TrainingArguments keys that do not change the GPU memory of a training step (schedules, logging,
#: saving, hub, data loading on the host, seeds, clipping thresholds, evaluation-only settings).
HARMLESS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "do_train",
        "do_eval",
        "do_predict",
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "num_train_epochs",
        "max_steps",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_ratio",
        "warmup_steps",
        "log_level",
        "logging_dir",
        "logging_strategy",
        "logging_first_step",
        "logging_steps",
        "logging_nan_inf_filter",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_safetensors",
        "save_only_model",
        "save_on_each_node",
        "seed",
        "data_seed",
        "run_name",
        "report_to",
        "disable_tqdm",
        "remove_unused_columns",
        "label_names",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "ignore_data_skip",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "resume_from_checkpoint",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_drop_last",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "ddp_timeout",
        "ddp_backend",
        "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "local_rank",
        "tf32",
        "eval_steps",
        "eval_delay",
        "eval_accumulation_steps",
        "eval_on_start",
        "prediction_loss_only",
        "per_device_eval_batch_size",
        "eval_strategy",
        "evaluation_strategy",
        "include_tokens_per_second",
        "include_num_input_tokens_seen",
        "group_by_length",
        "length_column_name",
        "past_index",
        "use_cpu",
        "full_determinism",
        "skip_memory_metrics",
        "optim_args",
        "average_tokens_across_devices",
        "label_smoothing_factor",
        "gradient_checkpointing_kwargs",
        "liger_kernel_config",
        "torch_compile_backend",
        "torch_compile_mode",
        "batch_eval_metrics",
        "use_cache",
        "project",
        "trackio_space_id",
        "bf16_full_eval",
        "fp16_full_eval",
        "half_precision_backend",
        "predict_with_generate",
        "generation_max_length",
        "generation_num_beams",
        "generation_config",
        "sortish_sampler",
        "accelerator_config",
        "restore_callback_states_from_checkpoint",
    }
)
