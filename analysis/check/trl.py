"""TRL `trl sft --config CONFIG.yaml` (ScriptArguments + SFTConfig + ModelConfig) and plain HF
TrainingArguments JSON (an HfArgumentParser file for transformers' examples/pytorch/language-modeling/
run_clm.py: ModelArguments, DataTrainingArguments and TrainingArguments) read into spec fields.

TRL defaults cited from huggingface/trl trl/trainer/sft_config.py (max_length 1024, packing False,
padding_free False, loss_type), trl/trainer/base_config.py (gradient_checkpointing True, bf16 True unless
fp16) and the ModelConfig docs (use_peft False, lora_r 16, lora_alpha 32, lora_dropout 0.05,
lora_target_modules None, bnb_4bit_quant_type nf4, use_bnb_nested_quant False); transformers defaults
from transformers 5.17 (training_args.py, modeling_utils.py: from_pretrained dtype "auto").
"""

from __future__ import annotations

from analysis.check.source import Config, ConfigError, Reading
from analysis.check.trainer_args import HARMLESS, TrainerDefaults, read_trainer_args

TRL = "TRL"
HF = "HF TrainingArguments"
SFT = "sft_config.py"
MC = "ModelConfig docs"
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto"}
ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash_attention_2"}

TRL_DEFAULTS = TrainerDefaults(
    gradient_checkpointing=True,
    gc_doc="base_config.py: gradient_checkpointing True",
    bf16=None,
    bf16_doc="base_config.py: bf16 True unless fp16",
)
HARMLESS_TRL = frozenset(
    {
        "dataset_name",
        "dataset_config",
        "dataset_train_split",
        "dataset_test_split",
        "dataset_streaming",
        "datasets",
        "dataset_text_field",
        "dataset_kwargs",
        "dataset_num_proc",
        "eos_token",
        "pad_token",
        "chat_template_path",
        "truncation_mode",
        "shuffle_dataset",
        "eval_packing",
        "completion_only_loss",
        "assistant_only_loss",
        "model_revision",
        "trust_remote_code",
        "lora_task_type",
        "use_rslora",
        "gradient_checkpointing_use_reentrant",
        "ignore_bias_buffers",
        "packing_strategy",
        "tokenizer_name_or_path",
    }
)
HARMLESS_HF = frozenset(
    {
        "config_name",
        "tokenizer_name",
        "cache_dir",
        "use_fast_tokenizer",
        "model_revision",
        "token",
        "trust_remote_code",
        "low_cpu_mem_usage",
        "dataset_name",
        "dataset_config_name",
        "train_file",
        "validation_file",
        "max_train_samples",
        "max_eval_samples",
        "streaming",
        "validation_split_percentage",
        "preprocessing_num_workers",
        "overwrite_cache",
        "keep_linebreaks",
        "model_type",
        "config_overrides",
    }
)


def read_trl(cfg: Config) -> Reading:
    r = Reading(TRL, cfg.path)
    _model(cfg, r)
    method = _method(cfg, r)
    if method != "full":
        _lora(cfg, r)
    _sequence(cfg, r)
    read_trainer_args(cfg, r, TRL_DEFAULTS)
    _load_dtype(cfg, r)
    _kbit_casts(r)
    if method == "qlora":
        _quant(cfg, r)
    _loss(cfg, r)
    if cfg.get("activation_offloading", False, (bool,)):
        r.flag("activation_offloading", True, "activations held in host memory", "lower")
    r.unrecognised = [
        f"{cfg.path.name}: {k}" for k in cfg.unused() if k not in HARMLESS and k not in HARMLESS_TRL
    ]
    return r


