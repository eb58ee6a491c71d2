"""axolotl training YAML (`axolotl train CONFIG.yaml`) read into spec fields.

Defaults and behaviour cited from axolotl-ai-cloud/axolotl src/axolotl/: utils/schemas/config.py (bf16 auto,
gradient_checkpointing False, sequence_len 512), utils/schemas/training.py (micro_batch_size 1,
gradient_accumulation_steps 1, optimizer adamw_torch_fused), utils/schemas/peft.py (lora_dropout 0.0,
no default rank / alpha / targets), loaders/model.py (QLoRA's BitsAndBytesConfig: nf4 with double
quantization, compute dtype = torch_dtype; norms and embeddings cast back to torch_dtype after
prepare_model_for_kbit_training).
"""

from __future__ import annotations

from typing import Any

from analysis.check.distributed import fsdp_from_config
from analysis.check.optimizers import map_optimizer
from analysis.check.source import Config, ConfigError, Reading, missing
from analysis.check.trainer_args import read_gc_kwargs

TOOL = "axolotl"
SC = "schemas/config.py"

ATTENTION = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager"}
UNMODELLED = {
    "flex_attention": ("unknown", "flex attention; predicted as SDPA"),
    "xformers_attention": ("unknown", "xformers attention; predicted as SDPA"),
    "s2_attention": ("unknown", "shifted sparse attention; predicted as SDPA"),
    "flash_attn_cross_entropy": ("lower", "flash-attn's cross-entropy kernel"),
    "flash_attn_rms_norm": ("lower", "flash-attn's RMSNorm kernel"),
    "flash_attn_fuse_qkv": ("unknown", "fused QKV projection"),
    "flash_attn_fuse_mlp": ("unknown", "fused MLP"),
    "unsloth_cross_entropy_loss": ("lower", "unsloth's cross-entropy kernel"),
    "unsloth_lora_mlp": ("lower", "unsloth's LoRA MLP kernel"),
    "unsloth_lora_qkv": ("lower", "unsloth's LoRA QKV kernel"),
    "unsloth_lora_o": ("lower", "unsloth's LoRA O kernel"),
    "unsloth_rms_norm": ("lower", "unsloth's RMSNorm kernel"),
    "unsloth_rope": ("lower", "unsloth's RoPE kernel"),
    "lora_mlp_kernel": ("lower", "axolotl's LoRA MLP kernel"),
    "lora_qkv_kernel": ("lower", "axolotl's LoRA QKV kernel"),
    "lora_o_kernel": ("lower", "axolotl's LoRA O kernel"),
    "cut_cross_entropy": ("lower", "Cut Cross Entropy never materialises the logits"),
    "activation_offloading": ("lower", "activations held in host memory"),
    "peft_use_dora": ("higher", "DoRA keeps a weight-norm magnitude and its activations per adapted layer"),
    "lora_modules_to_save": ("higher", "modules trained in full beside LoRA (peft modules_to_save)"),
    "peft_layers_to_transform": ("lower", "LoRA on some layers only"),
    "peft_layer_replication": ("higher", "replicated layers"),
    "relora": ("unknown", "ReLoRA restarts"),
    "neftune_noise_alpha": ("higher", "NEFTune adds a noise tensor to the embeddings in every forward"),
    "torch_compile": ("unknown", "the Trainer compiles the whole model; ftmem models eager layers"),
    "tokens": ("higher", "new tokens resize the embedding and lm_head"),
    "qat": ("unknown", "quantization-aware training"),
}
LIGER_FLAGS = {
    "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "liger_rms_norm": "rms_norm",
    "liger_glu_activation": "swiglu",
    "liger_rope": "rope",
    "liger_layer_norm": "layer_norm",
    "liger_cross_entropy": "cross_entropy",
}
HARMLESS = frozenset(
    {
        "datasets",
        "test_datasets",
        "dataset_prepared_path",
        "output_dir",
        "num_epochs",
        "learning_rate",
        "lr_scheduler",
        "lr_scheduler_kwargs",
        "cosine_min_lr_ratio",
        "warmup_steps",
        "warmup_ratio",
        "logging_steps",
        "saves_per_epoch",
        "evals_per_epoch",
        "eval_steps",
        "save_steps",
        "save_strategy",
        "eval_strategy",
        "save_total_limit",
        "max_steps",
        "wandb_project",
        "wandb_entity",
        "wandb_name",
        "wandb_watch",
        "wandb_log_model",
        "wandb_run_id",
        "hub_model_id",
        "chat_template",
        "chat_template_jinja",
        "default_system_message",
        "train_on_inputs",
        "group_by_length",
        "weight_decay",
        "max_grad_norm",
        "special_tokens",
        "tokenizer_type",
        "model_type",
        "tokenizer_config",
        "trust_remote_code",
        "strict",
        "seed",
        "early_stopping_patience",
        "resume_from_checkpoint",
        "auto_resume_from_checkpoints",
        "local_rank",
        "logging_dir",
        "debug",
        "tf32",
        "ddp_timeout",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "ddp_find_unused_parameters",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_prefetch_factor",
        "dataloader_drop_last",
        "lora_model_dir",
        "lora_fan_in_fan_out",
        "shuffle_merged_datasets",
        "dataset_processes",
        "eval_table_size",
        "eval_max_new_tokens",
        "load_best_model_at_end",
        "save_first_step",
        "use_tensorboard",
        "save_safetensors",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "optim_args",
        "hf_use_auth_token",
        "push_dataset_to_hub",
        "tokenizer_legacy",
        "tokenizer_use_fast",
        "skip_prepare_dataset",
        "is_llama_derived_model",
        "is_mistral_derived_model",
        "is_qwen_derived_model",
        "is_falcon_derived_model",
        "peft_use_rslora",
        "embeddings_skip_upcast",
        "sample_packing_eff_est",
        "total_num_tokens",
        "plugins",
        "revision_of_model",
        "processor_type",
        "eval_batch_size",
        "val_set_size",
        "eval_sample_packing",
        "pad_to_sequence_len",
        "sample_packing_group_size",
        "sample_packing_bin_size",
        "pretrain_multipack_attn",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "save_only_model",
        "include_tokens_per_second",
        "gc_steps",
        "max_prompt_len",
        "low_cpu_mem_usage",
        "fsdp_final_state_dict_type",
        "unfrozen_parameters",
    }
)


