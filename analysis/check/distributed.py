"""DeepSpeed JSON, accelerate configs and FSDP settings, read into ftmem's multi-GPU fields
(`dist`, `zero_offload`, `gpus`) with what ftmem does not model flagged. Imports no torch.

ftmem's cells run DeepSpeed ZeRO-2/3 (optionally with optimizer / parameter offload to the CPU) and
torch FSDP2 (fully_shard per decoder layer, resharded after forward); see bench/multigpu/dist.py and
bench/multigpu/deepspeed_config.py. Anything else is either mapped to the closest of those with an
unmodelled key saying which way the prediction errs, or refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.check.source import Config, ConfigError, Reading, load_mapping

ACCELERATE_DOC = "accelerate utils/dataclasses.py"
FSDP_KEYS = {
    "version",
    "reshard_after_forward",
    "sharding_strategy",
    "offload_params",
    "cpu_offload",
    "activation_checkpointing",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
    "cpu_ram_efficient_loading",
    "state_dict_type",
    "sync_module_states",
    "use_orig_params",
    "forward_prefetch",
    "backward_prefetch",
    "limit_all_gathers",
    "xla",
    "xla_fsdp_v2",
    "xla_fsdp_grad_ckpt",
}


@dataclass
class FsdpSetting:
    """FSDP as a tool sets it up: version, whether it reshards after forward, offload, checkpointing."""

    file: Path
    key: str
    version: int
    reshard_after_forward: Any = True
    offload_params: bool = False
    activation_checkpointing: bool = False


@dataclass
class DsPlan:
    """A DeepSpeed config: ZeRO stage and offload, the memory knobs it sets, precision and batch keys."""

    file: Path
    key: str
    stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    zero: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    bf16: Any = "auto"
    fp16: Any = "auto"
    bf16_section: dict[str, Any] = field(default_factory=dict)
    top_keys: tuple[str, ...] = ()
    micro_batch: Any = "auto"
    grad_accum: Any = "auto"


# ------------------------------------------------------------------------------------------------
# FSDP
# ------------------------------------------------------------------------------------------------
def _strip_prefix(config: dict[str, Any]) -> dict[str, Any]:
    """transformers training_args.py drops the fsdp_ prefix of fsdp_config keys; accelerate writes it."""
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in config.items()}


def fsdp_from_config(
    path: Path, key: str, config: dict[str, Any], version_default: int, items: list[str] = ()
) -> FsdpSetting:
    """FSDP settings from a (prefix-stripped) fsdp_config and the legacy option words of `fsdp`."""
    config = _strip_prefix(config)
    version = int(config.get("version", version_default))
    reshard = config.get("reshard_after_forward", config.get("sharding_strategy", True))
    for item in items:
        if item in ("shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard"):
            reshard = item.upper()
    offload = bool(config.get("offload_params", config.get("cpu_offload", False))) or "offload" in items
    return FsdpSetting(
        path, key, version, reshard, offload, bool(config.get("activation_checkpointing", False))
    )


def read_trainer_fsdp(cfg: Config, r: Reading) -> None:
    """HF TrainingArguments `fsdp` (bool, option words or a list) and `fsdp_config` (mapping or JSON path).
    transformers 5.17 training_args.py: fsdp_config version defaults to 2."""
    fsdp = cfg.get("fsdp", None, (bool, str, list))
    if not fsdp:
        return
    items = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, list) else []
    config = cfg.get("fsdp_config", {}, (dict, str))
    if isinstance(config, str):
        config = load_mapping(resolve_path(cfg.path, config, "fsdp_config"))
    r.fsdp = fsdp_from_config(cfg.path, "fsdp", config, 2, [str(i).lower() for i in items])


def flag_fsdp(s: FsdpSetting, r: Reading) -> None:
    """Map an FSDP setting onto ftmem's fsdp2 cell; flag what differs."""
    if s.version != 2:
        r.flag(
            f"{s.key} (fsdp_version)",
            s.version,
            "FSDP1's flat parameters are not modelled; predicted as FSDP2 (fully_shard per decoder layer)",
            "unknown",
            s.file,
        )
    reshard = s.reshard_after_forward
    if reshard not in (True, "FULL_SHARD", 1, "1", "true"):
        effect = "higher" if str(reshard).upper() in ("FALSE", "SHARD_GRAD_OP", "2") else "unknown"
        r.flag(
            f"{s.key} (reshard_after_forward / sharding_strategy)",
            reshard,
            "ftmem's fsdp2 cell reshards parameters after forward (FULL_SHARD)",
            effect,
            s.file,
        )
    if s.offload_params:
        r.flag(
            f"{s.key} (offload_params)", True, "FSDP CPU offload of parameters and gradients", "lower", s.file
        )


