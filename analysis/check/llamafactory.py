"""LLaMA-Factory training YAML (`llamafactory-cli train CONFIG.yaml`) read into spec fields.

Defaults and behaviour cited from hiyouga/LLaMA-Factory src/llamafactory/: hparams/finetuning_args.py,
hparams/model_args.py, hparams/data_args.py, hparams/parser.py, model/adapter.py,
model/model_utils/checkpointing.py and attention.py. LLaMA-Factory's TrainingArguments subclass
transformers' Seq2SeqTrainingArguments, so the Trainer keys take transformers' defaults.
"""

from __future__ import annotations

from analysis.check.optimizers import override_optimizer
from analysis.check.source import Config, ConfigError, Reading, missing
from analysis.check.trainer_args import HARMLESS, TrainerDefaults, read_trainer_args

TOOL = "LLaMA-Factory"
FT = "finetuning_args.py"
MA = "model_args.py"
DA = "data_args.py"

#: flash_attn (model_args.py AttentionFunction) -> attn_impl. "auto" leaves transformers' own choice,
#: SDPA for Qwen3 (model_utils/attention.py returns without setting one).
ATTENTION = {"auto": "sdpa", "disabled": "eager", "off": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}

#: Switches that change memory in ways ftmem does not model: key -> (effect, why).
UNMODELLED = {
    "use_unsloth": ("unknown", "unsloth's patched model and LoRA kernels"),
    "use_unsloth_gc": ("lower", "unsloth's checkpointing keeps layer inputs in host memory"),
    "upcast_layernorm": ("higher", "norm weights in fp32 make their outputs fp32"),
    "upcast_lmhead_output": ("higher", "fp32 logits from lm_head"),
    "shift_attn": ("unknown", "LongLoRA shift short attention"),
    "mixture_of_depths": ("unknown", "mixture-of-depths layers"),
    "use_dora": ("higher", "DoRA keeps a weight-norm magnitude and its activations per adapted layer"),
    "pissa_init": ("unknown", "PiSSA runs an SVD of every adapted weight at start"),
    "additional_target": ("higher", "modules trained in full beside LoRA (peft modules_to_save)"),
    "resize_vocab": ("higher", "a larger embedding and lm_head"),
    "add_tokens": ("higher", "new tokens resize the embedding and lm_head"),
    "add_special_tokens": ("higher", "new tokens resize the embedding and lm_head"),
    "neat_packing": ("unknown", "packing with a block-diagonal attention mask"),
    "use_llama_pro": ("unknown", "LLaMA Pro expanded blocks"),
    "fp8": ("unknown", "FP8 training through accelerate"),
    "use_v1_kernels": ("unknown", "LLaMA-Factory's v1 kernels"),
}
OPTIMIZER_SWITCHES = {
    "use_galore": "galore",
    "use_apollo": "apollo",
    "use_badam": "badam",
    "use_adam_mini": "adam_mini",
    "use_muon": "muon",
}

HARMLESS_HERE = frozenset(
    {
        "template",
        "dataset",
        "dataset_dir",
        "eval_dataset",
        "media_dir",
        "train_on_prompt",
        "mask_history",
        "streaming",
        "buffer_size",
        "mix_strategy",
        "interleave_probs",
        "overwrite_cache",
        "preprocessing_batch_size",
        "preprocessing_num_workers",
        "max_samples",
        "eval_num_beams",
        "ignore_pad_token_for_loss",
        "val_size",
        "eval_on_each_dataset",
        "tool_format",
        "tokenized_path",
        "adapter_name_or_path",
        "adapter_folder",
        "cache_dir",
        "use_fast_tokenizer",
        "split_special_tokens",
        "model_revision",
        "low_cpu_mem_usage",
        "infer_backend",
        "offload_folder",
        "use_kv_cache",
        "infer_dtype",
        "hf_hub_token",
        "ms_hub_token",
        "om_hub_token",
        "print_param_status",
        "trust_remote_code",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "use_rslora",
        "create_new_adapter",
        "plot_loss",
        "include_effective_tokens_per_second",
        "disable_shuffling",
        "early_stopping_steps",
        "compute_accuracy",
        "freeze_vision_tower",
        "freeze_multi_modal_projector",
        "freeze_language_model",
        "pissa_iter",
        "pissa_convert",
        "quantization_device_map",
        "train_from_scratch",
        "moe_aux_loss_coef",
        "new_special_tokens_config",
        "init_special_tokens",
        "use_swanlab",
        "swanlab_project",
        "swanlab_workspace",
        "swanlab_run_name",
        "swanlab_mode",
        "swanlab_api_key",
        "swanlab_logdir",
    }
)