def read(cfg: Config) -> Reading:
    r = Reading(TOOL, cfg.path, model_key="base_model")
    _refuse(cfg)
    if not cfg.has("base_model"):
        raise missing(cfg.path, "base_model", "is required (the model to train)")
    r.set("model", cfg.get("base_model", None, (str,)), f"{cfg.path.name}: base_model")
    method = _method(cfg, r)
    if method != "full":
        _lora(cfg, r)
    _sequence_and_batch(cfg, r)
    map_optimizer(
        r, cfg, "optimizer", "adamw_torch_fused", "schemas/training.py: optimizer adamw_torch_fused"
    )
    _precision(cfg, r, method)
    _checkpointing(cfg, r)
    _attention(cfg, r)
    _kernels(cfg, r)
    _distributed(cfg, r)
    _unmodelled(cfg, r)
    r.unrecognised = [f"{cfg.path.name}: {k}" for k in cfg.unused() if k not in HARMLESS]
    return r


def _refuse(cfg: Config) -> None:
    for key, why in (
        ("rl", "preference training (DPO, KTO, ORPO, GRPO) runs reference or reward models"),
        ("reward_model", "reward-model training"),
        ("gptq", "GPTQ bases"),
        ("process_reward_model", "process reward models"),
    ):
        if cfg.get(key, None, (bool, str)):
            raise ConfigError(cfg.path, key, cfg.data[key], f"is not an ftmem cell: {why}")


def _method(cfg: Config, r: Reading) -> str:
    adapter = cfg.get("adapter", None, (str,)) or None
    four, eight = cfg.get("load_in_4bit", False, (bool,)), cfg.get("load_in_8bit", False, (bool,))
    if adapter not in (None, "lora", "qlora"):
        raise ConfigError(cfg.path, "adapter", adapter, "allowed: lora, qlora, or none for full fine-tuning")
    if adapter is None and (four or eight):
        raise ConfigError(
            cfg.path,
            "load_in_4bit" if four else "load_in_8bit",
            True,
            "needs an adapter (axolotl refuses quantized full fine-tuning)",
        )
    if adapter == "qlora" and not four:
        raise ConfigError(cfg.path, "adapter", adapter, "needs load_in_4bit: true (axolotl schemas/peft.py)")
    if adapter == "lora" and four:
        raise ConfigError(
            cfg.path, "load_in_4bit", True, "with adapter lora: use adapter qlora for a 4-bit base"
        )
    method = "full" if adapter is None else "qlora" if adapter == "qlora" else "lora8bit" if eight else "lora"
    r.set("method", method, cfg.src("adapter", f"{SC}: no adapter trains every parameter"))
    return method