def read_hf(cfg: Config) -> Reading:
    """Full fine-tuning by the Trainer: TrainingArguments hold no adapter (PEFT is set up in code)."""
    r = Reading(HF, cfg.path)
    r.assume(
        "read as HF TrainingArguments (no key only TRL uses): pass --format trl for a `trl sft` config, "
        "whose defaults differ (gradient checkpointing and bf16 on)"
    )
    _model(cfg, r)
    r.set("method", "full", f"{HF}: the Trainer trains the model's parameters (adapters are added in code)")
    block = cfg.positive("block_size", None)
    if block is None:
        r.assume(
            "block_size unset: run_clm.py takes tokenizer.model_max_length, or 1024 when that exceeds "
            "max_position_embeddings (Qwen3: 131072 > 40960); predicted at 1024"
        )
    r.set("seq_len", block or 1024, cfg.src("block_size", "run_clm.py: 1024 for Qwen3 tokenizers"))
    read_trainer_args(cfg, r, TrainerDefaults())
    _load_dtype(cfg, r)
    r.unrecognised = [
        f"{cfg.path.name}: {k}" for k in cfg.unused() if k not in HARMLESS and k not in HARMLESS_HF
    ]
    return r


def _model(cfg: Config, r: Reading) -> None:
    if cfg.has("model_name_or_path"):
        r.set("model", cfg.get("model_name_or_path", None, (str,)), f"{cfg.path.name}: model_name_or_path")
    attn = cfg.get("attn_implementation", None, (str,)) or _init_kwargs(cfg).get("attn_implementation")
    if attn is not None and attn not in ATTENTION:
        r.flag(
            "attn_implementation",
            attn,
            "an attention implementation ftmem does not build; predicted as sdpa",
            "unknown",
        )
    r.set(
        "attn_impl", ATTENTION.get(attn, "sdpa"), cfg.src("attn_implementation", "transformers' default sdpa")
    )


def _init_kwargs(cfg: Config) -> dict:
    return cfg.get("model_init_kwargs", {}, (dict,))


def _method(cfg: Config, r: Reading) -> str:
    peft = cfg.get("use_peft", False, (bool,))
    four, eight = cfg.get("load_in_4bit", False, (bool,)), cfg.get("load_in_8bit", False, (bool,))
    if four and eight:
        raise ConfigError(cfg.path, "load_in_4bit", True, "and load_in_8bit cannot both be true")
    if (four or eight) and not peft:
        raise ConfigError(
            cfg.path,
            "load_in_4bit" if four else "load_in_8bit",
            True,
            "needs use_peft: true (a quantized base trains adapters only)",
        )
    method = "full" if not peft else "qlora" if four else "lora8bit" if eight else "lora"
    key = "load_in_4bit" if four else "load_in_8bit" if eight else "use_peft"
    r.set("method", method, cfg.src(key, f"{MC}: use_peft False"))
    return method


def _kbit_casts(r: Reading) -> None:
    """SFTTrainer runs peft's prepare_model_for_kbit_training (non-quantized weights to fp32) on a k-bit
    base, then under bf16 casts a 4-bit model's embed_tokens / lm_head back to bf16
    (peft_module_casting_to_bf16), which ftmem does not build: predicted with them in fp32."""
    method = r.fields["method"]
    if method not in ("qlora", "lora8bit"):
        return
    r.set("kbit_fp32_upcast", True, f"{TRL} sft_trainer.py (prepare_model_for_kbit_training)")
    if method == "qlora" and r.amp == "bf16":
        r.flag(
            "load_in_4bit",
            True,
            "SFTTrainer casts embed_tokens / lm_head back to bf16 after "
            "prepare_model_for_kbit_training (peft_module_casting_to_bf16); predicted with them in fp32",
            "lower",
        )


def _lora(cfg: Config, r: Reading) -> None:
    rank = cfg.positive("lora_r", 16)
    r.set("lora_r", rank, cfg.src("lora_r", f"{MC}: lora_r 16"))
    r.set(
        "lora_alpha", cfg.get("lora_alpha", 32, (int, float)), cfg.src("lora_alpha", f"{MC}: lora_alpha 32")
    )
    r.set(
        "lora_dropout",
        float(cfg.get("lora_dropout", 0.05, (float,))),
        cfg.src("lora_dropout", f"{MC}: lora_dropout 0.05"),
    )
    targets = cfg.get("lora_target_modules", None, (str, list))
    if targets is None:
        r.later["lora_targets"] = (
            "lora_target_modules",
            None,
            f"{MC}: lora_target_modules None (peft's default for the model type)",
        )
    else:
        names = [targets] if isinstance(targets, str) else [str(t) for t in targets]
        r.later["lora_targets"] = ("lora_target_modules", names, f"{cfg.path.name}: lora_target_modules")
    for key, why in (
        ("use_dora", "DoRA keeps a weight-norm magnitude and its activations per adapted layer"),
        ("lora_modules_to_save", "modules trained in full beside LoRA (peft modules_to_save)"),
    ):
        value = cfg.get(key, None, (bool, list, str))
        if value:
            r.flag(key, value, why, "higher")


