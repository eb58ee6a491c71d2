"""The cell spec: one frozen object holding every knob that changes training memory.

A spec is validated when it is built (`CellSpec.create` or `from_dict`), serialised verbatim
into its result row, and identified by `cell_id`, a hash of its canonical JSON. Fields that do
not apply to a method are normalised to None (LoRA fields for full fine-tuning, quantization
fields for unquantized methods), so two specs that train the same way share one id.
This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from bench.cards import BUDGET_ALLOWED, budget_bytes
from bench.model.arch import describe
from bench.model.registry import (
    ALL_LINEAR,
    LINEAR_PROJECTIONS,
    ModelConfigError,
    UnknownModelError,
    architecture,
    linear_shapes,
    lora_target_names,
    resolve,
)

METHODS = ("full", "lora", "qlora", "lora8bit")
PRECISIONS = ("fp32", "fp16_mixed", "bf16_mixed", "bf16")
OPTIMIZERS = (
    "adamw",
    "adamw_fused",
    "adamw_foreach",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "sgd",
)
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
ATTN_IMPLS = ("eager", "sdpa", "sdpa_flash", "flash_attention_2")
#: Attention that runs FlashAttention-2 kernels: flash-attn itself, or PyTorch SDPA held to its flash backend.
FLASH_ATTN_IMPLS = ("sdpa_flash", "flash_attention_2")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
DEVICES = ("cuda", "cpu")
LORA_METHODS = ("lora", "qlora", "lora8bit")
KBIT_METHODS = ("qlora", "lora8bit")
#: Multi-GPU strategies (bench.multigpu.dist): none = the single-process cell.
DISTS = ("none", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")
DEEPSPEED_DISTS = ("deepspeed_zero2", "deepspeed_zero3")
ZERO_OFFLOADS = ("none", "optimizer", "optimizer_and_params")


#: Fields added after the first published results, with the default that keeps them out of cell ids.
#: A new knob goes here with its default (and into CellSpec and _TYPES).
LATER_FIELDS: dict[str, Any] = {
    "profile_memory": False,
    "snapshot": False,
    "gpus": 1,
    "dist": "none",
    "zero_offload": "none",
    "expandable_segments": False,
    "router_aux_loss": False,
}


def at_later_default(name: str, value: Any) -> bool:
    """A knob of LATER_FIELDS at its default, or absent (None, in a row written before it existed):
    such a field sets no spec apart from the specs that lack it."""
    return name in LATER_FIELDS and value in (None, LATER_FIELDS[name])


class SpecError(ValueError):
    """An invalid spec: the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: {value!r} is not allowed; {allowed}")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return field(default=default, metadata={"help": text}, **kw)


def _choices(allowed: tuple[str, ...], prefix: str = "", **notes: str) -> str:
    """Help text of a choice field, made from the tuple it is validated against (so `ftmem run --help`
    cannot list a value validation refuses); `notes` explain some values."""
    unknown = set(notes) - set(allowed)
    if unknown:
        raise ValueError(f"help notes for values that are not allowed: {sorted(unknown)}")
    return prefix + " | ".join(f"{c} ({notes[c]})" if c in notes else c for c in allowed)


#: Upper bounds of the counts: far past any real cell, low enough that a typo is refused at once.
COUNT_LIMITS = {
    "seq_len": 1 << 20,
    "batch_size": 4096,
    "grad_accum": 4096,
    "steps": 1000,
    "warmup_steps": 1000,
    "gpus": 4096,
}