# ------------------------------------------------------------------------------------------------
# DeepSpeed
# ------------------------------------------------------------------------------------------------
def resolve_path(base: Path, value: str, key: str) -> Path:
    """A file a config names: relative to that config's folder, then to the working directory."""
    for candidate in (base.parent / value, Path(value)):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        base,
        key,
        value,
        f"names a file that is not there (looked beside {base.name} and in "
        "the working directory); pass it with --deepspeed / the right path",
    )


def _device(section: Any, path: Path, key: str) -> str:
    if section in (None, {}):
        return "none"
    if not isinstance(section, dict):
        raise ConfigError(path, key, section, "must be a mapping with a device (cpu, nvme or none)")
    device = section.get("device", "none")
    if device not in ("cpu", "nvme", "none", None):
        raise ConfigError(path, f"{key}.device", device, "allowed: cpu, nvme, none")
    return device or "none"


def _stage(zero: dict[str, Any], path: Path) -> int:
    stage = zero.get("stage", 0)  # DeepSpeed docs (config-json): zero_optimization.stage defaults to 0
    if stage not in (0, 1, 2, 3):
        raise ConfigError(path, "zero_optimization.stage", stage, "allowed: 0, 1, 2, 3")
    return stage


def ds_plan(data: dict[str, Any], path: Path, key: str) -> DsPlan:
    """A DeepSpeed config dict (file or inline) as a DsPlan."""
    zero = data.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(path, "zero_optimization", zero, "must be a mapping")
    opt_device = _device(zero.get("offload_optimizer"), path, "zero_optimization.offload_optimizer")
    if zero.get("cpu_offload") is True:  # the pre-0.3.16 spelling of offload_optimizer: cpu
        opt_device = "cpu"
    bf16 = data.get("bf16") or data.get("bfloat16") or {}
    return DsPlan(
        path,
        key,
        _stage(zero, path),
        offload_optimizer=opt_device,
        offload_param=_device(zero.get("offload_param"), path, "zero_optimization.offload_param"),
        zero=zero,
        optimizer=data.get("optimizer"),
        bf16=_enabled(data, "bfloat16" if "bfloat16" in data else "bf16"),
        fp16=_enabled(data, "fp16"),
        micro_batch=data.get("train_micro_batch_size_per_gpu", "auto"),
        grad_accum=data.get("gradient_accumulation_steps", "auto"),
        bf16_section=bf16,
        top_keys=tuple(data),
    )


def _enabled(data: dict[str, Any], name: str) -> Any:
    """A precision section's `enabled`: absent section = "auto" (accelerate's DeepSpeedPlugin.set_mixed_precision
    adds it from the run's mixed precision); a section without `enabled` = DeepSpeed's default, false."""
    section = data.get(name)
    if section is None:
        return "auto"
    return section.get("enabled", False) if isinstance(section, dict) else section


def load_ds(value: Any, base: Path, key: str) -> DsPlan:
    """The DeepSpeed config a key names: an inline mapping, or a JSON file path."""
    if isinstance(value, dict):
        return ds_plan(value, base, key)
    return load_ds_file(resolve_path(base, value, key), key)


def load_ds_file(path: Path, key: str) -> DsPlan:
    data = load_mapping(path)
    if "zero_optimization" not in data and not data.keys() & DS_HANDLED:
        raise ConfigError(
            path,
            "(format)",
            "not DeepSpeed",
            "holds no zero_optimization or batch keys of a DeepSpeed config",
        )
    return ds_plan(data, path, key)


_STAGE_DIST = {1: "deepspeed_zero2", 2: "deepspeed_zero2", 3: "deepspeed_zero3"}


