"""The spec, resolved into what bench.model.build really makes of it: the architecture description, storage
dtypes, autocast, what is trainable, and the answer ftmem gives (`Prediction`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bench.model.arch import GATED_ACTIVATIONS, Arch, UnsupportedArchitecture, describe
from bench.model.registry import ARCHITECTURES, architecture
from bench.spec import KBIT_METHODS, LORA_METHODS, CellSpec

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "uint8": 1, "bool": 1, "int32": 4, "int64": 8}


@dataclass(frozen=True)
class Prediction:
    """Predicted steady-state memory of a cell.

    `components` are the terms of `peak_allocated_bytes` at the peak moment (`peak_phase`) and sum to it;
    `outside_allocated` holds what torch's allocated figure does not count (allocator slack, CUDA context,
    non-torch process memory, paged optimizer state in unified memory). `notes` say what was assumed
    (a multimodal config's language model, for instance).
    """

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    nvml_process_bytes: int
    components: dict[str, int]
    peak_phase: str = ""
    outside_allocated: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: reserved without the budget's cap (the allocator's slack in full): what a real card of that size sees
    uncapped_reserved_bytes: int = 0
    #: allocated, reserved and NVML come from the caching allocator's replay (analysis.predict.simulate)
    simulated: bool = False


@dataclass(frozen=True)
class Setup:
    """What bench.model.build makes of a spec: the architecture, storage dtypes, autocast, what is trainable."""

    spec: CellSpec
    arch: dict
    desc: Arch
    tokens: int  # tokens of one micro-batch (seq_len x batch_size); grad_accum does not multiply activations
    autocast: str | None  # bf16 / fp16 under *_mixed, None otherwise
    base: str  # storage dtype of unquantized decoder weights (bench.model.build.base_dtype)
    other: str  # embedding, lm_head, norm weights and biases: fp32 after prepare_model_for_kbit_training
    quant: str | None  # nf4 / fp4 / int8 for the k-bit methods
    adapter: str | None  # LoRA adapter dtype
    full: bool

    @property
    def dims(self) -> dict[str, int]:
        a = self.desc
        return {
            "h": a.hidden,
            "i": a.intermediate,
            "L": a.layers,
            "H": a.heads,
            "KV": a.kv_heads,
            "d": a.head_dim,
            "V": a.vocab,
            "q": a.q,
            "kv": a.kv,
        }

    @property
    def tied(self) -> bool:
        return self.desc.tied


def _base_dtype(spec: CellSpec) -> str:
    """bench.model.build.base_dtype: full fine-tuning under *_mixed keeps fp32 weights (they are the master copy);
    a frozen LoRA / k-bit base is stored in the half dtype, as users load it."""
    if spec.precision == "fp32":
        return "fp32"
    if spec.precision == "bf16":
        return "bf16"
    if spec.method == "full":
        return "fp32"
    return {"bf16_mixed": "bf16", "fp16_mixed": "fp16"}[spec.precision]


def _adapter_dtype(spec: CellSpec, base: str) -> str | None:
    """peft creates adapters in the base layer's float dtype (bnb Linear4bit: its compute dtype; int8 has
    none, so fp32 stays) and, unless autocast_adapter_dtype=False (pure bf16 here), upcasts half ones to fp32."""
    if spec.method not in LORA_METHODS:
        return None
    made = {"lora": base, "qlora": spec.quant_compute_dtype, "lora8bit": "fp32"}[spec.method]
    return made if spec.precision == "bf16" else "fp32"


def _check_predictable(desc: Arch, arch: dict, spec: CellSpec) -> None:
    """Refuse, with the reason, what the walk does not model (never a silent guess)."""
    if desc.act not in GATED_ACTIVATIONS:
        raise UnsupportedArchitecture(f"hidden activation {desc.act!r} is not modelled ({', '.join(GATED_ACTIVATIONS)})")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if arch.get(key) is not None:
            raise UnsupportedArchitecture(f"{key} {arch[key]!r}: logit soft-capping is not modelled")
    if arch.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UnsupportedArchitecture("partial_rotary_factor != 1 (partial RoPE) is not modelled")
    if desc.moe is not None and not all(desc.moe.sparse):
        raise UnsupportedArchitecture("dense MLP layers inside a mixture-of-experts model (mlp_only_layers, "
                                      "decoder_sparse_step) are not modelled")
    if spec.attn_impl == "sdpa_flash" and desc.windowed_layers(spec.seq_len):
        raise UnsupportedArchitecture(
            f"sdpa_flash: the sliding-window layers need an attention mask at seq_len {spec.seq_len} "
            f">= sliding_window {desc.sliding_window}, which SDPA's flash kernel cannot take (the cell fails)"
        )


def setup(spec: CellSpec, arch: dict | None = None) -> Setup:
    """Resolve a spec; UnsupportedArchitecture (with the reason) for what the predictor cannot describe."""
    arch = arch or architecture(spec.model)
    desc = describe(arch)
    _check_predictable(desc, arch, spec)
    if spec.attn_impl == "sdpa_flash":  # the flash backend SDPA picks for these shapes anyway
        spec = dataclasses.replace(spec, attn_impl="sdpa")
    base = _base_dtype(spec)
    upcast = spec.method in KBIT_METHODS and bool(spec.kbit_fp32_upcast)
    quant = {"qlora": spec.quant_type, "lora8bit": "int8"}.get(spec.method)
    return Setup(
        spec=spec,
        arch=arch,
        desc=desc,
        tokens=spec.seq_len * spec.batch_size,
        autocast={"bf16_mixed": "bf16", "fp16_mixed": "fp16"}.get(spec.precision),
        base=base,
        other="fp32" if upcast else base,
        quant=quant,
        adapter=_adapter_dtype(spec, base),
        full=spec.method == "full",
    )


def promote(a: str, b: str) -> str:
    """torch type promotion between float dtypes (bf16 with fp16 gives fp32)."""
    return a if a == b else "fp32"


def as_spec(spec: dict | CellSpec, arch: dict | None) -> CellSpec:
    """A validated CellSpec; with an explicit `arch`, a model name unknown to bench.model.registry is allowed."""
    if isinstance(spec, CellSpec):
        return spec
    data = dict(spec)
    if isinstance(data.get("lora_targets"), list):
        data["lora_targets"] = tuple(data["lora_targets"])
    if arch is not None and data.get("model") not in ARCHITECTURES:
        return CellSpec(**data)
    return CellSpec.create(**data)


def notes(st: Setup) -> tuple[str, ...]:
    """What the prediction assumed that a user should know."""
    out = []
    if st.desc.multimodal:
        kind = st.arch.get("_multimodal_type", "multimodal")
        out.append(f"{kind} config: its language model (text_config) is trained; the vision tower is not built")
    return tuple(out)
