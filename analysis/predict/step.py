"""The moments of a training step, and the single-GPU prediction.

The steady-state peak of a step is the static state (weights, adapters, optimizer state, cuBLAS
workspaces) plus the largest of a few moments: the end of the forward pass, the backward of the loss,
the backward of each decoder layer (the ends bound uniform layers; layers of different kinds, Gemma 3's
sliding and full ones, are each checked), and the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.predict.attention import eager_mask_bytes
from analysis.predict.calibration import CALIBRATION
from analysis.predict.graph import Graph
from analysis.predict.head import head_graph, loss_bytes
from analysis.predict.layer import layer_graph, stream_dtype
from analysis.predict.moe import router_aux_loss_bytes
from analysis.predict.resolve import BYTES, Prediction, Setup
from analysis.predict.state import (
    adapter_bytes,
    decoder_weight_bytes,
    expert_weight_bytes,
    grad_bytes,
    optimizer_state_bytes,
    optimizer_step_transient,
    trainable_dtype,
    trainable_groups,
    unquantized_weight_bytes,
)


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer's figures from its walk (`layer.layer_graph`)."""

    saved: int  # released as backward passes the layer (recomputed under checkpointing)
    kept: int  # kept by custom autograd Functions until the graph is freed (bitsandbytes int8)
    input_saved: int
    casts_saved: int
    casts_forward: int
    fwd_transient: int
    bwd_transient: int
    recompute_transient: int


@dataclass(frozen=True)
class Parts:
    """The byte counts the moments of a step are built from; `layers` has one entry per decoder layer."""

    static: dict[str, int]
    paged: int
    grads: int
    layer_grads: int
    acts: dict[str, int]
    forward_casts: int
    backward_casts: int
    loss: dict[str, int]
    layer_input: int
    layers: tuple[LayerParts, ...]

    # The last layer's figures (every layer's, where all are alike).
    @property
    def layer_saved(self) -> int:
        return self.layers[-1].saved + self.layers[-1].kept

    @property
    def layer_input_saved(self) -> int:
        return self.layers[-1].input_saved

    @property
    def layer_casts(self) -> int:
        return self.layers[-1].casts_saved

    @property
    def bwd_transient(self) -> int:
        return self.layers[-1].bwd_transient

    @property
    def recompute_transient(self) -> int:
        return self.layers[-1].recompute_transient

    @property
    def fwd_transient(self) -> int:
        return max(layer.fwd_transient for layer in self.layers)


def static_bytes(st: Setup) -> tuple[dict[str, int], int]:
    """Weights, adapters, optimizer state and cuBLAS workspaces, resident through the step; and the
    paged optimizer state, which lives in unified memory outside torch's allocator."""
    opt_device, paged = optimizer_state_bytes(st)
    names = {"nf4": "weights_nf4", "fp4": "weights_fp4", "int8": "weights_int8"}
    static = {
        names.get(st.quant, f"weights_{st.base}"): decoder_weight_bytes(st),
        f"experts_{st.other}": expert_weight_bytes(st),
        f"embed_head_norms_{st.other}": unquantized_weight_bytes(st),
        "lora_adapters": adapter_bytes(st),
        "optimizer_state": opt_device,
        "cublas_workspace": int(CALIBRATION["cublas_workspace_bytes"]),
    }
    return {k: v for k, v in static.items() if v}, paged


def compiled_layer_saved(st: Setup) -> int:
    """Saved bytes of one decoder layer under torch.compile (an estimate, not yet checked on a GPU).

    AOTAutograd's min-cut partitioner recomputes pointwise work in backward and saves only what cannot
    be recomputed cheaply: the layer input and the post-attention residual, the RMSNorm rstds, the outputs
    of the projections that feed pointwise ops (q, k, v, gate, up), the attention output and logsumexp,
    and the LoRA A outputs. Casts of inputs and weights are recomputed, never saved.
    """
    dm, spec, tokens = st.dims, st.spec, st.tokens
    stream = BYTES[stream_dtype(st)]
    proj = BYTES[stream_dtype(st)] if st.quant else BYTES[st.autocast or st.base]
    attn = BYTES[st.autocast or ("bf16" if spec.attn_impl == "flash_attention_2" else stream_dtype(st))]
    lora = len(spec.lora_targets or ()) * (spec.lora_r or 0) * BYTES[st.autocast or st.adapter or "fp32"]
    per_token = (
        2 * stream * dm["h"]
        + 2 * 4
        + proj * (dm["q"] + 2 * dm["kv"])
        + 4 * (dm["H"] + dm["KV"])
        + attn * dm["q"]
        + 4 * dm["H"]
        + lora
        + 2 * proj * dm["i"]
    )
    scores = spec.batch_size * dm["H"] * spec.seq_len**2 * 6 if spec.attn_impl == "eager" else 0
    return tokens * per_token + scores


