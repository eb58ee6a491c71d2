"""Static state: weights by storage format, LoRA adapters, gradients, optimizer state."""

from __future__ import annotations

import math

from analysis.predict.resolve import BYTES, Setup


def nf4_linear_bytes(n: int, double_quant: bool) -> int:
    """bitsandbytes Params4bit: two 4-bit codes per byte, one absmax per 64-element block (fp32), and a
    16-entry fp32 code table per layer (one 512-byte allocator block). With double quantization the
    absmax are themselves 8-bit, blockwise over 256 with fp32 absmax, plus an fp32 offset."""
    packed, blocks = (n + 1) // 2, math.ceil(n / 64)
    if not double_quant:
        return packed + 4 * blocks + 512
    return packed + blocks + 4 * math.ceil(blocks / 256) + 512 + 512


def int8_linear_bytes(fan_in: int, fan_out: int) -> int:
    """LLM.int8 (Int8Params): one int8 per weight and one fp32 scale (SCB) per output row."""
    return fan_in * fan_out + 4 * fan_out


def decoder_weight_bytes(st: Setup) -> int:
    """The projections of every layer, in their storage format (4-bit, 8-bit or base dtype)."""
    per_layer = 0
    for p in st.desc.projections:
        if st.quant in ("nf4", "fp4"):
            per_layer += nf4_linear_bytes(p.numel, bool(st.spec.double_quant))
        elif st.quant == "int8":
            per_layer += int8_linear_bytes(p.fan_in, p.fan_out)
        else:
            per_layer += p.numel * BYTES[st.base]
    return per_layer * st.dims["L"]


def expert_weight_bytes(st: Setup) -> int:
    """Every MoE layer's expert stacks and router, never quantized (see analysis.predict.moe)."""
    m = st.desc.moe
    if m is None:
        return 0
    per_layer = (m.expert_params + m.experts) * st.dims["h"]
    return sum(m.sparse) * per_layer * BYTES[st.other]


def _expert_trainables(st: Setup) -> list[int]:
    """Trainable tensors of one MoE layer's experts: the stacks and router (full fine-tuning), or
    peft's ParamWrapper adapters of the targeted stacks, A (E r x in) and B (out x E r)."""
    m, h = st.desc.moe, st.dims["h"]
    if m is None:
        return []
    stacks = m.stacks(h)
    if st.full:
        return [e * fan_in * fan_out for e, fan_in, fan_out in stacks.values()] + [m.experts * h]
    r = st.spec.lora_r
    return [n for t in st.spec.lora_targets if t in stacks
            for n in (stacks[t][0] * r * stacks[t][1], stacks[t][2] * stacks[t][0] * r)]


def small_layer_params(st: Setup) -> int:
    """Norm weights and projection biases of one decoder layer (never quantized)."""
    return sum(st.desc.layer_norm_widths) + sum(st.desc.layer_bias_widths)


def unquantized_weight_bytes(st: Setup) -> int:
    """Embedding, lm_head (none when tied), norm weights and biases, never quantized; fp32 when
    prepare_model_for_kbit_training upcasts every non-4-bit half parameter (kbit_fp32_upcast)."""
    a = st.desc
    small = a.layers * small_layer_params(st) + a.hidden
    return (a.embedding_params + a.lm_head_params + small) * BYTES[st.other]


def trainable_groups(st: Setup) -> dict[str, list[int]]:
    """Element counts of the trainable tensors by group ("layer" lists one decoder layer's): every
    parameter for full fine-tuning, else LoRA A (r x in) and B (out x r) of each targeted projection."""
    a, spec = st.desc, st.spec
    if st.full:
        layer = [p.numel for p in a.projections] + list(a.layer_norm_widths) + list(a.layer_bias_widths)
        head = [] if a.tied else [a.lm_head_params]
        layer += _expert_trainables(st)
        return {"embedding": [a.embedding_params], "lm_head": head, "layer": layer, "final_norm": [a.hidden]}
    names = set(a.projection_names)
    layer = [
        n
        for t in spec.lora_targets
        if t in names
        for n in (spec.lora_r * a.projection(t).fan_in, spec.lora_r * a.projection(t).fan_out)
    ]
    return {"embedding": [], "lm_head": [], "layer": layer + _expert_trainables(st), "final_norm": []}


def trainable_shapes(st: Setup) -> list[int]:
    """Element counts of every trainable tensor of the model."""
    groups = trainable_groups(st)
    return groups["embedding"] + groups["lm_head"] + groups["layer"] * st.dims["L"] + groups["final_norm"]


def trainable_dtype(st: Setup) -> str:
    return st.base if st.full else st.adapter


def adapter_bytes(st: Setup) -> int:
    """LoRA A and B of every targeted projection (fp32 under mixed precision, see setup._adapter_dtype)."""
    return 0 if st.full else sum(trainable_shapes(st)) * BYTES[st.adapter]


def grad_bytes(st: Setup) -> int:
    """One gradient per trainable parameter, in the parameter's dtype (AccumulateGrad keeps its dtype)."""
    return sum(trainable_shapes(st)) * BYTES[trainable_dtype(st)]


def optimizer_state_bytes(st: Setup) -> tuple[int, int]:
    """(device bytes, paged unified-memory bytes) of the optimizer state after the first step.

    torch AdamW (default, foreach, fused): exp_avg and exp_avg_sq in the parameter's dtype (so 2 x fp32
    for fp32 adapters, 2 x bf16 under pure bf16); the step counters are CPU tensors except for fused
    (one 4-byte device tensor each, a 512-byte block). bitsandbytes 8-bit AdamW: two uint8 states plus
    one fp32 absmax per 256-element block each (bnb 0.50; older releases used 2048-element blocks),
    fp32 states for tensors under 4096 elements. Paged optimizers put the state of tensors of 1e5
    elements or more in cudaMallocManaged memory, which torch's allocator does not count. SGD
    without momentum keeps nothing.
    """
    opt, pdt = st.spec.optimizer, BYTES[trainable_dtype(st)]
    device = paged = 0
    for n in trainable_shapes(st):
        if opt == "sgd":
            continue
        if opt in ("adamw", "adamw_foreach", "adamw_fused"):
            device += 2 * n * pdt + (512 if opt == "adamw_fused" else 0)
            continue
        eight = opt != "paged_adamw_32bit" and n >= 4096
        states = 2 * n * (1 if eight else 4)
        device += 2 * 4 * math.ceil(n / 256) if eight else 0
        if opt.startswith("paged") and n >= 100_000:
            paged += states
        else:
            device += states
    return device + (2 * 256 * 4 if opt in ("adamw_8bit", "paged_adamw_8bit") else 0), paged


def optimizer_step_transient(st: Setup) -> int:
    """Extra memory of optimizer.step(): torch's foreach AdamW (the default on CUDA) computes
    sqrt(exp_avg_sq) for all parameters of a dtype group at once, a temporary as large as the
    parameters; fused AdamW, SGD and bitsandbytes update in place, tensor by tensor."""
    if st.spec.optimizer in ("adamw", "adamw_foreach"):
        return sum(trainable_shapes(st)) * BYTES[trainable_dtype(st)]
    return 0


def weight_bytes(st: Setup) -> int:
    """Every parameter in its storage format: decoder projections, experts, embedding/lm_head/norms, adapters."""
    return decoder_weight_bytes(st) + expert_weight_bytes(st) + unquantized_weight_bytes(st) + adapter_bytes(st)