@dataclass(frozen=True)
class CellSpec:
    """One cell of a grid. Every field is part of the cell's identity (`cell_id`)."""

    model: str = _help(
        "shipped model (`ftmem models`: short name or hub id), a folder holding a config.json (weights "
        "optional), or a hub id in the local Hugging Face cache"
    )
    method: str = _help(_choices(METHODS, qlora="4-bit base", lora8bit="LLM.int8 base"))
    seq_len: int = _help("tokens per sequence")
    batch_size: int = _help("sequences per micro-batch")
    precision: str = _help(
        _choices(
            PRECISIONS,
            fp16_mixed="autocast, fp32 trainable/master weights",
            bf16_mixed="autocast, fp32 trainable/master weights",
            bf16="pure",
        ),
        "bf16_mixed",
    )
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    lora_r: int | None = _help("LoRA rank", 8)
    lora_alpha: int | None = _help("LoRA alpha", 16)
    lora_targets: tuple[str, ...] | None = _help(
        "projections given adapters (module names of a decoder layer), or all-linear", LINEAR_PROJECTIONS
    )
    lora_dropout: float | None = _help("LoRA dropout (a dropout mask per target costs memory)", 0.0)
    quant_type: str | None = _help(_choices(QUANT_TYPES, "qlora: "), "nf4")
    double_quant: bool | None = _help("qlora: quantize the absmax constants too", False)
    quant_compute_dtype: str | None = _help(
        _choices(COMPUTE_DTYPES, "qlora: bnb_4bit_compute_dtype, "), "bf16"
    )
    kbit_fp32_upcast: bool | None = _help(
        "qlora/lora8bit: cast the non-quantized modules to fp32 as prepare_model_for_kbit_training does",
        True,
    )
    optimizer: str = _help(
        _choices(
            OPTIMIZERS,
            adamw="torch default",
            adamw_8bit="bitsandbytes",
            paged_adamw_8bit="bitsandbytes",
            paged_adamw_32bit="bitsandbytes",
        ),
        "adamw",
    )
    gradient_checkpointing: bool = _help("recompute activations in backward", False)
    gc_reentrant: bool | None = _help("reentrant checkpointing (torch.utils.checkpoint)", False)
    attn_impl: str = _help(
        _choices(
            ATTN_IMPLS,
            sdpa="PyTorch picks the kernel",
            sdpa_flash="SDPA held to its FlashAttention-2 backend",
            flash_attention_2="the flash-attn package",
        ),
        "sdpa",
    )
    compile: bool = _help("torch.compile each decoder layer", False)
    fused_ce: bool = _help("liger-kernel fused linear cross-entropy", False)
    budget_gb: float | str | None = _help(f"memory cap per GPU: {BUDGET_ALLOWED}", None)
    warmup_steps: int = _help("optimizer steps before measuring (>= 1: the first step has its own peak)", 1)
    steps: int = _help("measured optimizer steps", 3)
    seed: int = _help("seed of the random weights and tokens", 0)
    device: str = _help(_choices(DEVICES), "cuda")
    profile_memory: bool = _help(
        "profile warm-up + first measured step with torch's memory profiler (by category; costs memory)",
        False,
    )
    snapshot: bool = _help(
        "cuda: dump the allocator snapshot (memory_viz pickle) of the profiled steps", False
    )
    gpus: int = _help("processes (one GPU each) over all nodes; budget_gb and the peaks are per GPU", 1)
    dist: str = _help(
        _choices(DISTS, fsdp2="torch fully_shard") + ": how the ranks share the work",
        "none",
    )
    zero_offload: str = _help(
        _choices(
            ZERO_OFFLOADS,
            "DeepSpeed ZeRO-Offload to CPU: ",
            optimizer="ZeRO-2/3",
            optimizer_and_params="ZeRO-3",
        ),
        "none",
    )
    expandable_segments: bool = _help(
        "cuda: the caching allocator grows expandable segments (PYTORCH_CUDA_ALLOC_CONF="
        "expandable_segments:True) instead of fixed blocks, against OOMs from fragmentation",
        False,
    )
    router_aux_loss: bool = _help(
        "mixture-of-experts models: add the router's load-balancing loss (output_router_logits)", False
    )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, **kwargs: Any) -> CellSpec:
        """Build, normalise and validate a spec; raises SpecError naming the key on bad input."""
        known = {f.name for f in fields(cls)}
        for key in kwargs:
            if key not in known:
                raise SpecError(key, kwargs[key], f"unknown key; allowed keys: {', '.join(sorted(known))}")
        for key in ("model", "method", "seq_len", "batch_size"):
            if key not in kwargs:
                raise SpecError(key, None, "this key is required")
        if isinstance(kwargs.get("lora_targets"), list):
            kwargs["lora_targets"] = tuple(kwargs["lora_targets"])
        spec = cls(**kwargs)
        _check_types(spec)
        spec = dataclasses.replace(spec, **_normalised(spec))
        validate(spec)
        return spec

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellSpec:
        return cls.create(**data)

    # -- identity ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["lora_targets"] is not None:
            out["lora_targets"] = list(out["lora_targets"])
        return out

    def canonical_json(self) -> str:
        """The spec's JSON for its id. Fields added after results were first published are left
        out while they hold their default, so the ids of earlier cells (and resuming their
        sweeps) do not change when a knob is added."""
        data = {k: v for k, v in self.to_dict().items() if not at_later_default(k, v)}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @property
    def budget_bytes(self) -> int | None:
        return budget_bytes(self.budget_gb)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "method": (str,),
    "seq_len": (int,),
    "batch_size": (int,),
    "precision": (str,),
    "grad_accum": (int,),
    "lora_r": (int, type(None)),
    "lora_alpha": (int, float, type(None)),
    "lora_targets": (tuple, type(None)),
    "lora_dropout": (int, float, type(None)),
    "quant_type": (str, type(None)),
    "double_quant": (bool, type(None)),
    "quant_compute_dtype": (str, type(None)),
    "kbit_fp32_upcast": (bool, type(None)),
    "optimizer": (str,),
    "gradient_checkpointing": (bool,),
    "gc_reentrant": (bool, type(None)),
    "attn_impl": (str,),
    "compile": (bool,),
    "fused_ce": (bool,),
    "budget_gb": (int, float, str, type(None)),
    "warmup_steps": (int,),
    "steps": (int,),
    "seed": (int,),
    "device": (str,),
    "profile_memory": (bool,),
    "snapshot": (bool,),
    "gpus": (int,),
    "dist": (str,),
    "zero_offload": (str,),
    "expandable_segments": (bool,),
    "router_aux_loss": (bool,),
}