def layer_backward_extra(st: Setup) -> int:
    """When weights train under autocast, the half-precision weight grad of the largest projection exists
    before it is cast to the parameter's dtype."""
    if st.full and st.autocast:
        return max(p.numel for p in st.desc.projections) * 2
    return 0


def _layer_parts(st: Setup, g: Graph) -> LayerParts:
    compiled = st.spec.compile
    return LayerParts(
        saved=compiled_layer_saved(st) if compiled else g.saved_bytes(),
        kept=0 if compiled else g.kept_bytes(),
        input_saved=0 if compiled else g.input_saved,
        casts_saved=0 if compiled else g.saved_casts(),
        casts_forward=g.forward_casts(),
        fwd_transient=g.fwd_transient,
        bwd_transient=g.bwd_transient + layer_backward_extra(st),
        recompute_transient=0 if compiled else g.recompute_transient + g.recompute_grads,
    )


def layer_parts(st: Setup) -> tuple[LayerParts, ...]:
    """Every layer's parts: the first (its input may need no grad) and each kind of attention, walked once."""
    windowed = st.desc.windowed_layers(st.spec.seq_len) > 0
    walked: dict[tuple[bool, bool], LayerParts] = {}
    out = []
    for i, kind in enumerate(st.desc.layer_types):
        key = (i == 0, windowed and kind == "sliding")
        if key not in walked:
            walked[key] = _layer_parts(st, layer_graph(st, first=key[0], windowed=key[1])[0])
        out.append(walked[key])
    return tuple(out)


def rope_tables_bytes(st: Setup) -> int:
    """cos and sin (tokens x head_dim, the embedding output's dtype), shared by every layer; Gemma 3 has
    one pair per kind of layer (local and global RoPE)."""
    sets = len(set(st.desc.layer_types)) if st.desc.family.sliding == "gemma" else 1
    return sets * 2 * st.tokens * st.dims["d"] * BYTES[st.other]


def activation_bytes(st: Setup, layers: tuple[LayerParts, ...], head: Graph) -> dict[str, int]:
    """Bytes held between forward and backward. Without checkpointing every layer's saved tensors;
    with it only each layer's input and the cos/sin tables (the checkpoint frames hold them), the rest
    recomputed one layer at a time in backward. What autograd Functions keep on ctx stays either way."""
    acts = {
        "final_norm_saved": head.saved_bytes(),
        "attention_mask": eager_mask_bytes(st),
        "rope_tables": rope_tables_bytes(st),
        "kept_by_autograd_functions": sum(layer.kept for layer in layers),
        "router_aux_loss_saved": router_aux_loss_bytes(st),
    }
    if st.spec.gradient_checkpointing:
        acts["layer_inputs"] = len(layers) * st.tokens * st.dims["h"] * BYTES[stream_dtype(st)]
    else:
        acts["layer_activations"] = sum(layer.saved for layer in layers)
    return acts


def parts(st: Setup) -> Parts:
    layers = layer_parts(st)
    head, logits_dtype = head_graph(st)
    static, paged = static_bytes(st)
    gc = st.spec.gradient_checkpointing
    layer_casts_saved = sum(layer.casts_saved for layer in layers)
    return Parts(
        static=static,
        paged=paged,
        grads=grad_bytes(st),
        layer_grads=sum(trainable_groups(st)["layer"]) * BYTES[trainable_dtype(st)],
        acts=activation_bytes(st, layers, head),
        forward_casts=sum(layer.casts_forward for layer in layers) + head.forward_casts(),
        backward_casts=(0 if gc else layer_casts_saved) + head.saved_casts(),
        loss=loss_bytes(st, logits_dtype),
        layer_input=st.tokens * st.dims["h"] * BYTES[stream_dtype(st)],
        layers=layers,
    )