def _sequence(cfg: Config, r: Reading) -> None:
    # TRL renamed max_seq_length to max_length; null means no truncation (the longest sample decides).
    key = "max_seq_length" if "max_seq_length" in cfg.data and "max_length" not in cfg.data else "max_length"
    if key in cfg.data and cfg.data[key] is None:
        raise ConfigError(
            cfg.path, key, None, "means no truncation, so the longest sample decides the memory; set a length"
        )
    length = cfg.positive(key, 1024)
    multiple = cfg.get("pad_to_multiple_of", None, (int,))
    seq = -(-length // multiple) * multiple if multiple else length
    r.set("seq_len", seq, cfg.src(key, f"{SFT}: max_length 1024"))
    packing = cfg.get("packing", False, (bool,))
    if packing:
        r.assume(f"packing: every row is max_length ({length}) tokens")
    else:
        r.assume(
            f"no packing: the collator pads each batch to its longest sample; predicted at the worst case, "
            f"{seq} tokens"
        )
    strategy = cfg.get("packing_strategy", "bfd", (str,))
    if cfg.get("padding_free", False, (bool,)) or (packing and strategy == "bfd"):
        r.flag(
            "padding_free",
            True,
            "padding-free batches flatten the batch into one sequence without padding "
            "(on with packing_strategy bfd); predicted padded to the full length",
            "lower",
        )


def _load_dtype(cfg: Config, r: Reading) -> None:
    """ModelConfig dtype (torch_dtype before TRL renamed it; run_clm.py's torch_dtype); unset means
    from_pretrained's default, "auto" in transformers 5 (the checkpoint's own dtype)."""
    key = "dtype" if cfg.has("dtype") else "torch_dtype"
    value = cfg.get(key, None, (str,)) or _init_kwargs(cfg).get("dtype") or "auto"
    if value not in DTYPES:
        raise ConfigError(cfg.path, key, value, f"allowed: {', '.join(DTYPES)}")
    r.load_dtype = DTYPES[value]
    r.load_source = cfg.src(key, "transformers modeling_utils.py: from_pretrained dtype 'auto'")


def _quant(cfg: Config, r: Reading) -> None:
    qtype = cfg.choice("bnb_4bit_quant_type", "nf4", ("nf4", "fp4"))
    r.set("quant_type", qtype, cfg.src("bnb_4bit_quant_type", f"{MC}: nf4"))
    nested = cfg.get("use_bnb_nested_quant", False, (bool,))
    r.set("double_quant", nested, cfg.src("use_bnb_nested_quant", f"{MC}: use_bnb_nested_quant False"))
    # TRL get_quantization_config passes the model dtype as bnb_4bit_compute_dtype; unset (or auto) leaves
    # BitsAndBytesConfig's default, float32.
    compute = r.load_dtype if r.load_dtype in ("bf16", "fp16") else "fp32"
    r.set("quant_compute_dtype", compute, f"{TRL} get_quantization_config (compute dtype = dtype)")


def _loss(cfg: Config, r: Reading) -> None:
    """loss_type: TRL >= 1.7 defaults to chunked_nll (trl#5846), earlier releases to nll; ftmem models nll
    (full logits) and liger's fused linear cross-entropy."""
    loss = cfg.get("loss_type", None, (str,))
    if r.liger is not None or loss == "nll":
        return
    if loss in (None, "chunked_nll"):
        r.flag(
            "loss_type",
            loss or "(unset)",
            "chunked_nll (TRL >= 1.7's default) computes lm_head and the "
            "loss in chunks; predicted with the full logits (nll, TRL <= 1.6's default)",
            "lower",
        )
    else:
        r.flag("loss_type", loss, "a loss ftmem does not model; predicted as nll", "unknown")