def read(cfg: Config) -> Reading:
    r = Reading(TOOL, cfg.path)
    _stage(cfg)
    if not cfg.has("model_name_or_path"):
        raise missing(
            cfg.path,
            "model_name_or_path",
            "is required (LLaMA-Factory model_args.py: 'Please provide `model_name_or_path`')",
        )
    r.set("model", cfg.get("model_name_or_path", None, (str,)), f"{cfg.path.name}: model_name_or_path")
    method = _method(cfg, r)
    if method != "full":
        _lora(cfg, r)
    if method == "qlora":
        _quant(cfg, r)
    _sequence(cfg, r)
    read_trainer_args(cfg, r, TrainerDefaults())
    _precision(cfg, r)
    _checkpointing(cfg, r)
    _kernels(cfg, r)
    _unmodelled(cfg, r)
    r.unrecognised = [
        f"{cfg.path.name}: {k}" for k in cfg.unused() if k not in HARMLESS and k not in HARMLESS_HERE
    ]
    return r


def _stage(cfg: Config) -> None:
    stage = cfg.choice("stage", "sft", ("pt", "sft", "rm", "ppo", "dpo", "kto"))
    if stage not in ("pt", "sft"):
        raise ConfigError(
            cfg.path,
            "stage",
            stage,
            "ftmem models one supervised step (sft or pt); rm, ppo, dpo "
            "and kto also run reward / reference models ftmem does not build",
        )


def _method(cfg: Config, r: Reading) -> str:
    ftype = cfg.choice("finetuning_type", "lora", ("lora", "full", "freeze", "oft"))
    if ftype in ("freeze", "oft"):
        raise ConfigError(
            cfg.path, "finetuning_type", ftype, "ftmem models full and lora (with 4/8-bit bases)"
        )
    bits = cfg.choice("quantization_bit", None, (None, 4, 8))
    if bits is not None:
        qmethod = cfg.choice(
            "quantization_method", "bnb", ("bnb", "hqq", "eetq", "gptq", "awq", "aqlm", "bitsandbytes")
        )
        if qmethod not in ("bnb", "bitsandbytes"):
            raise ConfigError(
                cfg.path, "quantization_method", qmethod, "ftmem models bitsandbytes (bnb) only"
            )
        if ftype != "lora":
            raise ConfigError(
                cfg.path,
                "quantization_bit",
                bits,
                "needs finetuning_type lora (LLaMA-Factory refuses quantized full fine-tuning)",
            )
    method = {None: ftype, 4: "qlora", 8: "lora8bit"}[bits]
    source = cfg.src("quantization_bit" if bits else "finetuning_type", f"{FT}: finetuning_type lora")
    r.set("method", method, source)
    return method


def _lora(cfg: Config, r: Reading) -> None:
    rank = cfg.positive("lora_rank", 8)
    r.set("lora_r", rank, cfg.src("lora_rank", f"{FT}: lora_rank 8"))
    alpha = cfg.get("lora_alpha", None, (int, float))
    r.set("lora_alpha", alpha or 2 * rank, cfg.src("lora_alpha", f"{FT}: lora_alpha = lora_rank * 2"))
    dropout = cfg.get("lora_dropout", 0.0, (float,))
    r.set("lora_dropout", float(dropout), cfg.src("lora_dropout", f"{FT}: lora_dropout 0.0"))
    targets = cfg.get("lora_target", "all", (str, list))
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    r.later["lora_targets"] = (
        "lora_target",
        names,
        cfg.src(
            "lora_target", f"{FT}: lora_target all (every linear layer but lm_head: model_utils/misc.py)"
        ),
    )


def _quant(cfg: Config, r: Reading) -> None:
    qtype = cfg.choice("quantization_type", "nf4", ("nf4", "fp4"))
    r.set("quant_type", qtype, cfg.src("quantization_type", f"{MA}: quantization_type nf4"))
    double = cfg.get("double_quantization", True, (bool,))
    r.set("double_quant", double, cfg.src("double_quantization", f"{MA}: double_quantization True"))
    # adapter.py casts only trainable parameters to fp32; LLaMA-Factory never calls peft's
    # prepare_model_for_kbit_training, so embeddings and norms stay in the compute dtype.
    r.set("kbit_fp32_upcast", False, f"{TOOL} model/adapter.py (only trainable params upcast)")