def nonzero(terms: dict[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in terms.items() if v}


def _accumulated(st: Setup, p: Parts) -> dict[str, int]:
    """With grad_accum > 1 the peak micro-batch already holds every gradient from the earlier ones."""
    return {"grads_accumulated": p.grads} if st.spec.grad_accum > 1 else {}


def forward_moments(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """End of the forward (logits, their fp32 copy and log-probs all alive) and, for eager attention,
    the softmax of the last layer. Autocast's weight cache is alive throughout the forward."""
    held = {**p.static, **_accumulated(st, p), **p.acts, "autocast_weight_copies": p.forward_casts}
    moments = {
        "forward_end": nonzero({**held, "lm_head_input": p.layer_input, "loss_forward": p.loss["forward"]})
    }
    if p.fwd_transient:
        last = p.layers[-1]
        running = last.saved + last.kept - last.input_saved if st.spec.gradient_checkpointing else 0
        moments["forward_attention"] = nonzero(
            {**held, "layer_running": running, "attention_transient": p.fwd_transient}
        )
    return moments


def loss_backward_moments(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """Backward of the loss (3 x fp32 b x s x V), then lm_head's backward: the logits grad in the compute
    dtype and, when lm_head trains, its weight grad (half copy, then the parameter-dtype grad)."""
    held = {**p.static, **_accumulated(st, p), **p.acts, "autocast_weight_copies": p.backward_casts}
    moments = {"loss_backward": nonzero({**held, "loss_backward": p.loss["backward"]})}
    if st.full:
        dm = st.dims
        head_grad = dm["V"] * dm["h"] * (BYTES[trainable_dtype(st)] + (2 if st.autocast else 0))
        moments["lm_head_backward"] = nonzero(
            {
                **held,
                "logits_grad": p.loss["logits_grad"],
                "lm_head_grads": 0 if st.spec.grad_accum > 1 else head_grad,
            }
        )
    return moments


def _layer_backward(st: Setup, p: Parts, k: int) -> dict[str, int]:
    """The backward of layer k: layers above it are done (their grads made, their saved tensors released),
    layers 0..k still hold theirs. Under checkpointing the layer's recomputed tensors join the held inputs;
    a norm that saves an fp32 input as is saves the checkpoint's own input (in layer_inputs already),
    which is not counted twice. Checkpointing's recomputation runs inside the layer's backward, before
    any of its grads exist: its working set (less the layer's grads) competes with the backward's own."""
    L, gc, accum = st.dims["L"], st.spec.gradient_checkpointing, st.spec.grad_accum > 1
    layer, done = p.layers[k], L - 1 - k
    acts = dict(p.acts, final_norm_saved=0)
    if gc:
        acts["layer_inputs"] -= done * p.layer_input
        acts["recomputed_layer"] = layer.saved + layer.kept - layer.input_saved
        casts = layer.casts_saved
    else:
        acts["layer_activations"] = sum(x.saved for x in p.layers[: k + 1])
        casts = p.backward_casts - sum(x.casts_saved for x in p.layers[k + 1 :])
    head_grads = p.grads - L * p.layer_grads
    grads = p.grads if accum else head_grads + (done + 1) * p.layer_grads
    transient = layer.bwd_transient
    if gc:
        transient = max(transient, layer.recompute_transient - (0 if accum else p.layer_grads))
    return nonzero(
        {**p.static, **acts, "autocast_weight_copies": casts, "grads": grads, "backward_transient": transient}
    )


def layer_backward_moments(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """Backward of the last layer (all activations still held) and of the first (all layer grads made).
    Memory is linear in the layer index between layers alike, so the ends bound them; where layers
    differ (sliding-window and full ones), the largest layer in between is named too."""
    L = st.dims["L"]
    moments = {"last_layer_backward": _layer_backward(st, p, L - 1), "first_layer_backward": _layer_backward(st, p, 0)}
    if len(set(p.layers)) > 2:
        inner = {k: _layer_backward(st, p, k) for k in range(1, L - 1)}
        if inner:
            k = max(inner, key=lambda i: sum(inner[i].values()))
            if sum(inner[k].values()) > max(sum(m.values()) for m in moments.values()):
                moments[f"layer_{k}_backward"] = inner[k]
    return moments


def optimizer_moment(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """End of backward and optimizer.step(): every grad alive, plus the optimizer's temporary or, for a
    trained tied embedding, the embedding's fresh grad before it is added into the lm_head grad."""
    dm = st.dims
    tied_extra = dm["V"] * dm["h"] * BYTES[trainable_dtype(st)] if st.full and st.tied else 0
    transient = max(optimizer_step_transient(st), tied_extra)
    return {"optimizer_step": nonzero({**p.static, "grads": p.grads, "optimizer_transient": transient})}


def moments(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """Allocated bytes at each candidate moment of the step, as named terms."""
    return {
        **forward_moments(st, p),
        **loss_backward_moments(st, p),
        **layer_backward_moments(st, p),
        **optimizer_moment(st, p),
    }


def allocator_slack(p: Parts) -> int:
    """reserved - allocated at the peak. The half-precision logits block freed after the forward cannot
    hold the fp32 blocks the loss backward asks for, so it stays cached unused; the rest is fragmentation,
    fit (CALIBRATION) as a constant plus a fraction of one layer's saved activations."""
    return int(
        p.loss["unreusable"]
        + CALIBRATION["slack_bytes"]
        + CALIBRATION["slack_layer_fraction"] * p.layer_saved
    )


def cap_bytes(spec) -> int | None:
    """The harness's cap on the caching allocator, budget - CUDA context (bench.cell.measure, through
    torch.cuda.set_per_process_memory_fraction); None without a budget."""
    if spec.budget_bytes is None:
        return None
    return spec.budget_bytes - int(CALIBRATION["cuda_context_bytes"])


def capped_reserved(st: Setup, allocated: int, slack: int) -> int:
    """Reserved at the peak. Under a budget, at the cap the allocator frees its cached blocks and retries
    instead of growing, so reserved never passes the cap (while the allocated peak fits under it)."""
    cap = cap_bytes(st.spec)
    if cap is None:
        return allocated + slack
    return min(allocated + slack, max(allocated, cap))


def answer(st: Setup, table: dict[str, dict[str, int]], slack: int, outside_terms: dict[str, int],
           notes: tuple[str, ...] = ()) -> Prediction:
    """The Prediction from a step's moments: the largest moment is the allocated peak; reserved adds the
    allocator's slack (stopped at a budget's cap); NVML adds what lies outside torch's allocator
    (`outside_terms`: paged optimizer state, NCCL; ZeRO-Offload's `host_bytes` is shown, not GPU memory)."""
    phase = max(table, key=lambda name: sum(table[name].values()))
    allocated = sum(table[phase].values())
    reserved = capped_reserved(st, allocated, slack)
    outside = nonzero(
        {
            "allocator_slack": reserved - allocated,
            "cuda_context": int(CALIBRATION["cuda_context_bytes"]),
            "non_torch_process": int(CALIBRATION["nvml_non_torch_bytes"]),
            **outside_terms,
        }
    )
    nvml = reserved + sum(v for k, v in outside.items() if k not in ("allocator_slack", "host_bytes"))
    totals = {name: sum(terms.values()) for name, terms in table.items()}
    return Prediction(allocated, reserved, nvml, table[phase], phase, outside, totals, notes, allocated + slack)


def predict_single(st: Setup, notes: tuple[str, ...] = ()) -> Prediction:
    """The prediction of a single-process cell from its moments."""
    p = parts(st)
    paged = {"paged_optimizer_state (unified memory)": p.paged}
    return answer(st, moments(st, p), allocator_slack(p), paged, notes)