def _check_types(spec: CellSpec) -> None:
    for f in fields(spec):
        check_field(f.name, getattr(spec, f.name))


_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "precision": PRECISIONS,
    "optimizer": OPTIMIZERS,
    "attn_impl": ATTN_IMPLS,
    "device": DEVICES,
    "quant_type": QUANT_TYPES,
    "quant_compute_dtype": COMPUTE_DTYPES,
    "dist": DISTS,
    "zero_offload": ZERO_OFFLOADS,
}
FIELD_NAMES = tuple(_TYPES)


def check_field(key: str, value: Any) -> None:
    """Check one field on its own (known key, type, allowed value); combinations are not checked."""
    if key not in _TYPES:
        raise SpecError(key, value, f"unknown key; allowed keys: {', '.join(sorted(_TYPES))}")
    if key == "lora_targets" and isinstance(value, list):
        value = tuple(value)
    allowed = _TYPES[key]
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise SpecError(key, value, f"expected {names}")
    if key in _CHOICES and value is not None:
        _one_of(key, value, _CHOICES[key])
    if key == "lora_targets" and value is not None:
        for target in value:
            if not isinstance(target, str) or not target:
                raise SpecError(key, target, "module names of a decoder layer's projections, or all-linear")
    if key in COUNT_LIMITS and not 1 <= value <= COUNT_LIMITS[key]:
        raise SpecError(key, value, f"must be >= 1 and <= {COUNT_LIMITS[key]}")
    if key == "budget_gb" and value is not None:
        try:
            budget_bytes(value)
        except ValueError:
            raise SpecError(key, value, BUDGET_ALLOWED) from None


def _normalised(spec: CellSpec) -> dict[str, Any]:
    """Fields that do not apply to this spec's method set to None (one id per real configuration)."""
    out: dict[str, Any] = {}
    if spec.method not in LORA_METHODS:
        out.update(lora_r=None, lora_alpha=None, lora_targets=None, lora_dropout=None)
    if spec.method != "qlora":
        out.update(quant_type=None, double_quant=None, quant_compute_dtype=None)
    if spec.method not in KBIT_METHODS:
        out.update(kbit_fp32_upcast=None)
    if not spec.gradient_checkpointing:
        out.update(gc_reentrant=None)
    if isinstance(spec.budget_gb, int) and not isinstance(spec.budget_gb, bool):
        out.update(budget_gb=float(spec.budget_gb))
    try:  # a hub id of a shipped config names the same cell as its short name
        out.update(model=resolve(spec.model))
    except UnknownModelError:
        pass  # validate() says what is wrong
    if spec.method in LORA_METHODS and spec.lora_targets in ((ALL_LINEAR,), LINEAR_PROJECTIONS):
        # all-linear, and the default (every projection), resolve to the model's own module names
        # (Phi-3's are fused: qkv_proj, gate_up_proj); for Qwen3 and Llama they are the default itself.
        try:
            out.update(lora_targets=tuple(linear_shapes(architecture(out.get("model", spec.model)))))
        except (UnknownModelError, ValueError):
            pass
    return out


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(key, value, f"allowed: {', '.join(allowed)}")