def ds_fields(plan: DsPlan, r: Reading) -> dict[str, Any]:
    """dist / zero_offload of a DeepSpeed plan; ZeRO-1 is predicted as ZeRO-2 (a lower bound)."""
    if plan.stage == 0:
        raise ConfigError(
            plan.file,
            "zero_optimization.stage",
            0,
            "DeepSpeed without ZeRO is not an ftmem cell; allowed: 1 (predicted as 2), 2, 3",
        )
    if plan.stage == 1:
        r.flag(
            "zero_optimization.stage",
            1,
            "ZeRO-1 keeps every gradient on each rank; predicted as ZeRO-2, which shards them",
            "higher",
            plan.file,
        )
    return {"dist": _STAGE_DIST[plan.stage], "zero_offload": _offload(plan, r)}


def _offload(plan: DsPlan, r: Reading) -> str:
    if plan.offload_param != "none":
        if plan.stage != 3 or plan.offload_optimizer == "none":
            raise ConfigError(
                plan.file,
                "zero_optimization.offload_param.device",
                plan.offload_param,
                "ftmem models parameter offload with ZeRO-3 and optimizer offload together",
            )
        _flag_nvme(plan, r, "offload_param", plan.offload_param)
        return "optimizer_and_params"
    if plan.offload_optimizer != "none":
        _flag_nvme(plan, r, "offload_optimizer", plan.offload_optimizer)
        return "optimizer"
    return "none"


def _flag_nvme(plan: DsPlan, r: Reading, name: str, device: str) -> None:
    if device == "nvme":
        r.flag(
            f"zero_optimization.{name}.device",
            "nvme",
            "NVMe offload is predicted as CPU offload (the GPU side alike; its staging buffers differ)",
            "unknown",
            plan.file,
        )


# ------------------------------------------------------------------------------------------------
# accelerate config (accelerate launch --config_file)
# ------------------------------------------------------------------------------------------------
@dataclass
class AccelerateSetting:
    """What an accelerate config says: processes, mixed precision, and a DeepSpeed or FSDP setup."""

    file: Path
    num_processes: int | None
    mixed_precision: str | None
    ds: DsPlan | None = None
    fsdp: FsdpSetting | None = None
    unrecognised: list[str] = field(default_factory=list)


_ACCELERATE_HARMLESS = {
    "compute_environment",
    "debug",
    "downcast_bf16",
    "enable_cpu_affinity",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "main_training_function",
    "num_machines",
    "rdzv_backend",
    "same_network",
    "tpu_env",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "use_cpu",
    "gpu_ids",
    "dynamo_config",
}


def read_accelerate(path: Path, data: dict[str, Any]) -> AccelerateSetting:
    kind = data.get("distributed_type", "NO")
    allowed = ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
    if kind not in allowed:
        raise ConfigError(path, "distributed_type", kind, f"allowed: {', '.join(allowed)} (ftmem's cells)")
    procs = data.get("num_processes")
    if procs is not None and (not isinstance(procs, int) or isinstance(procs, bool) or procs < 1):
        raise ConfigError(path, "num_processes", procs, "must be an integer >= 1")
    mp = data.get("mixed_precision", "no")
    if mp not in ("no", "fp16", "bf16", None):
        raise ConfigError(path, "mixed_precision", mp, "allowed: no, fp16, bf16")
    setting = AccelerateSetting(path, procs, None if mp in ("no", None) else mp)
    if kind == "DEEPSPEED":
        setting.ds = _accelerate_ds(path, data.get("deepspeed_config") or {})
    if kind == "FSDP":
        # accelerate utils/dataclasses.py: FSDP_VERSION defaults to 1 when the config does not say.
        setting.fsdp = fsdp_from_config(path, "fsdp_config", data.get("fsdp_config") or {}, 1)
    known = _ACCELERATE_HARMLESS | {
        "distributed_type",
        "num_processes",
        "mixed_precision",
        "deepspeed_config",
        "fsdp_config",
    }
    setting.unrecognised = sorted(k for k in data if k not in known)
    return setting


