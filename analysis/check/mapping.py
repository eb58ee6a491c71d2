"""A training config's reading, with its DeepSpeed / accelerate setup, mapped onto one ftmem CellSpec.

The reader (analysis.check.formats) decides what each tool does with its keys; this module adds what
needs the model (LoRA default targets, Liger support, rope scaling, "auto" dtypes and DeepSpeed sizes)
or the whole setup (precision depends on DeepSpeed / FSDP), then builds and validates the spec. A spec
error comes back as a ConfigError naming the config key behind the spec field. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench.model.registry
from analysis.check.distributed import (
    AccelerateSetting,
    DsPlan,
    ds_fields,
    flag_fsdp,
    flag_zero_knobs,
    load_ds,
    load_ds_file,
)
from analysis.check.source import ConfigError, Reading, missing
from bench.model.registry import UnknownModelError, architecture, linear_shapes, lora_target_names
from bench.multigpu.deepspeed_config import deepspeed_config
from bench.spec import DEEPSPEED_DISTS, CellSpec, SpecError

#: peft utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: the targets peft picks when a
#: LoraConfig names none (TRL's lora_target_modules None), for the model types ftmem can build.
PEFT_DEFAULT_TARGETS = {
    "qwen3": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
}
#: liger-kernel transformers/monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN (model types with Liger kernels).
LIGER_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "phi3",
        "granite",
        "olmo2",
        "glm4",
    }
)
ALL_LINEAR = ("all", "all-linear")
TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class Setup:
    """Everything beside the training config: CLI overrides and the distributed configs."""

    gpus: int | None = None
    deepspeed: Path | None = None
    accelerate: AccelerateSetting | None = None
    model: str | None = None
    seq_len: int | None = None


def _resolve_model(name: str) -> str:
    """A model name as ftmem knows it: a shipped name or hub id, a folder, or the local HF cache."""
    return bench.model.registry.resolve(name)


def _model(r: Reading, setup: Setup) -> tuple[str, dict]:
    name = setup.model or r.fields.get("model")
    if setup.model:
        r.sources["model"] = "command line: --model"
    if not name:
        raise missing(r.path, r.model_key, "names no model; add it or pass --model")
    try:
        resolved = _resolve_model(name)
        return resolved, architecture(resolved)
    except UnknownModelError as exc:
        key = "--model" if setup.model else r.model_key
        why = str(exc).removeprefix(f"model: {name!r} ")
        raise ConfigError("command line" if setup.model else r.path, key, name, why) from None


def _model_dtype(arch: dict, name: str, r: Reading) -> str:
    """The dtype "auto" loads: the checkpoint config's torch_dtype. Shipped Qwen3 architectures copy the
    published configs, which say bfloat16."""
    value = (
        arch.get("dtype")
        or arch.get("torch_dtype")
        or ("bfloat16" if name in bench.model.registry.ARCHITECTURES else None)
    )
    if value not in TORCH_DTYPES:
        raise ConfigError(
            r.path,
            _key(r, r.load_source, "(dtype)"),
            value,
            f"the model {name} does not say its dtype; set the config's "
            "dtype / torch_dtype (or bf16 / fp16) explicitly",
        )
    return TORCH_DTYPES[value]


def _targets(r: Reading, arch: dict) -> None:
    """LoRA targets as the model's own module names (bench.model.registry): `all` is every linear layer of
    a decoder layer, as peft's all-linear; the experts' 3-D parameters may be named too."""
    if "lora_targets" not in r.later:
        return
    key, names, source = r.later["lora_targets"]
    model_type = arch.get("model_type", "")
    if names is None:
        if model_type not in PEFT_DEFAULT_TARGETS:
            raise missing(
                r.path, key, f"is unset and peft has no default targets ftmem knows for {model_type}; set it"
            )
        r.set("lora_targets", PEFT_DEFAULT_TARGETS[model_type], source)
        return
    allowed = lora_target_names(arch)
    wanted = set(linear_shapes(arch)) if any(n in ALL_LINEAR for n in names) else set(names)
    for extra in sorted(wanted & {"embed_tokens", "lm_head"}):
        r.flag(key, extra, f"LoRA on {extra} (peft wraps the embedding / head); not modelled", "higher")
    unknown = sorted(wanted - set(allowed) - {"embed_tokens", "lm_head"})
    if unknown:
        raise ConfigError(
            r.path,
            key,
            unknown[0],
            f"is not a module ftmem models; allowed: {', '.join(allowed)}, all, embed_tokens, lm_head",
        )
    kept = tuple(p for p in allowed if p in wanted)
    if not kept:
        raise ConfigError(r.path, key, names, f"targets no projection ftmem models ({', '.join(allowed)})")
    r.set("lora_targets", kept, source)


def _liger(r: Reading, model_type: str) -> None:
    if r.liger is None:
        r.set("fused_ce", False, f"{r.tool}: no Liger kernel switch set")
        return
    r.set("fused_ce", False, f"{Path(r.liger['file']).name}: {r.liger['key']}")
    key, kernels, file = r.liger["key"], r.liger["kernels"], r.liger["file"]
    if model_type not in LIGER_MODEL_TYPES:
        r.flag(
            key,
            True,
            f"Liger has no kernels for model type {model_type} in the releases ftmem knows; "
            "predicted without them",
            "unknown",
            file,
        )
        return
    r.set("fused_ce", bool(kernels.get("fused_linear_cross_entropy")), f"{Path(file).name}: {key}")
    others = sorted(k for k, on in kernels.items() if on and k != "fused_linear_cross_entropy")
    if others:
        r.flag(
            key,
            others,
            f"Liger's {', '.join(others)} kernels save less than the eager ops ftmem models "
            "(only the fused linear cross-entropy is an ftmem knob)",
            "lower",
            file,
        )


def _rope(r: Reading, arch: dict) -> None:
    limit, seq = arch.get("max_position_embeddings"), r.fields.get("seq_len")
    if limit and seq and seq > limit:
        key = _key(r, r.sources.get("seq_len", ""), "seq_len")
        why = (
            "rope scaling beyond max_position_embeddings is not modelled"
            if "rope_scaling" in r.later
            else "the model has no positions for it"
        )
        raise ConfigError(r.path, key, seq, f"is past the model's max_position_embeddings {limit}: {why}")


# ------------------------------------------------------------------------------------------------
# The distributed setup: DeepSpeed, FSDP, DDP
# ------------------------------------------------------------------------------------------------
def _gpus(r: Reading, setup: Setup) -> int:
    acc = setup.accelerate
    if setup.gpus:
        r.sources["gpus"] = "command line: --gpus"
        return setup.gpus
    if acc and acc.num_processes:
        r.sources["gpus"] = f"{acc.file.name}: num_processes"
        return acc.num_processes
    r.sources["gpus"] = "one GPU (no --gpus, no accelerate num_processes)"
    return 1


def _ds_plan(r: Reading, setup: Setup) -> DsPlan | None:
    """--deepspeed wins over the training config's key, which wins over accelerate's (transformers builds
    its DeepSpeed config from TrainingArguments.deepspeed)."""
    if setup.deepspeed is not None:
        if r.deepspeed is not None:
            r.assume(
                f"--deepspeed {setup.deepspeed} replaces {r.path.name}: {r.deepspeed_key} ({r.deepspeed})"
            )
        return load_ds_file(Path(setup.deepspeed), "--deepspeed")
    if r.deepspeed is not None:
        return load_ds(r.deepspeed, r.path, r.deepspeed_key)
    return setup.accelerate.ds if setup.accelerate else None


def _distributed(r: Reading, setup: Setup) -> DsPlan | None:
    gpus, plan = _gpus(r, setup), _ds_plan(r, setup)
    r.fields["gpus"] = gpus
    fsdp = r.fsdp or (setup.accelerate.fsdp if setup.accelerate else None)
    if plan and fsdp:
        raise ConfigError(
            fsdp.file, fsdp.key, "FSDP", f"and DeepSpeed ({plan.file.name}) cannot both drive a run"
        )
    if setup.accelerate and setup.accelerate.mixed_precision and r.amp is None:
        r.amp, r.amp_source = (
            setup.accelerate.mixed_precision,
            f"{setup.accelerate.file.name}: mixed_precision",
        )
    if plan:
        for name, value in ds_fields(plan, r).items():
            r.set(name, value, f"{plan.file.name}: zero_optimization")
        _ds_batch(plan, r)
        _ds_optimizer(plan, r)
    elif fsdp:
        _fsdp(fsdp, r)
    if not plan:
        r.set("zero_offload", "none", "no DeepSpeed config")
    if not plan and not fsdp:
        r.set("dist", "ddp" if gpus > 1 else "none", r.sources["gpus"])
        if gpus > 1:
            r.assume(f"{gpus} GPUs without DeepSpeed or FSDP: the Trainer wraps the model in DDP")
    return plan


def _fsdp(fsdp, r: Reading) -> None:
    flag_fsdp(fsdp, r)
    r.set("dist", "fsdp2", f"{fsdp.file.name}: {fsdp.key}")
    if fsdp.activation_checkpointing:
        # accelerate wraps layers with checkpoint_wrapper(CheckpointImpl.NO_REENTRANT).
        r.set("gradient_checkpointing", True, f"{fsdp.file.name}: {fsdp.key} activation_checkpointing")
        r.set("gc_reentrant", False, "accelerate FSDP activation checkpointing (non-reentrant)")


def _ds_batch(plan: DsPlan, r: Reading) -> None:
    """transformers integrations/deepspeed.py refuses DeepSpeed values that disagree with TrainingArguments."""
    for ds_key, field_name in (
        ("train_micro_batch_size_per_gpu", "batch_size"),
        ("gradient_accumulation_steps", "grad_accum"),
    ):
        value = plan.micro_batch if field_name == "batch_size" else plan.grad_accum
        ours = r.fields.get(field_name)
        if value != "auto" and value != ours:
            raise ConfigError(
                plan.file,
                ds_key,
                value,
                f"disagrees with {r.sources.get(field_name)} ({ours}); the "
                'HF Trainer refuses mismatched DeepSpeed values (use "auto")',
            )


def _ds_optimizer(plan: DsPlan, r: Reading) -> None:
    """An optimizer section replaces the Trainer's: DeepSpeed's FusedAdam (or CPU Adam under offload)."""
    if not plan.optimizer:
        return
    kind = str(plan.optimizer.get("type", "")).lower() if isinstance(plan.optimizer, dict) else ""
    if kind in ("adam", "adamw"):
        r.set(
            "optimizer",
            "adamw_fused",
            f"{plan.file.name}: optimizer.type (DeepSpeed FusedAdam, in place as torch's fused AdamW)",
        )
    else:
        r.flag(
            "optimizer.type",
            kind or plan.optimizer,
            "a DeepSpeed optimizer ftmem does not build; predicted as AdamW",
            "unknown",
            plan.file,
        )
        r.set("optimizer", "adamw", f"{plan.file.name}: optimizer (unmodelled: predicted as adamw)")


def _ds_precision(plan: DsPlan, r: Reading) -> str:
    for name in ("bf16", "fp16"):
        value = getattr(plan, name)
        if value != "auto" and bool(value) != (r.amp == name):
            ours = r.amp_source or "no mixed precision"
            raise ConfigError(
                plan.file,
                f"{name}.enabled",
                value,
                f'disagrees with {ours}; the HF Trainer refuses mismatched DeepSpeed values (use "auto")',
            )
    if r.amp is None:
        raise ConfigError(
            plan.file,
            "bf16.enabled",
            plan.bf16,
            "DeepSpeed in fp32 is not an ftmem cell; run it with bf16 or fp16",
        )
    section = plan.bf16_section
    if (
        r.amp == "bf16"
        and section.get("bf16_master_weights_and_grads")
        and section.get("bf16_optimizer_states")
    ):
        return "bf16"
    return f"{r.amp}_mixed"


# ------------------------------------------------------------------------------------------------
# Precision: what the weights are stored in, and whether autocast runs
# ------------------------------------------------------------------------------------------------
def _precision(r: Reading, plan: DsPlan | None, model_dtype: str) -> str:
    method, dist = r.fields["method"], r.fields["dist"]
    load = model_dtype if r.load_dtype == "auto" else r.load_dtype
    if plan is not None:
        return _ds_precision(plan, r)
    # accelerate's FSDP2 upcasts trainable parameters to fp32 under mixed precision (fsdp_utils.py).
    upcast = r.trainable_fp32 or (dist == "fsdp2" and r.amp is not None)
    if method == "full":
        return _full_precision(r, "fp32" if upcast else load)
    return _adapter_precision(r, load)


def _full_precision(r: Reading, weights: str) -> str:
    amp = r.amp
    if weights == "fp32":
        return f"{amp}_mixed" if amp else "fp32"
    if weights == "bf16" and amp in (None, "bf16"):
        if amp:
            r.assume(
                "full fine-tuning of bf16-loaded weights under bf16 autocast: predicted as pure bf16 (weights, "
                "gradients and optimizer state in bf16; autocast makes no copies of bf16 weights)"
            )
        return "bf16"
    raise _refused(
        r,
        f"with weights loaded in {weights} ({r.load_source}) is not an ftmem precision (fp32, "
        "bf16/fp16 autocast over fp32 weights, or pure bf16)",
    )


def _adapter_precision(r: Reading, base: str) -> str:
    amp = r.amp
    if amp and base == amp:
        return f"{amp}_mixed"
    if amp is None and base == "fp32":
        return "fp32"
    if amp is None and base == "bf16":
        r.flag(
            _key(r, r.load_source, "(precision)"),
            "bf16 without autocast",
            "peft keeps the adapters "
            "in fp32 on a bf16 base (autocast_adapter_dtype), so the LoRA inputs are cast to fp32; predicted "
            "as pure bf16 with bf16 adapters",
            "higher",
        )
        return "bf16"
    raise _refused(
        r,
        f"over a base loaded in {base} ({r.load_source}) is not an ftmem precision for adapters "
        "(the frozen base in the autocast dtype, or everything in bf16 or fp32)",
    )


def _refused(r: Reading, why: str) -> ConfigError:
    """A precision ftmem does not build, named by the key that set the mixed precision."""
    return ConfigError(r.path, _key(r, r.amp_source, "(precision)"), r.amp, why)


def _key(r: Reading, source: str, fallback: str) -> str:
    """The key of a "file: key" or "command line: --flag" source; `fallback` for a tool default."""
    for prefix in (f"{r.path.name}: ", "command line: "):
        if source.startswith(prefix):
            return source[len(prefix) :]
    return fallback


# ------------------------------------------------------------------------------------------------
# The spec
# ------------------------------------------------------------------------------------------------
def _accumulation(r: Reading) -> None:
    """axolotl's batch_size is global: gradient_accumulation_steps = batch_size // micro_batch_size // GPUs."""
    if "total_batch" in r.later:
        total, micro = r.later["total_batch"]
        r.fields["grad_accum"] = max(1, total // micro // r.fields["gpus"])


def _create(r: Reading) -> CellSpec:
    fields = {k: v for k, v in r.fields.items() if k in CellSpec.__dataclass_fields__}
    try:
        return CellSpec.create(**fields)
    except SpecError as exc:
        source = r.sources.get(exc.key, "")
        file, _, key = source.partition(": ") if ": " in source else (str(r.path), "", exc.key)
        value = r.raw.get(key, exc.value) if file == r.path.name else exc.value
        raise ConfigError(
            file, key or exc.key, value, f"{exc.allowed} (ftmem's {exc.key} {exc.value!r})"
        ) from None


def _zero_reference(spec: CellSpec) -> dict[str, Any]:
    """The zero_optimization section ftmem's cell runs, with DeepSpeed's sub_group_size default."""
    from analysis.predict.calibration import ZERO3_SUB_GROUP

    zero = dict(deepspeed_config(spec)["zero_optimization"])
    if spec.dist == "deepspeed_zero3":
        zero.setdefault("sub_group_size", ZERO3_SUB_GROUP)
    return zero


def build(r: Reading, setup: Setup) -> CellSpec:
    """The spec of a reading: model resolved, setup merged, precision decided, validated."""
    name, arch = _model(r, setup)
    r.fields["model"] = name
    model_type = arch.get("model_type", "")
    if setup.seq_len:
        r.set("seq_len", setup.seq_len, "command line: --seq-len")
    _targets(r, arch)
    _liger(r, model_type)
    _rope(r, arch)
    plan = _distributed(r, setup)
    _accumulation(r)
    # The tools' torch_compile compiles the whole model (flagged where set); ftmem's compile knob is per layer.
    r.set("compile", False, "ftmem's eager cell")
    model_dtype = _model_dtype(arch, name, r) if r.load_dtype == "auto" else r.load_dtype
    r.set("precision", _precision(r, plan, model_dtype), r.amp_source or r.load_source)
    spec = _create(r)
    if spec.dist != "none":
        r.assume(
            "multi-GPU cell: the predictor's allocated figure was within 0.74% of the multi-GPU rows (README), but its "
            "allocator slack is the single-GPU fit; uncapped on an H200 those rows reserved 8-13 GiB more than "
            "predicted (results/nvidia-h200-x4/qwen3-14b-4gpu.jsonl), cache a smaller card's allocator frees "
            "before it fails"
        )
    if plan is not None and spec.dist in DEEPSPEED_DISTS:
        flag_zero_knobs(plan, _zero_reference(spec), arch["hidden_size"], r)
    return spec