def _positive(spec: CellSpec, *keys: str, minimum: int = 1) -> None:
    for key in keys:
        if getattr(spec, key) < minimum:
            raise SpecError(key, getattr(spec, key), f"must be >= {minimum}")


def validate(spec: CellSpec) -> None:
    """Reject values out of range and impossible combinations, naming key, value and what is allowed."""
    _one_of("method", spec.method, METHODS)
    _one_of("precision", spec.precision, PRECISIONS)
    _one_of("optimizer", spec.optimizer, OPTIMIZERS)
    _one_of("attn_impl", spec.attn_impl, ATTN_IMPLS)
    _one_of("device", spec.device, DEVICES)
    # The routine always takes a first (warm-up) step with its own peak, so warmup_steps >= 1.
    _positive(spec, "seq_len", "batch_size", "grad_accum", "steps", "warmup_steps")
    _positive(spec, "seed", minimum=0)
    try:
        arch = architecture(spec.model)
    except ModelConfigError as err:
        raise SpecError("model", spec.model, f"its config is not usable: {err}") from None
    except UnknownModelError:
        raise SpecError(
            "model",
            spec.model,
            "allowed: a shipped model (`ftmem models`: short name or hub id), a folder holding a config.json, "
            "or a hub id in the local Hugging Face cache (nothing is downloaded)",
        ) from None
    if spec.seq_len > arch.get("max_position_embeddings", spec.seq_len):
        raise SpecError(
            "seq_len", spec.seq_len, f"must be <= max_position_embeddings {arch['max_position_embeddings']}"
        )
    if spec.budget_gb is not None:
        try:
            budget_bytes(spec.budget_gb)
        except ValueError:
            raise SpecError("budget_gb", spec.budget_gb, BUDGET_ALLOWED) from None
    if spec.method in LORA_METHODS:
        _validate_lora(spec, arch)
    if spec.router_aux_loss and not _is_moe(arch):
        raise SpecError("router_aux_loss", True, "the router's loss exists for mixture-of-experts models only")
    if spec.method == "qlora":
        _one_of("quant_type", spec.quant_type, QUANT_TYPES)
        _one_of("quant_compute_dtype", spec.quant_compute_dtype, COMPUTE_DTYPES)
    _validate_combinations(spec)


def _is_moe(arch: dict) -> bool:
    try:
        return describe(arch).moe is not None
    except ValueError:
        return any(k in arch for k in ("num_experts", "num_local_experts"))


def _validate_lora(spec: CellSpec, arch: dict) -> None:
    if spec.lora_r is None or spec.lora_r < 1:
        raise SpecError("lora_r", spec.lora_r, "must be an integer >= 1 for LoRA methods")
    if spec.lora_alpha is None or spec.lora_alpha <= 0:
        raise SpecError("lora_alpha", spec.lora_alpha, "must be > 0 for LoRA methods")
    try:
        names = lora_target_names(arch)
    except ValueError:  # a model_type ftmem cannot describe: peft checks the names when it builds
        names = None
    if not spec.lora_targets:
        raise SpecError("lora_targets", spec.lora_targets, f"a non-empty subset of {', '.join(names or ())}")
    for target in spec.lora_targets:
        if names is not None:
            _one_of("lora_targets", target, (*names, ALL_LINEAR))
    if spec.lora_dropout is None or not 0 <= spec.lora_dropout < 1:
        raise SpecError("lora_dropout", spec.lora_dropout, "must be in [0, 1)")