def _accelerate_ds(path: Path, section: dict[str, Any]) -> DsPlan:
    """accelerate's deepspeed_config: a deepspeed_config_file, or zero_stage / offload_*_device inline
    (accelerate builds the JSON from them; DeepSpeed's defaults fill the rest, as in ftmem's cells)."""
    if section.get("deepspeed_config_file"):
        return load_ds(section["deepspeed_config_file"], path, "deepspeed_config.deepspeed_config_file")
    # accelerate utils/dataclasses.py DeepSpeedPlugin: zero_stage from ACCELERATE_DEEPSPEED_ZERO_STAGE, default 2.
    zero = {"stage": section.get("zero_stage", 2)}
    for name in ("offload_optimizer", "offload_param"):
        device = section.get(f"{name}_device", "none")
        zero[name] = {"device": device}
    plan = ds_plan(
        {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}},
        path,
        "deepspeed_config",
    )
    plan.grad_accum = section.get("gradient_accumulation_steps", "auto")
    return plan


# ------------------------------------------------------------------------------------------------
# DeepSpeed memory knobs against the config ftmem's cells run (bench/multigpu/deepspeed_config.py)
# ------------------------------------------------------------------------------------------------
#: zero_optimization sizes whose larger values hold more memory.
ZERO_SIZES = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "sub_group_size",
)
#: zero_optimization switches: the effect of turning them on where ftmem's cell has them off.
ZERO_SWITCHES = {
    "overlap_comm": "higher",
    "contiguous_gradients": "unknown",
    "reduce_scatter": "unknown",
    "allgather_partitions": "unknown",
}
ZERO_HARMLESS = frozenset(
    {
        "stage",
        "offload_optimizer",
        "offload_param",
        "cpu_offload",
        "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
        "round_robin_gradients",
        "elastic_checkpoint",
        "load_from_fp32_weights",
        "ignore_unused_parameters",
        "memory_efficient_linear",
        "legacy_stage1",
    }
)
DS_HANDLED = frozenset(
    {
        "zero_optimization",
        "optimizer",
        "bf16",
        "bfloat16",
        "fp16",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
    }
)
DS_HARMLESS = frozenset(
    {
        "gradient_clipping",
        "steps_per_print",
        "wall_clock_breakdown",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "scheduler",
        "prescale_gradients",
        "gradient_predivide_factor",
        "activation_checkpointing",
        "flops_profiler",
        "tensorboard",
        "wandb",
        "csv_monitor",
        "comms_logger",
        "checkpoint",
        "aio",
        "dump_state",
        "memory_breakdown",
    }
)


def _auto_size(key: str, hidden: int) -> int | None:
    """transformers integrations/deepspeed.py fills these "auto" values from the model's hidden size."""
    return {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }.get(key)


def flag_zero_knobs(plan: DsPlan, reference: dict[str, Any], hidden: int, r: Reading) -> None:
    """Flag every zero_optimization value that differs from ftmem's cell (`reference`, its zero section)."""
    for key, value in plan.zero.items():
        if key in ZERO_HARMLESS:
            continue
        name = f"zero_optimization.{key}"
        if key in ZERO_SWITCHES:
            ours = reference.get(key, True)
            if bool(value) != bool(ours):
                effect = ZERO_SWITCHES[key] if value else _opposite(ZERO_SWITCHES[key])
                r.flag(name, value, f"ftmem's cell runs {key} {ours}", effect, plan.file)
        elif key in ZERO_SIZES:
            _flag_size(plan, key, value, reference, hidden, r)
        else:
            r.unrecognised.append(f"{plan.file.name}: {name}")
    r.unrecognised += [f"{plan.file.name}: {k}" for k in plan.top_keys if k not in DS_HANDLED | DS_HARMLESS]


def _flag_size(
    plan: DsPlan, key: str, value: Any, reference: dict[str, Any], hidden: int, r: Reading
) -> None:
    ours = reference.get(key)
    if ours is None:  # not a knob of this stage: DeepSpeed ignores it
        return
    size = _auto_size(key, hidden) if value == "auto" else value
    if not isinstance(size, (int, float)) or isinstance(size, bool):
        r.flag(f"zero_optimization.{key}", value, "a value ftmem cannot size", "unknown", plan.file)
    elif size != ours:
        effect = "higher" if size > ours else "lower"
        r.flag(
            f"zero_optimization.{key}",
            value,
            f"{int(size):,} against ftmem's {int(ours):,}",
            effect,
            plan.file,
        )


def _opposite(effect: str) -> str:
    return {"higher": "lower", "lower": "higher"}.get(effect, effect)