def _lora(cfg: Config, r: Reading) -> None:
    for key in ("lora_r", "lora_alpha"):
        if not cfg.has(key):
            raise missing(
                cfg.path, key, "is required with an adapter (axolotl schemas/peft.py has no default)"
            )
    r.set("lora_r", cfg.positive("lora_r", None), f"{cfg.path.name}: lora_r")
    r.set("lora_alpha", cfg.get("lora_alpha", None, (int, float)), f"{cfg.path.name}: lora_alpha")
    r.set(
        "lora_dropout",
        float(cfg.get("lora_dropout", 0.0, (float,))),
        cfg.src("lora_dropout", "schemas/peft.py: lora_dropout 0.0"),
    )
    linear = cfg.get("lora_target_linear", False, (bool,))
    targets = cfg.get("lora_target_modules", [], (str, list))
    names = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    if linear:
        names = ["all-linear"] + names
    if not names:
        raise missing(
            cfg.path,
            "lora_target_modules",
            "set it, or lora_target_linear: true (axolotl has no default targets)",
        )
    key = "lora_target_linear" if linear else "lora_target_modules"
    r.later["lora_targets"] = (key, names, f"{cfg.path.name}: {key}")


def _sequence_and_batch(cfg: Config, r: Reading) -> None:
    seq = cfg.positive("sequence_len", 512)
    r.set("seq_len", seq, cfg.src("sequence_len", f"{SC}: sequence_len 512"))
    if cfg.get("sample_packing", False, (bool,)):
        r.assume(f"sample_packing: each micro-batch row is a packed sequence of sequence_len ({seq}) tokens")
    else:
        r.assume(f"no sample packing: predicted at the worst case, every sample sequence_len ({seq}) tokens")
    micro = cfg.positive("micro_batch_size", 1)
    r.set("batch_size", micro, cfg.src("micro_batch_size", "schemas/training.py: micro_batch_size 1"))
    accum = cfg.positive("gradient_accumulation_steps", None)
    total = cfg.positive("batch_size", None)
    if accum is None and total is not None:
        # axolotl's normalize_config: gradient_accumulation_steps = batch_size // micro_batch_size // world size.
        r.later["total_batch"] = (total, micro)
        accum = max(1, total // micro)
    r.set(
        "grad_accum",
        accum or 1,
        cfg.src(
            "gradient_accumulation_steps" if accum else "batch_size",
            "schemas/training.py: gradient_accumulation_steps 1",
        ),
    )


def _precision(cfg: Config, r: Reading, method: str) -> None:
    """bf16 auto -> bf16 AMP on a bf16 GPU; bfloat16 / float16 load the model in that dtype without AMP.
    axolotl's torch_dtype: bf16 under bf16 or bfloat16, fp16 under fp16, float16 or load_in_8bit, else fp32."""
    bf16 = cfg.get("bf16", "auto", (bool, str))
    if bf16 not in ("auto", True, False):
        raise ConfigError(cfg.path, "bf16", bf16, "allowed: auto, true, false")
    fp16 = cfg.get("fp16", False, (bool,))
    if bf16 == "auto":
        bf16 = not fp16
        r.assume("bf16: auto is bf16 on a bf16 GPU (every card since Ampere; a T4 gets fp16, the same size)")
    pure16, pure_bf = cfg.get("float16", False, (bool,)), cfg.get("bfloat16", False, (bool,))
    r.amp = "bf16" if bf16 else "fp16" if fp16 else None
    r.amp_source = cfg.src("bf16" if bf16 or not fp16 else "fp16", f"{SC}: bf16 auto")
    eight = method == "lora8bit"
    r.load_dtype = "bf16" if bf16 or pure_bf else "fp16" if fp16 or pure16 or eight else "fp32"
    r.load_source = f"{TOOL} torch_dtype (from {r.amp_source})"
    if method in ("qlora", "lora8bit"):
        r.set(
            "kbit_fp32_upcast",
            False,
            f"{TOOL} loaders/model.py (norms and embeddings cast back to torch_dtype)",
        )
    if method == "qlora":
        _bnb(cfg, r)


def _bnb(cfg: Config, r: Reading) -> None:
    extra = cfg.get("bnb_config_kwargs", {}, (dict,))
    qtype = extra.get("bnb_4bit_quant_type", "nf4")
    if qtype not in ("nf4", "fp4"):
        raise ConfigError(cfg.path, "bnb_config_kwargs.bnb_4bit_quant_type", qtype, "allowed: nf4, fp4")
    r.set("quant_type", qtype, f"{TOOL} loaders/model.py (nf4)")
    r.set(
        "double_quant",
        bool(extra.get("bnb_4bit_use_double_quant", True)),
        f"{TOOL} loaders/model.py (bnb_4bit_use_double_quant True)",
    )
    compute = {"bf16": "bf16", "fp16": "fp16"}.get(r.load_dtype, "fp32")
    r.set("quant_compute_dtype", compute, f"{TOOL} loaders/model.py (bnb_4bit_compute_dtype = torch_dtype)")


def _checkpointing(cfg: Config, r: Reading) -> None:
    gc = cfg.get("gradient_checkpointing", False, (bool, str))
    if gc not in (True, False, "unsloth", "offload"):
        raise ConfigError(cfg.path, "gradient_checkpointing", gc, "allowed: true, false, unsloth, offload")
    if gc in ("unsloth", "offload"):
        r.flag("gradient_checkpointing", gc, "checkpointed layer inputs held in host memory", "lower")
    r.set("gradient_checkpointing", bool(gc), cfg.src("gradient_checkpointing", f"{SC}: False"))
    if gc:
        # axolotl's config validation sets use_reentrant False unless given (its tests assert it).
        read_gc_kwargs(
            cfg, r, "gradient_checkpointing_kwargs", False, f"{TOOL} config validation: use_reentrant False"
        )


def _attention(cfg: Config, r: Reading) -> None:
    chosen = [k for k in ATTENTION if cfg.get(k, False, (bool,))]
    if len(chosen) > 1:
        raise ConfigError(cfg.path, chosen[1], True, f"and {chosen[0]}: only one attention may be set")
    impl = ATTENTION[chosen[0]] if chosen else "sdpa"
    r.set(
        "attn_impl",
        impl,
        cfg.src(chosen[0], "") if chosen else f"{TOOL}: none set, transformers' default sdpa",
    )


def _kernels(cfg: Config, r: Reading) -> None:
    """The liger plugin's switches (axolotl integrations/liger): only the fused linear CE is an ftmem knob."""
    plugins: Any = cfg.get("plugins", [], (list,))
    kernels = {name: bool(cfg.get(key, False, (bool,))) for key, name in LIGER_FLAGS.items()}
    if any(kernels.values()):
        if not any("liger" in str(p).lower() for p in plugins):
            r.assume(
                "liger_* keys without the liger plugin in plugins: axolotl ignores them; predicted without"
            )
            return
        r.liger = {"key": "liger_fused_linear_cross_entropy", "kernels": kernels, "file": cfg.path}


def _distributed(cfg: Config, r: Reading) -> None:
    ds = cfg.get("deepspeed", None, (str, dict))
    if ds is not None:
        r.deepspeed, r.deepspeed_key = ds, "deepspeed"
    fsdp = cfg.get("fsdp", None, (list, str, bool))
    config = cfg.get("fsdp_config", None, (dict,))
    if fsdp or config:
        version = cfg.get("fsdp_version", None, (int,))
        merged = {**(config or {}), **({"version": version} if version else {})}
        items = (
            fsdp.split()
            if isinstance(fsdp, str)
            else [str(i) for i in fsdp]
            if isinstance(fsdp, list)
            else []
        )
        # axolotl hands FSDP to accelerate, whose FSDP_VERSION defaults to 1.
        r.fsdp = fsdp_from_config(cfg.path, "fsdp_config", merged, 1, items)


def _unmodelled(cfg: Config, r: Reading) -> None:
    for key, (effect, why) in UNMODELLED.items():
        value = cfg.get(key, None, (bool, str, int, float, list, dict))
        if value:
            r.flag(key, value, why, effect)
    for key in ("sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size"):
        size = cfg.get(key, 1, (int,))
        if size > 1:
            r.flag(key, size, "the sequence / tensors split across GPUs", "lower")
    if cfg.get("val_set_size", 0.0, (float,)) or cfg.has("test_datasets"):
        size = cfg.get("eval_batch_size", None, (int,)) or r.fields["batch_size"]
        r.flag(
            "val_set_size",
            cfg.data.get("val_set_size"),
            f"evaluation runs no-grad forwards at batch {size}; ftmem predicts the training step only",
            "unknown",
        )