def _validate_combinations(spec: CellSpec) -> None:
    if spec.attn_impl in FLASH_ATTN_IMPLS and spec.precision == "fp32":
        raise SpecError(
            "attn_impl",
            spec.attn_impl,
            f"{spec.attn_impl} needs fp16 or bf16: precision fp16_mixed, bf16_mixed or bf16, not fp32",
        )
    if spec.device == "cpu":
        cpu_rules = {
            "optimizer": (
                spec.optimizer in BNB_OPTIMIZERS,
                "bitsandbytes 8-bit and paged optimizers need device cuda",
            ),
            "attn_impl": (spec.attn_impl in FLASH_ATTN_IMPLS, f"{spec.attn_impl} needs device cuda"),
            "fused_ce": (spec.fused_ce, "liger fused cross-entropy (Triton) needs device cuda"),
            "budget_gb": (spec.budget_gb is not None, "a memory budget is emulated on device cuda only"),
            "precision": (spec.precision == "fp16_mixed", "fp16 autocast with GradScaler needs device cuda"),
            "snapshot": (spec.snapshot, "allocator snapshots (torch.cuda.memory) need device cuda"),
            "expandable_segments": (spec.expandable_segments, "expandable segments are a CUDA allocator setting"),
        }
        for key, (broken, why) in cpu_rules.items():
            if broken:
                raise SpecError(key, getattr(spec, key), why)
    if (
        spec.method in KBIT_METHODS
        and spec.precision == "fp32"
        and spec.quant_compute_dtype not in (None, "fp32")
    ):
        raise SpecError(
            "quant_compute_dtype", spec.quant_compute_dtype, "precision fp32 needs quant_compute_dtype fp32"
        )
    _validate_dist(spec)


def _validate_dist(spec: CellSpec) -> None:
    """Multi-GPU rules. dist != none with gpus 1 is allowed: one rank measures the wrapper's own cost
    (DDP buckets, ZeRO-Offload on one card, FSDP2's unsharded mesh). budget_gb applies to every GPU."""
    _one_of("dist", spec.dist, DISTS)
    _one_of("zero_offload", spec.zero_offload, ZERO_OFFLOADS)
    if spec.gpus > 1 and spec.dist == "none":
        raise SpecError("dist", spec.dist, f"gpus {spec.gpus} needs a strategy: {', '.join(DISTS[1:])}")
    if spec.zero_offload != "none" and spec.dist not in DEEPSPEED_DISTS:
        raise SpecError(
            "zero_offload",
            spec.zero_offload,
            "offload is DeepSpeed's: dist deepspeed_zero2 or deepspeed_zero3",
        )
    if spec.zero_offload == "optimizer_and_params" and spec.dist != "deepspeed_zero3":
        raise SpecError(
            "zero_offload",
            spec.zero_offload,
            "parameter offload needs dist deepspeed_zero3 (ZeRO-2 offloads the optimizer only)",
        )
    if spec.dist == "fsdp2" and spec.method in KBIT_METHODS:
        # bitsandbytes Params4bit / Int8Params are not DTensor-aware: fully_shard would shard the packed
        # storage without the quant_state. FSDP QLoRA needs bnb_4bit_quant_storage and FSDP1's flat params
        # (or torchao's NF4Tensor under FSDP2), neither of which the build here does.
        raise SpecError(
            "method",
            spec.method,
            "fsdp2 shards full, lora (4/8-bit bitsandbytes weights are not DTensor-aware)",
        )
    if spec.dist == "deepspeed_zero3" and spec.method in KBIT_METHODS:
        raise SpecError(
            "method",
            spec.method,
            "deepspeed_zero3 partitions full, lora (ZeRO-3 QLoRA needs bnb_4bit_quant_storage at load)",
        )
    if spec.dist in DEEPSPEED_DISTS:
        if spec.precision == "bf16" and spec.zero_offload != "none":
            raise SpecError(
                "zero_offload",
                spec.zero_offload,
                "pure bf16 (DeepSpeed's bf16 master weights and optimizer states) runs without offload: none",
            )
        if spec.optimizer not in ("adamw", "adamw_fused", "adamw_foreach"):
            raise SpecError(
                "optimizer",
                spec.optimizer,
                "DeepSpeed cells use its AdamW: adamw, adamw_fused, adamw_foreach",
            )
        if spec.compile:
            raise SpecError(
                "compile", spec.compile, "torch.compile of layers is not combined with DeepSpeed here"
            )