def _sequence(cfg: Config, r: Reading) -> None:
    cutoff = cfg.positive("cutoff_len", 2048)
    r.set("seq_len", cutoff, cfg.src("cutoff_len", f"{DA}: cutoff_len 2048"))
    packing = cfg.get("packing", None, (bool,))
    if packing or cfg.get("neat_packing", False, (bool,)):
        r.assume(
            f"packing: every sequence is cutoff_len tokens ({cutoff}); LLaMA-Factory packs to "
            "cutoff_len - 1, one token less than predicted"
        )
    else:
        r.assume(
            f"no packing: the collator pads each batch to its longest sample; predicted at the worst case, "
            f"cutoff_len ({cutoff})"
        )
    if cfg.has("rope_scaling"):
        r.later["rope_scaling"] = ("rope_scaling", cfg.get("rope_scaling", None, (str, dict)))


def _precision(cfg: Config, r: Reading) -> None:
    """parser.py: compute_dtype is bf16 under bf16 or pure_bf16, fp16 under fp16, and the model is loaded in
    it; adapter.py casts trainable parameters to fp32 unless pure_bf16 (or BAdam)."""
    pure = cfg.get("pure_bf16", False, (bool,))
    r.load_dtype = "bf16" if pure or r.amp == "bf16" else "fp16" if r.amp == "fp16" else "auto"
    r.load_source = cfg.src("pure_bf16", "") if pure else r.amp_source
    r.trainable_fp32 = not pure and not cfg.get("use_badam", False, (bool,))
    if r.fields["method"] == "qlora":
        # Without bf16/fp16 the compute dtype is infer_optim_dtype's pick: bf16 on a bf16 GPU.
        compute = "fp16" if r.load_dtype == "fp16" else "bf16"
        r.set("quant_compute_dtype", compute, f"{TOOL} parser.py (bnb_4bit_compute_dtype = compute_dtype)")


def _checkpointing(cfg: Config, r: Reading) -> None:
    """model_utils/checkpointing.py: on unless disable_gradient_checkpointing, reentrant unless use_reentrant_gc
    is false. With it disabled, the Trainer's own gradient_checkpointing (read before) still applies."""
    if cfg.get("disable_gradient_checkpointing", False, (bool,)):
        if not r.fields["gradient_checkpointing"]:
            r.sources["gradient_checkpointing"] = f"{cfg.path.name}: disable_gradient_checkpointing"
        return
    r.set(
        "gradient_checkpointing",
        True,
        cfg.src("disable_gradient_checkpointing", f"{MA}: disable_gradient_checkpointing False"),
    )
    reentrant = cfg.get("use_reentrant_gc", True, (bool,))
    r.set("gc_reentrant", reentrant, cfg.src("use_reentrant_gc", f"{MA}: use_reentrant_gc True"))


def _kernels(cfg: Config, r: Reading) -> None:
    flash = cfg.choice("flash_attn", "auto", (*ATTENTION, "fa3"))
    if flash == "fa3":
        r.flag(
            "flash_attn",
            flash,
            "FlashAttention-3; predicted as FlashAttention-2 (same saved tensors)",
            "unknown",
        )
    r.set(
        "attn_impl",
        ATTENTION.get(flash, "flash_attention_2"),
        cfg.src("flash_attn", f"{MA}: flash_attn auto (transformers' default, sdpa)"),
    )
    if cfg.get("enable_liger_kernel", False, (bool,)):
        # model_utils/liger_kernel.py applies liger's defaults (rope, swiglu, rms_norm, fused linear CE).
        kernels = {"fused_linear_cross_entropy": True, "rms_norm": True, "swiglu": True, "rope": True}
        r.liger = {"key": "enable_liger_kernel", "kernels": kernels, "file": cfg.path}


def _unmodelled(cfg: Config, r: Reading) -> None:
    for key, (effect, why) in UNMODELLED.items():
        value = cfg.get(key, None, (bool, str, int, float, list, dict))
        if value:
            r.flag(key, value, why, effect)
    for key, name in OPTIMIZER_SWITCHES.items():
        if cfg.get(key, False, (bool,)):
            override_optimizer(r, key, True, name)
