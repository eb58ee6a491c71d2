"""Predicted GPU memory of one cell, from first principles. Imports no torch.

The steady-state peak of a training step is the static state (weights, adapters, optimizer state, cuBLAS
workspaces) plus the largest of a few moments of the step: the end of the forward pass, the backward of
the loss, the backward of the first and last decoder layers, and the optimizer step (`moments`).

What autograd keeps between forward and backward is counted by walking Qwen3's decoder layer op by op
(`_Graph`, `layer_graph`), tracking each tensor's dtype and whether it requires grad the way torch
decides them: autocast casts the inputs of matmul/linear/SDPA to the half dtype (and caches the casts of
trainable fp32 weights until the autocast region ends); each derivative formula saves only what its
backward needs (mm saves the input only when the weight needs a grad and the weight only when the input
does); a tensor saved by two ops counts once. The few empirical constants are in CALIBRATION below.

Multi-GPU cells (spec.dist != none) are predicted per rank (all ranks hold alike, so the row's headline,
the max over ranks, is that figure): the activations come from the same walk on the module the ranks
really run (`compute_setup`), and the model states (weights, grads, optimizer state) are replaced by what
the strategy leaves on one rank (`dist_state_terms`: DDP buckets, FSDP2 / ZeRO shards, gathered
parameters, ZeRO buckets; ZeRO-Offload state goes to `host_bytes`). Those terms are derived from the
libraries' designs and not yet fit on any multi-GPU row: DIST_ESTIMATES holds their guessed constants.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bench.deepspeed_config import deepspeed_config
from bench.models import ARCHITECTURES, architecture, linear_shapes
from bench.spec import DEEPSPEED_DISTS, KBIT_METHODS, LORA_METHODS, CellSpec

MIB = 2**20
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "uint8": 1, "bool": 1, "int64": 8}

#: Every empirical constant of the predictor. Fit on results/nvidia-h200-x1/foundation.jsonl
#: (H200, driver 580.159.04, torch 2.11, transformers 5.17, peft 0.21): Qwen3-14B LoRA r=8 bf16_mixed sdpa,
#: row A = seq 2048 b1 GC off, row B = seq 2048 b1 GC on, row C = seq 4096 b4 GC on.
CALIBRATION: dict[str, float] = {
    # NVML process memory after CUDA context creation (context_bytes of rows A, B, C: all equal).
    "cuda_context_bytes": 543_162_368,
    # nvml_peak_process - peak_reserved - context_bytes = 251,658,240 (240 MiB) in rows A, B and C alike:
    # memory the process holds outside torch's allocator (kernel images and library state loaded lazily).
    "nvml_non_torch_bytes": 251_658_240,
    # cuBLAS workspaces, allocated through torch's allocator and kept: 32 MiB per handle on sm90 (torch's
    # default CUBLAS_WORKSPACE_CONFIG :4096:8), one handle for the forward thread and one for autograd's
    # backward thread. Seen in rows A and B: steady peak - first-step peak = Adam state + exactly 32 MiB
    # (the backward handle is made after the first step's peak).
    "cublas_workspace_bytes": 2 * 32 * MIB,
    # reserved - allocated at the peak, beyond the unreusable half-precision logits block (see
    # `allocator_slack`): slack_bytes + slack_layer_fraction x one decoder layer's saved activations
    # (GC off). Two parameters fit exactly on rows B and C; row A is the check (-84 MB). Rows of other
    # configurations (QLoRA: bitsandbytes' dequantized-weight temporaries) show 0.4-1.1 GB more slack.
    "slack_bytes": 280_356_571,
    "slack_layer_fraction": 0.79406,
}


#: cell_id of rows A, B and C above: the accuracy table reports the other rows apart, as held out.
CALIBRATION_CELL_IDS = ("526a5bd9fc1004a6", "4308b89cb7ed1863", "a93a1c2dc003d9f1")


@dataclass(frozen=True)
class Prediction:
    """Predicted steady-state memory of a cell.

    `components` are the terms of `peak_allocated_bytes` at the peak moment (`peak_phase`) and sum to it;
    `outside_allocated` holds what torch's allocated figure does not count (allocator slack, CUDA context,
    non-torch process memory, paged optimizer state in unified memory).
    """

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    nvml_process_bytes: int
    components: dict[str, int]
    peak_phase: str = ""
    outside_allocated: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# The spec, resolved into the dtypes the build really uses (bench/build.py)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """What bench.build makes of a spec: storage dtypes, autocast, what is trainable."""

    spec: CellSpec
    arch: dict
    tokens: int  # tokens of one micro-batch (seq_len x batch_size); grad_accum does not multiply activations
    autocast: str | None  # bf16 / fp16 under *_mixed, None otherwise
    base: str  # storage dtype of unquantized decoder weights (bench.build.base_dtype)
    other: str  # embedding, lm_head and norm weights: fp32 after prepare_model_for_kbit_training
    quant: str | None  # nf4 / fp4 / int8 for the k-bit methods
    adapter: str | None  # LoRA adapter dtype
    full: bool

    @property
    def dims(self) -> dict[str, int]:
        a = self.arch
        d = a.get("head_dim") or a["hidden_size"] // a["num_attention_heads"]
        return {
            "h": a["hidden_size"],
            "i": a["intermediate_size"],
            "L": a["num_hidden_layers"],
            "H": a["num_attention_heads"],
            "KV": a["num_key_value_heads"],
            "d": d,
            "V": a["vocab_size"],
            "q": a["num_attention_heads"] * d,
            "kv": a["num_key_value_heads"] * d,
        }


def _base_dtype(spec: CellSpec) -> str:
    """bench.build.base_dtype: full fine-tuning under *_mixed keeps fp32 weights (they are the master copy);
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


def setup(spec: CellSpec, arch: dict | None = None) -> Setup:
    if spec.attn_impl == "sdpa_flash":  # the flash backend SDPA picks for these shapes anyway
        spec = dataclasses.replace(spec, attn_impl="sdpa")
    base = _base_dtype(spec)
    upcast = spec.method in KBIT_METHODS and bool(spec.kbit_fp32_upcast)
    quant = {"qlora": spec.quant_type, "lora8bit": "int8"}.get(spec.method)
    return Setup(
        spec=spec,
        arch=arch or architecture(spec.model),
        tokens=spec.seq_len * spec.batch_size,
        autocast={"bf16_mixed": "bf16", "fp16_mixed": "fp16"}.get(spec.precision),
        base=base,
        other="fp32" if upcast else base,
        quant=quant,
        adapter=_adapter_dtype(spec, base),
        full=spec.method == "full",
    )


def _promote(a: str, b: str) -> str:
    """torch type promotion between float dtypes (bf16 with fp16 gives fp32)."""
    if a == b:
        return a
    return "fp32"


# --------------------------------------------------------------------------------------------------
# Static state: weights by storage format, adapters, optimizer state
# --------------------------------------------------------------------------------------------------
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
    """The seven projections of every layer, in their storage format (4-bit, 8-bit or base dtype)."""
    per_layer = 0
    for fan_in, fan_out in linear_shapes(st.arch).values():
        n = fan_in * fan_out
        if st.quant in ("nf4", "fp4"):
            per_layer += nf4_linear_bytes(n, bool(st.spec.double_quant))
        elif st.quant == "int8":
            per_layer += int8_linear_bytes(fan_in, fan_out)
        else:
            per_layer += n * BYTES[st.base]
    return per_layer * st.dims["L"]


def unquantized_weight_bytes(st: Setup) -> int:
    """Embedding, lm_head (none when tied) and RMSNorm weights, never quantized; fp32 when
    prepare_model_for_kbit_training upcasts every non-4-bit half parameter (kbit_fp32_upcast)."""
    dm = st.dims
    norms = dm["L"] * (2 * dm["h"] + 2 * dm["d"]) + dm["h"]
    head = 0 if st.arch.get("tie_word_embeddings") else dm["V"] * dm["h"]
    return (dm["V"] * dm["h"] + head + norms) * BYTES[st.other]


def trainable_groups(st: Setup) -> dict[str, list[int]]:
    """Element counts of the trainable tensors by group ("layer" lists one decoder layer's): every
    parameter for full fine-tuning, else LoRA A (r x in) and B (out x r) of each targeted projection."""
    dm, spec = st.dims, st.spec
    if st.full:
        layer = [i * o for i, o in linear_shapes(st.arch).values()] + [dm["h"]] * 2 + [dm["d"]] * 2
        head = [] if st.arch.get("tie_word_embeddings") else [dm["V"] * dm["h"]]
        return {"embedding": [dm["V"] * dm["h"]], "lm_head": head, "layer": layer, "final_norm": [dm["h"]]}
    shapes = linear_shapes(st.arch)
    layer = [n for t in spec.lora_targets for n in (spec.lora_r * shapes[t][0], spec.lora_r * shapes[t][1])]
    return {"embedding": [], "lm_head": [], "layer": layer, "final_norm": []}


def trainable_shapes(st: Setup) -> list[int]:
    """Element counts of every trainable tensor of the model."""
    groups = trainable_groups(st)
    return groups["embedding"] + groups["lm_head"] + groups["layer"] * st.dims["L"] + groups["final_norm"]


def trainable_dtype(st: Setup) -> str:
    return st.base if st.full else st.adapter


def adapter_bytes(st: Setup) -> int:
    """LoRA A and B of every targeted projection (fp32 under mixed precision, see _adapter_dtype)."""
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


# --------------------------------------------------------------------------------------------------
# Activations: what autograd saves, op by op
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _T:
    """A symbolic tensor: id (storage identity), element count, dtype, requires_grad."""

    id: int
    numel: int
    dtype: str
    grad: bool

    @property
    def nbytes(self) -> int:
        return self.numel * BYTES[self.dtype]


class _Graph:
    """The tensors autograd keeps for backward in one stretch of forward, counted once per storage.

    `saved`: activations; `casts`: autocast's half copies of weights, name -> (bytes, cached, saved):
    copies of trainable fp32 leaves are cached until the autocast region ends (the end of the forward),
    saved or not; a matmul saves the copy when its input needs a grad. `bwd_transient` / `fwd_transient`:
    the largest extra working set of the layer's backward (beyond all its saved tensors) / of the
    forward's s x s scores.

    Backward runs the ops in reverse and each op's saved tensors are released once its backward has run,
    so at the backward of op k only the tensors saved up to op k are alive. `bump_backward_at` records
    such a point: the saved bytes so far and the gradients alive there; `bwd_transient` counts it as
    its excess over the whole layer's saved bytes (which the moments add).

    Forward runs the other way: at op k the tensors saved so far are alive, plus the op's own inputs and
    outputs and what the modules' Python frames still hold (`frame`: a norm's output while the block it
    feeds runs, the residual while the MLP runs) where they are not saved. `forward_at` records such a
    point; `recompute_transient` is the largest excess over the whole layer's saved bytes: the working
    set of a checkpointed layer's recomputation, which runs inside its backward.
    """

    def __init__(self, st: Setup):
        self.st = st
        self.saved: dict[int, int] = {}
        self.casts: dict[str, tuple[int, bool, bool]] = {}
        self.fwd_transient = 0
        self.residual_grad = 0  # bytes of the residual stream's gradient, set by `layer_graph`
        self.input_saved = 0  # bytes of the layer input itself among the saved tensors (`layer_graph`)
        self._bwd_over_all = 0
        self._bwd_points: list[tuple[int, int]] = []
        self.frame: dict[str, _T] = {}
        self._fwd_points: list[int] = []
        self.recompute_grads = 0  # gradients held while a checkpointed layer recomputes (`layer_graph`)
        self._ids = 0

    def new(self, numel: int, dtype: str, grad: bool) -> _T:
        self._ids += 1
        return _T(self._ids, numel, dtype, grad)

    def cast(self, t: _T, dtype: str | None) -> _T:
        """x.to(dtype) / an autocast input cast: the same tensor if the dtype already matches."""
        if dtype is None or t.dtype == dtype:
            return t
        return self.new(t.numel, dtype, t.grad)

    def save(self, t: _T | None) -> None:
        if t is not None:
            self.saved[t.id] = t.nbytes

    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    def forward_casts(self) -> int:
        """Weight copies alive at the end of the forward: cached (trainable) or saved by a matmul."""
        return sum(n for n, cached, saved in self.casts.values() if cached or saved)

    def saved_casts(self) -> int:
        """Weight copies a matmul saved, alive until that matmul's backward."""
        return sum(n for n, _, saved in self.casts.values() if saved)

    def bump(self, backward: int, forward: int = 0) -> None:
        """Record temporaries beyond the saved tensors, in backward and in forward."""
        self._bwd_over_all = max(self._bwd_over_all, backward)
        self.fwd_transient = max(self.fwd_transient, forward)

    def bump_backward_at(self, held: int) -> None:
        """Record a point of the backward where `held` bytes of gradients and temporaries are alive
        beside the tensors saved so far in the walk (those saved later are released by then)."""
        self._bwd_points.append((self.saved_bytes(), held))

    def forward_at(self, *tensors: _T) -> None:
        """Record a point of the forward where `tensors` and the frames' tensors are alive beside the
        tensors saved so far (each storage once; saved ones are counted among the saved)."""
        alive = {t.id: t.nbytes for t in (*tensors, *self.frame.values()) if t.id not in self.saved}
        self._fwd_points.append(self.saved_bytes() + sum(alive.values()))

    @property
    def recompute_transient(self) -> int:
        """The largest working set of the layer's forward beyond its saved tensors (`forward_at`)."""
        return max(0, *(alive - self.saved_bytes() for alive in self._fwd_points))

    @property
    def bwd_transient(self) -> int:
        """The largest working set of the backward beyond the whole layer's saved tensors."""
        total = self.saved_bytes()
        at_points = (alive + held - total for alive, held in self._bwd_points)
        return max(self._bwd_over_all, *at_points, 0)


@dataclass(frozen=True)
class _Linear:
    """One projection: storage kind (dense / nf4 / fp4 / int8), weight dtype, trainable, LoRA or not."""

    name: str
    fan_in: int
    fan_out: int
    kind: str
    dtype: str
    trainable: bool
    lora: bool


def _weight_cast(g: _Graph, name: str, numel: int, dtype: str, trainable: bool, saved: bool) -> None:
    """Autocast's copy of a weight into the half dtype. Trainable fp32 leaves are cached for the whole
    autocast region; a frozen weight's copy lives only as long as a matmul saves it."""
    g.casts[name] = (numel * BYTES[dtype], trainable, saved)


def dense_matmul(g: _Graph, x: _T, fan_in: int, fan_out: int, wdtype: str, trainable: bool, name: str) -> _T:
    """y = x W^T (F.linear). Under autocast x and W are cast to the half dtype first. mm saves its input
    when the weight needs a grad, and the (cast) weight when the input needs one."""
    ac = g.st.autocast
    xc = g.cast(x, ac) if ac else x
    if trainable:
        g.save(xc)
    cd = ac or wdtype
    if ac and wdtype != ac:
        _weight_cast(g, name, fan_in * fan_out, ac, trainable, x.grad)
    return g.new(x.numel // fan_in * fan_out, cd, x.grad or trainable)


def _base_linear(g: _Graph, x: _T, lin: _Linear) -> _T:
    """The frozen or trainable base projection, by storage kind.

    nf4/fp4 (bnb Linear4bit): x is cast to the compute dtype, MatMul4Bit saves only the packed weight
    and dequantizes it again in backward, the output is cast back to x's dtype. int8 (Linear8bitLt,
    threshold 6): MatMul8bitLt saves its input x itself; outlier columns (subA) are not counted.
    """
    tokens = x.numel // lin.fan_in
    if lin.kind in ("nf4", "fp4"):
        cd = g.st.spec.quant_compute_dtype
        return g.cast(g.new(tokens * lin.fan_out, cd, x.grad), x.dtype)
    if lin.kind == "int8":
        if x.grad:
            g.save(x)
        return g.new(tokens * lin.fan_out, x.dtype, x.grad)
    return dense_matmul(g, x, lin.fan_in, lin.fan_out, lin.dtype, lin.trainable, lin.name)


def _lora_branch(g: _Graph, x: _T, lin: _Linear, result: _T) -> _T:
    """peft lora.Linear: result + B(A(dropout(x.to(adapter dtype)))) * scaling, cast back to result's dtype.

    peft's input cast makes a separate copy of x per adapted projection (fp32 under mixed precision,
    then autocast's own bf16 copy that A saves). peft's bnb layers (qlora, lora8bit) skip that cast under
    autocast, so A sees x itself: a half x is saved once however many adapters read it. Dropout p>0
    saves a 1-byte mask per element. While A runs, x, the base output and peft's cast of x (its frame
    holds it until the layer returns: 4 B per element of an fp32 adapter's input) are all alive.
    """
    st, r, tokens = g.st, g.st.spec.lora_r, x.numel // lin.fan_in
    xl = cast = x if (st.quant and st.autocast) else g.cast(x, st.adapter)
    if st.spec.lora_dropout:
        g.save(g.new(xl.numel, "bool", False))
        xl = g.new(xl.numel, xl.dtype, xl.grad)
    a = dense_matmul(g, xl, lin.fan_in, r, st.adapter, True, lin.name + ".lora_A")
    g.forward_at(x, result, cast, xl, a)
    b = dense_matmul(g, a, r, lin.fan_out, st.adapter, True, lin.name + ".lora_B")
    scaled = g.new(b.numel, b.dtype, True)
    return g.cast(g.new(tokens * lin.fan_out, _promote(result.dtype, scaled.dtype), True), result.dtype)


def linear(g: _Graph, x: _T, lin: _Linear) -> _T:
    out = _base_linear(g, x, lin)
    if lin.lora:
        return _lora_branch(g, x, lin, out)
    g.forward_at(x, out)
    return out


def rmsnorm(g: _Graph, x: _T, width: int, wdtype: str, trainable: bool) -> _T:
    """Qwen3RMSNorm: x32 = x.float(); y = x32 * rsqrt(mean(x32^2) + eps); weight * y.to(x.dtype).

    pow and mul save x32 (x itself when x is fp32) and rstd when x needs a grad; weight * y saves y only
    when the weight is trainable.
    """
    if x.grad:
        g.save(g.cast(x, "fp32"))
        g.save(g.new(x.numel // width, "fp32", True))
    y = g.cast(g.new(x.numel, "fp32", x.grad), x.dtype)
    if trainable:
        g.save(y)
    return g.new(x.numel, _promote(wdtype, x.dtype), x.grad or trainable)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def attention_flash(g: _Graph, q: _T, k: _T, v: _T) -> _T:
    """SDPA's flash (or cuDNN) kernel - half precision, no mask (is_causal), native GQA - or the
    flash_attention_2 integration, which casts fp32 q/k/v to the half dtype itself.

    Saves q, k, v (after autocast's cast), the output and the fp32 logsumexp (b x heads x s); never the
    s x s scores. Backward: dq plus dk, dv expanded to all heads and flash's fp32 dq accumulator.
    """
    st, dm = g.st, g.st.dims
    ac = st.autocast if st.spec.attn_impl == "sdpa" else (st.autocast or q.dtype)
    qc, kc, vc = (g.cast(t, ac) if ac else t for t in (q, k, v))
    for t in (qc, kc, vc):
        g.save(t)
    g.save(g.new(st.tokens * dm["H"], "fp32", True))
    out = g.new(qc.numel, qc.dtype, True)
    g.save(out)
    g.bump(3 * qc.nbytes + 4 * qc.numel)
    return out


def eager_mask_bytes(st: Setup) -> int:
    """The eager path's float causal mask, b x 1 x s x s in the embedding output's dtype, alive through
    the forward (and through backward under checkpointing, whose frames hold the layer arguments)."""
    if st.spec.attn_impl != "eager":
        return 0
    return st.spec.batch_size * st.spec.seq_len**2 * BYTES[st.other]


def attention_eager(g: _Graph, q: _T, k: _T, v: _T) -> _T:
    """eager_attention_forward: repeat_kv copies k, v to all heads; scores = q k^T * scale + mask;
    softmax in fp32 (saved), cast to q's dtype (saved by the second matmul, as autocast's copy if any).
    The b x heads x s x s tensors dominate: 4 bytes (fp32 softmax) + 2 (half probs) per score when saved.

    The backward peaks in the softmax's backward, whatever the dtypes: the fp32 grad of the softmax
    output (the backward of `.to(q.dtype)` or of autocast's cast), CUDA's softmax_backward_cuda_out
    with its `tmp = grad * output` and its grad_input (fp32: softmax ran on fp32 scores), 3 x 4 bytes per
    score beside the saved fp32 softmax. By then the second matmul's backward has released the probs
    and v copies and everything saved after them (o_proj, the MLP); still alive are the tensors saved
    before (norm, q/k/v inputs, q, k, the softmax), the grad of the repeated v (waiting for repeat_kv's
    backward, which autograd runs after the score path) and the residual stream's grad.
    """
    st, dm, spec = g.st, g.st.dims, g.st.spec
    scores = spec.batch_size * dm["H"] * spec.seq_len**2
    krep, vrep = (g.new(q.numel, t.dtype, True) if dm["H"] != dm["KV"] else t for t in (k, v))
    ac = st.autocast
    for t in (q, krep):
        g.save(g.cast(t, ac) if ac else t)
    cd = ac or q.dtype
    masked = _promote(cd, st.other)
    soft = g.new(scores, "fp32", True)
    g.save(soft)
    g.bump_backward_at(3 * scores * BYTES["fp32"] + vrep.nbytes + g.residual_grad)
    probs = g.cast(soft, q.dtype)
    g.save(g.cast(probs, ac) if ac else probs)
    g.save(g.cast(vrep, ac) if ac else vrep)
    g.bump(backward=0, forward=scores * (BYTES[masked] + (4 if masked != "fp32" else 0)))
    return g.new(q.numel, cd, True)


def attention_math(g: _Graph, q: _T, k: _T, v: _T) -> _T:
    """SDPA's math fallback, which fp32 q/k/v with grouped KV heads get: flash and cuDNN need half
    precision and the memory-efficient kernel rejects GQA (torch sdp_utils.cpp). It repeat_interleaves
    k and v to all heads, scales q and k by sqrt(scale) and materialises the b x heads x s x s scores; the
    softmax output (saved by softmax and the second matmul) stays until backward."""
    spec, dm = g.st.spec, g.st.dims
    scores = spec.batch_size * dm["H"] * spec.seq_len**2
    for _ in range(3):  # scaled q, scaled k repeated, v repeated
        g.save(g.new(q.numel, q.dtype, True))
    g.save(g.new(scores, q.dtype, True))
    g.bump(
        backward=2 * scores * BYTES[q.dtype],
        forward=scores * BYTES[q.dtype] + spec.seq_len**2 * BYTES[q.dtype],
    )
    return g.new(q.numel, q.dtype, True)


def _attention_kernel(st: Setup, q: _T):
    """Which attention saves what: eager, SDPA's math fallback (fp32 with GQA), or a flash-style kernel."""
    if st.spec.attn_impl == "eager":
        return attention_eager
    grouped = st.dims["H"] != st.dims["KV"]
    if st.spec.attn_impl == "sdpa" and (st.autocast or q.dtype) == "fp32" and grouped:
        return attention_math
    return attention_flash


def attention_block(g: _Graph, x: _T, lins: dict[str, _Linear]) -> _T:
    """Qwen3Attention: q/k/v projections, per-head RMSNorm on q and k (QK-norm), RoPE (saves only the
    shared cos/sin tables), attention, o_proj."""
    st, dm = g.st, g.st.dims
    q = rmsnorm(g, linear(g, x, lins["q_proj"]), dm["d"], st.other, st.full)
    k = rmsnorm(g, linear(g, x, lins["k_proj"]), dm["d"], st.other, st.full)
    v = linear(g, x, lins["v_proj"])
    q = g.new(q.numel, _promote(q.dtype, st.other), q.grad)  # RoPE: q * cos + rotate_half(q) * sin
    k = g.new(k.numel, _promote(k.dtype, st.other), k.grad)
    return linear(g, _attention_kernel(st, q)(g, q, k, v), lins["o_proj"])


def mlp_block(g: _Graph, x: _T, lins: dict[str, _Linear]) -> _T:
    """SwiGLU: down(silu(gate(x)) * up(x)). silu saves its input; the product saves both factors.
    Backward holds about three intermediate-size grads at once."""
    gate, up = linear(g, x, lins["gate_proj"]), linear(g, x, lins["up_proj"])
    if gate.grad:
        g.save(gate)
    act = g.new(gate.numel, gate.dtype, gate.grad)
    if up.grad:
        g.save(act)
    if act.grad:
        g.save(up)
    product = g.new(gate.numel, _promote(act.dtype, up.dtype), True)
    g.bump(3 * product.nbytes)
    return linear(g, product, lins["down_proj"])


def _projections(st: Setup) -> dict[str, _Linear]:
    kind = st.quant or "dense"
    targets = st.spec.lora_targets or ()
    return {
        name: _Linear(name, i, o, kind, st.base, st.full, name in targets)
        for name, (i, o) in linear_shapes(st.arch).items()
    }


def layer_input_requires_grad(st: Setup, first: bool) -> bool:
    """Layer 0's input is the embedding output: it needs a grad only if the embedding is trained, or
    under reentrant checkpointing, where bench calls enable_input_require_grads for LoRA."""
    if not first:
        return True
    return st.full or bool(st.spec.gradient_checkpointing and st.spec.gc_reentrant)


def layer_graph(st: Setup, first: bool = False) -> tuple[_Graph, _T]:
    """Walk one Qwen3 decoder layer: norm, attention, residual add, norm, MLP, residual add.

    Qwen3DecoderLayer's frame holds each norm's output while the block it feeds runs, and the residual
    (x + attn) while the MLP runs (`_Graph.frame`; the layer input is the checkpoint's, counted apart).
    A checkpointed layer recomputes when its backward first unpacks a saved tensor: the grad of its
    output is alive then and, when down_proj has an adapter, the grad of LoRA's scaled output (the
    scaling's backward saves no tensor and runs first): `recompute_grads`."""
    g = _Graph(st)
    dm, lins = st.dims, _projections(st)
    x = g.new(st.tokens * dm["h"], st.other, layer_input_requires_grad(st, first))
    g.residual_grad = x.nbytes  # the grad of x + attn, held for x while the attention branch runs
    g.frame = {"attention_input": rmsnorm(g, x, dm["h"], st.other, st.full)}
    attn = attention_block(g, g.frame["attention_input"], lins)
    mid = g.new(x.numel, _promote(x.dtype, attn.dtype), True)
    g.frame = {"residual": mid}
    g.frame["mlp_input"] = rmsnorm(g, mid, dm["h"], st.other, st.full)
    out = mlp_block(g, g.frame["mlp_input"], lins)
    g.frame = {}
    g.input_saved = g.saved.get(x.id, 0)  # an fp32 input is saved by the norm as is, not as a copy
    y = g.new(x.numel, _promote(mid.dtype, out.dtype), True)
    lora_down = lins["down_proj"].lora
    g.recompute_grads = y.nbytes + (x.numel * BYTES[st.autocast or st.adapter] if lora_down else 0)
    return g, y


def stream_dtype(st: Setup) -> str:
    """dtype of the residual stream between layers (bf16 for a bf16 base, fp32 with fp32 embeddings)."""
    return layer_graph(st, first=True)[1].dtype


# --------------------------------------------------------------------------------------------------
# Final norm, lm_head and the loss
# --------------------------------------------------------------------------------------------------
def head_graph(st: Setup) -> tuple[_Graph, str]:
    """Final RMSNorm and lm_head (frozen unless full; fp32 after the k-bit upcast, whose bf16 autocast
    copy the lm_head matmul then saves: V x h x 2 bytes). Returns the graph and the logits dtype."""
    g, dm = _Graph(st), st.dims
    x = g.new(st.tokens * dm["h"], stream_dtype(st), True)
    y = rmsnorm(g, x, dm["h"], st.other, st.full)
    if st.spec.fused_ce:
        return g, st.autocast or y.dtype
    logits = dense_matmul(g, y, dm["h"], dm["V"], st.other, st.full, "lm_head")
    return g, logits.dtype


def loss_bytes(st: Setup, logits_dtype: str) -> dict[str, int]:
    """The causal-LM loss at its moments, for b x s x V logits.

    HF's ForCausalLMLoss upcasts the logits (logits.float(): a fp32 copy unless already fp32), then
    cross_entropy = log_softmax (saves its fp32 output) + nll_loss. End of forward: logits + fp32 copy +
    log-probs. Backward of the loss: saved log-probs + nll's fp32 grad + log_softmax's fp32 grad = 3 x 4 B.
    `saved` is what stays between forward and backward.
    """
    tv = st.tokens * st.dims["V"]
    if st.spec.fused_ce:
        return fused_loss_bytes(st, logits_dtype)
    ld = BYTES[logits_dtype]
    upcast = 4 * tv if logits_dtype != "fp32" else 0
    return {
        "forward": ld * tv + upcast + 4 * tv,
        "backward": 12 * tv,
        "saved": 4 * tv,
        "logits_grad": ld * tv,
        "unreusable": ld * tv if ld < 4 else 0,
    }


def fused_loss_bytes(st: Setup, compute_dtype: str) -> dict[str, int]:
    """Liger's fused linear cross-entropy never holds b x s x V: it walks chunks of
    next_pow2(ceil(BT / ceil(V / h))) tokens, computes each chunk's logits (compute dtype), loss and
    gradient in place, and keeps grad_input (BT x h) - plus grad_weight (V x h) when lm_head trains -
    for backward. Under autocast an fp32 lm_head is cast to half for each chunk's matmul."""
    dm, bt = st.dims, st.tokens
    chunk = min(2 ** math.ceil(math.log2(max(1, math.ceil(bt / math.ceil(dm["V"] / dm["h"]))))), bt)
    saved = bt * dm["h"] * BYTES[compute_dtype] + (dm["V"] * dm["h"] * BYTES[st.other] if st.full else 0)
    weight_cast = dm["V"] * dm["h"] * 2 if st.autocast and st.other == "fp32" else 0
    chunk_bytes = chunk * dm["V"] * BYTES[compute_dtype] + weight_cast + 8 * bt
    return {
        "forward": saved + chunk_bytes,
        "backward": saved,
        "saved": saved,
        "logits_grad": 0,
        "unreusable": 0,
    }


# --------------------------------------------------------------------------------------------------
# Putting it together: the moments of a step
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parts:
    """The byte counts the moments of a step are built from."""

    static: dict[str, int]
    paged: int
    grads: int
    layer_grads: int
    acts: dict[str, int]
    forward_casts: int
    backward_casts: int
    loss: dict[str, int]
    layer_saved: int
    layer_input_saved: int
    layer_casts: int
    layer_input: int
    fwd_transient: int
    bwd_transient: int
    recompute_transient: int = 0


def static_bytes(st: Setup) -> tuple[dict[str, int], int]:
    """Weights, adapters, optimizer state and cuBLAS workspaces, resident through the step; and the
    paged optimizer state, which lives in unified memory outside torch's allocator."""
    opt_device, paged = optimizer_state_bytes(st)
    names = {"nf4": "weights_nf4", "fp4": "weights_fp4", "int8": "weights_int8"}
    static = {
        names.get(st.quant, f"weights_{st.base}"): decoder_weight_bytes(st),
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


def layer_saved_bytes(st: Setup, graph: _Graph) -> int:
    """One decoder layer's saved activations: the op-by-op walk, or the compiled estimate."""
    return compiled_layer_saved(st) if st.spec.compile else graph.saved_bytes()


def activation_bytes(st: Setup, first: _Graph, other: _Graph, head: _Graph) -> dict[str, int]:
    """Bytes held between forward and backward. Without checkpointing every layer's saved tensors;
    with it only each layer's input and the cos/sin tables (the checkpoint frames hold them), the rest
    recomputed one layer at a time in backward."""
    dm = st.dims
    acts = {"final_norm_saved": head.saved_bytes(), "attention_mask": eager_mask_bytes(st)}
    if st.spec.gradient_checkpointing:
        cos_sin = 2 * st.tokens * dm["d"] * BYTES[st.other]
        acts["layer_inputs"] = dm["L"] * st.tokens * dm["h"] * BYTES[stream_dtype(st)] + cos_sin
    else:
        acts["layer_activations"] = layer_saved_bytes(st, first) + (dm["L"] - 1) * layer_saved_bytes(
            st, other
        )
    return acts


def parts(st: Setup) -> Parts:
    first, other = layer_graph(st, True)[0], layer_graph(st, False)[0]
    head, logits_dtype = head_graph(st)
    static, paged = static_bytes(st)
    L, gc, compiled = st.dims["L"], st.spec.gradient_checkpointing, st.spec.compile
    layer_casts_fwd = first.forward_casts() + (L - 1) * other.forward_casts()
    layer_casts_saved = 0 if compiled else first.saved_casts() + (L - 1) * other.saved_casts()
    return Parts(
        static=static,
        paged=paged,
        grads=grad_bytes(st),
        layer_grads=sum(trainable_groups(st)["layer"]) * BYTES[trainable_dtype(st)],
        acts=activation_bytes(st, first, other, head),
        forward_casts=layer_casts_fwd + head.forward_casts(),
        backward_casts=(0 if gc else layer_casts_saved) + head.saved_casts(),
        loss=loss_bytes(st, logits_dtype),
        layer_saved=layer_saved_bytes(st, other),
        layer_input_saved=0 if compiled else other.input_saved,
        layer_casts=0 if compiled else other.saved_casts(),
        layer_input=st.tokens * st.dims["h"] * BYTES[stream_dtype(st)],
        fwd_transient=other.fwd_transient,
        bwd_transient=layer_backward_transient(st, other),
        recompute_transient=0 if compiled else other.recompute_transient + other.recompute_grads,
    )


def layer_backward_transient(st: Setup, g: _Graph) -> int:
    """Working set of one layer's backward beyond its saved tensors: the larger of the MLP / attention
    gradient temporaries, plus, when weights train under autocast, the half-precision weight grad of the
    largest projection before it is cast to the parameter's dtype."""
    extra = g.bwd_transient
    if st.full and st.autocast:
        extra += max(i * o for i, o in linear_shapes(st.arch).values()) * 2
    return extra


def _nonzero(terms: dict[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in terms.items() if v}


def forward_moments(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """End of the forward (logits, their fp32 copy and log-probs all alive) and, for eager attention,
    the softmax of the last layer. Autocast's weight cache is alive throughout the forward."""
    held = {**p.static, **_accumulated(st, p), **p.acts, "autocast_weight_copies": p.forward_casts}
    lm_input = p.layer_input
    moments = {
        "forward_end": _nonzero({**held, "lm_head_input": lm_input, "loss_forward": p.loss["forward"]})
    }
    if p.fwd_transient:
        running = p.layer_saved - p.layer_input_saved if st.spec.gradient_checkpointing else 0
        moments["forward_attention"] = _nonzero(
            {**held, "layer_running": running, "attention_transient": p.fwd_transient}
        )
    return moments


def _accumulated(st: Setup, p: Parts) -> dict[str, int]:
    """With grad_accum > 1 the peak micro-batch already holds every gradient from the earlier ones."""
    return {"grads_accumulated": p.grads} if st.spec.grad_accum > 1 else {}


def loss_backward_moments(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """Backward of the loss (3 x fp32 b x s x V), then lm_head's backward: the logits grad in the compute
    dtype and, when lm_head trains, its weight grad (half copy, then the parameter-dtype grad)."""
    held = {**p.static, **_accumulated(st, p), **p.acts, "autocast_weight_copies": p.backward_casts}
    moments = {"loss_backward": _nonzero({**held, "loss_backward": p.loss["backward"]})}
    if st.full:
        dm = st.dims
        head_grad = dm["V"] * dm["h"] * (BYTES[trainable_dtype(st)] + (2 if st.autocast else 0))
        moments["lm_head_backward"] = _nonzero(
            {
                **held,
                "logits_grad": p.loss["logits_grad"],
                "lm_head_grads": 0 if st.spec.grad_accum > 1 else head_grad,
            }
        )
    return moments


def layer_backward_moments(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """Backward of the last layer (all activations still held) and of the first (all layer grads made).
    Memory is linear in the layer index between the two, so the ends bound every layer. Under
    checkpointing the layer's recomputed saved tensors join the held inputs; a norm that saves an fp32
    input as is saves the checkpoint's own input (in layer_inputs already), which is not counted twice.
    Checkpointing's recomputation runs inside the layer's backward, before any of its grads exist: its
    working set (`Parts.recompute_transient`, less the layer's grads) competes with the backward's own
    for `backward_transient`."""
    L, gc, accum = st.dims["L"], st.spec.gradient_checkpointing, st.spec.grad_accum > 1
    head_grads = p.grads - L * p.layer_grads
    moments = {}
    for name, done in (("last_layer_backward", 0), ("first_layer_backward", L - 1)):
        acts = dict(p.acts, final_norm_saved=0)
        if gc:
            acts["layer_inputs"] -= done * p.layer_input
            acts["recomputed_layer"] = p.layer_saved - p.layer_input_saved
        else:
            acts["layer_activations"] -= done * p.layer_saved
        casts = p.layer_casts if gc else p.backward_casts - done * p.layer_casts
        grads = p.grads if accum else head_grads + (done + 1) * p.layer_grads
        transient = p.bwd_transient
        if gc:
            transient = max(transient, p.recompute_transient - (0 if accum else p.layer_grads))
        moments[name] = _nonzero(
            {
                **p.static,
                **acts,
                "autocast_weight_copies": casts,
                "grads": grads,
                "backward_transient": transient,
            }
        )
    return moments


def optimizer_moment(st: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """End of backward and optimizer.step(): every grad alive, plus the optimizer's temporary or, for a
    trained tied embedding, the embedding's fresh grad before it is added into the lm_head grad."""
    dm = st.dims
    tied_extra = (
        dm["V"] * dm["h"] * BYTES[trainable_dtype(st)]
        if st.full and st.arch.get("tie_word_embeddings")
        else 0
    )
    transient = max(optimizer_step_transient(st), tied_extra)
    return {"optimizer_step": _nonzero({**p.static, "grads": p.grads, "optimizer_transient": transient})}


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


def _as_spec(spec: dict | CellSpec, arch: dict | None) -> CellSpec:
    """A validated CellSpec; with an explicit `arch`, a model name unknown to bench.models is allowed."""
    if isinstance(spec, CellSpec):
        return spec
    data = dict(spec)
    if isinstance(data.get("lora_targets"), list):
        data["lora_targets"] = tuple(data["lora_targets"])
    if arch is not None and data.get("model") not in ARCHITECTURES:
        return CellSpec(**data)
    return CellSpec.create(**data)


def predict(spec: dict[str, Any] | CellSpec, arch: dict | None = None) -> Prediction:
    """Predicted steady-state peak allocated / reserved / NVML bytes of the cell `spec`."""
    st = setup(_as_spec(spec, arch), arch)
    if st.spec.dist != "none":
        return predict_dist(st)
    p = parts(st)
    table = moments(st, p)
    phase = max(table, key=lambda name: sum(table[name].values()))
    allocated = sum(table[phase].values())
    reserved = allocated + allocator_slack(p)
    outside = _nonzero(
        {
            "allocator_slack": reserved - allocated,
            "cuda_context": int(CALIBRATION["cuda_context_bytes"]),
            "non_torch_process": int(CALIBRATION["nvml_non_torch_bytes"]),
            "paged_optimizer_state (unified memory)": p.paged,
        }
    )
    nvml = reserved + sum(v for k, v in outside.items() if k != "allocator_slack")
    totals = {name: sum(terms.values()) for name, terms in table.items()}
    return Prediction(allocated, reserved, nvml, table[phase], phase, outside, totals)


# --------------------------------------------------------------------------------------------------
# Several GPUs: what one rank holds (bench/dist.py). Every rank holds alike (sharding is even up to
# padding), so one rank's figure is the row's headline (the max over ranks).
# --------------------------------------------------------------------------------------------------
#: Multi-GPU constants NOT yet fit on any row: first estimates, to calibrate on the first multi-GPU rows
#: (the per-rank peak_allocated of ok rows; nvml_peak_process_bytes for the NCCL term).
DIST_ESTIMATES: dict[str, float] = {
    # NCCL communicators' buffers and state per rank, outside torch's allocator (NVML sees them only):
    # NCCL_BUFFSIZE 4 MiB x channels x peers x protocols; a guess of the order seen on NVLink hosts.
    "nccl_bytes": 512 * MIB,
    # FSDP2: decoder layers unsharded at once in forward and backward (the running one and the one
    # prefetched by the implicit forward/backward prefetch); the all-gather output buffer is transient.
    "fsdp_gathered_layers": 2,
    # DeepSpeed: gradient buckets of reduce_bucket_size elements alive in backward (the ipg buffer of
    # contiguous_gradients; a second one only with overlap_comm, which ZeRO-2 cells leave off).
    "zero_ipg_buckets": 1,
}
#: DeepSpeed's default sub_group_size (not set by bench.deepspeed_config): ZeRO-3 steps the optimizer
#: over its fp32 partition in sub-groups of this many elements.
ZERO3_SUB_GROUP = 1_000_000_000
#: Model-state terms of the single-GPU moments, replaced by a strategy's own (`dist_moments`).
_MODEL_STATE_TERMS = (
    "lora_adapters",
    "optimizer_state",
    "grads",
    "grads_accumulated",
    "lm_head_grads",
    "optimizer_transient",
)


def _shard(n: int, world: int) -> int:
    """One rank's part of n bytes/elements split over `world` ranks (rounded up, as the padding does)."""
    return -(-int(n) // world)


def _half(spec: CellSpec) -> str | None:
    return {"bf16_mixed": "bf16", "fp16_mixed": "fp16"}.get(spec.precision)


def compute_setup(st: Setup) -> Setup:
    """The module the ranks run forward and backward on, which fixes the activations' dtypes.

    DeepSpeed (bench.dist): under *_mixed the module is built in the half dtype (the engine holds it there
    and runs without autocast; fp32 masters live in the ZeRO optimizer), so every weight, adapter and the
    residual stream are half. FSDP2 under *_mixed: the MixedPrecisionPolicy all-gathers the fp32 shards
    as param_dtype = the autocast dtype, so the weights matmuls see are half (autocast's weight casts
    become no-ops) and the root's cast embedding makes the residual stream half. Otherwise (DDP, pure
    bf16, fp32) the ranks run the single-GPU module."""
    half, dist = _half(st.spec), st.spec.dist
    if half is None or dist not in (*DEEPSPEED_DISTS, "fsdp2"):
        return st
    autocast = None if dist in DEEPSPEED_DISTS else st.autocast
    return dataclasses.replace(
        st, autocast=autocast, base=half, other=half, adapter=half if st.adapter else None
    )


def weight_bytes(st: Setup) -> int:
    """Every parameter in its storage format: decoder projections, embedding/lm_head/norms, adapters."""
    return decoder_weight_bytes(st) + unquantized_weight_bytes(st) + adapter_bytes(st)


def layer_elements(st: Setup) -> int:
    """Parameters of one decoder layer: the seven projections, four norms, the LoRA adapters if any."""
    dm = st.dims
    lora = 0 if st.full else sum(trainable_groups(st)["layer"])
    return sum(i * o for i, o in linear_shapes(st.arch).values()) + 2 * dm["h"] + 2 * dm["d"] + lora


def root_elements(st: Setup) -> int:
    """Parameters outside the decoder layers: embedding, lm_head (none when tied), final norm."""
    dm = st.dims
    return dm["V"] * dm["h"] * (1 if st.arch.get("tie_word_embeddings") else 2) + dm["h"]


def trainable_elements(st: Setup) -> tuple[int, int, int]:
    """(all trainable elements P, one layer's, the head's done before layer backward: lm_head + norm)."""
    groups = trainable_groups(st)
    head = sum(groups["lm_head"]) + sum(groups["final_norm"])
    if st.arch.get("tie_word_embeddings"):
        head += sum(groups["embedding"])  # the tied lm_head's grad is the embedding's
    return sum(trainable_shapes(st)), sum(groups["layer"]), head


def ddp_bucket_bytes(st: Setup) -> int:
    """DDP's gradient buckets. bench.dist wraps with torch's defaults: gradient_as_bucket_view=False and
    bucket_cap_mb=25 (the first bucket 1 MiB). The Reducer allocates, when DDP wraps the model, one flat
    tensor per bucket holding every trainable parameter's grad in its dtype and keeps them: .grad is
    copied in, all-reduced, copied back. The cap only splits them, so the buckets are one more copy of
    every gradient, resident through the step: grad_bytes."""
    return grad_bytes(st)


def fsdp2_shard_bytes(st: Setup, world: int) -> dict[str, int]:
    """fully_shard keeps every parameter as a dim-0 shard (1/N, padded) in its storage dtype: under
    *_mixed full FT that is the fp32 master copy (4P/N); the optimizer is built on the shards, so its
    state is 1/N too (exp_avg, exp_avg_sq in the shard's dtype: 8P/N fp32). Resident through the step."""
    opt, _ = optimizer_state_bytes(st)
    return {
        "fsdp_sharded_params": _shard(weight_bytes(st), world),
        "fsdp_sharded_optimizer_state": _shard(opt, world),
    }


def fsdp2_gathered_bytes(st: Setup, cst: Setup) -> dict[str, int]:
    """Unsharded compute copies in forward and backward, in param_dtype (the policy's half dtype, else the
    storage dtype): the root group (embedding, lm_head, final norm) stays unsharded from its forward to
    the end of backward (FSDP2 sets reshard_after_forward=False for the root); of the decoder layers
    DIST_ESTIMATES['fsdp_gathered_layers'] are unsharded at once (estimate: the running layer and the
    prefetched one; the all-gather buffer before copy-out is not counted)."""
    cb = BYTES[cst.base]
    layers = int(DIST_ESTIMATES["fsdp_gathered_layers"]) * layer_elements(st) * cb
    return {"fsdp_unsharded_root": root_elements(st) * cb, "fsdp_unsharded_layers": layers}


def fsdp2_grad_terms(st: Setup, cst: Setup, world: int, moment: str) -> dict[str, int]:
    """Gradients of one rank at a moment. A layer's backward makes its grads unsharded in param_dtype,
    casts them to reduce_dtype (fp32 under *_mixed: 4 B more per element) for the reduce-scatter and
    keeps the 1/N result in the shard's dtype; the root's grads (lm_head, embedding) stay unsharded until
    the root's post-backward at the end of backward. With grad_accum > 1 (no sync on the first
    micro-batches) the unsharded grads of every parameter accumulate on each rank."""
    total, layer, head = trainable_elements(st)
    cb, pb, L = BYTES[cst.base], BYTES[trainable_dtype(st)], st.dims["L"]
    in_flight = layer * (cb + (4 if cst.autocast and cb < 4 else 0))
    terms: dict[str, int] = {}
    if st.spec.grad_accum > 1 and moment != "optimizer_step":
        terms["fsdp_unsharded_grads_accumulated"] = total * cb
    if moment == "lm_head_backward":
        terms["fsdp_unsharded_root_grads"] = head * cb
    elif moment in ("last_layer_backward", "first_layer_backward"):
        done = 0 if moment == "last_layer_backward" else L - 1
        terms.update(
            fsdp_unsharded_root_grads=head * cb,
            fsdp_sharded_grads=_shard(done * layer * pb, world),
            fsdp_layer_grads_in_flight=in_flight,
        )
    elif moment == "optimizer_step":
        terms.update(
            fsdp_sharded_grads=_shard(grad_bytes(st), world),
            optimizer_transient=_shard(optimizer_step_transient(st), world),
        )
    return terms


def zero_config(st: Setup) -> dict[str, Any]:
    """zero_optimization of bench.deepspeed_config for this cell (bucket sizes, thresholds, offload)."""
    return deepspeed_config(st.spec)["zero_optimization"]


def zero_optimizer_bytes(st: Setup, world: int) -> dict[str, int]:
    """ZeRO-1/2/3 partition the optimizer: each rank keeps the fp32 master copy (4P/N) and DeepSpeed's
    AdamW moments (8P/N, fp32) of its partition of the trainable parameters; under pure bf16
    (bf16_master_weights_and_grads, bf16_optimizer_states) both are bf16 (2P/N and 4P/N). Under ZeRO-Offload they
    live on the host (with the fp32 grads of the partition, 4P/N pinned): see `zero_host_bytes`."""
    if st.spec.zero_offload != "none":
        return {}
    total = trainable_elements(st)[0]
    if st.spec.precision == "bf16":  # bf16_master_weights_and_grads + bf16_optimizer_states
        return {
            "zero_bf16_master_partition": _shard(2 * total, world),
            "zero_adam_partition": _shard(4 * total, world),
        }
    return {
        "zero_fp32_master_partition": _shard(4 * total, world),
        "zero_adam_partition": _shard(8 * total, world),
    }


def zero_host_bytes(st: Setup, cst: Setup, world: int) -> int:
    """Host memory of ZeRO-Offload (not GPU memory): optimizer offload keeps the fp32 master, the AdamW
    moments and the fp32 grads of the partition in pinned host memory (16P/N); parameter offload keeps the
    half parameter partitions there too (weight bytes / N)."""
    off = st.spec.zero_offload
    host = _shard(16 * trainable_elements(st)[0], world) if off != "none" else 0
    if off == "optimizer_and_params":
        host += _shard(weight_bytes(cst), world)
    return host


def zero3_live_elements(st: Setup) -> int:
    """ZeRO-3 parameters gathered at once on a rank. DeepSpeed fetches the running module's parameters
    whatever the bound, prefetches up to stage3_prefetch_bucket_size elements ahead while fewer than
    stage3_max_live_parameters are available, and keeps those reused within stage3_max_reuse_distance.
    Estimate: the max-live bound (or the largest module, lm_head, when larger), never above the model."""
    zc, dm = zero_config(st), st.dims
    largest = max(dm["V"] * dm["h"], *(i * o for i, o in linear_shapes(st.arch).values()))
    total = st.dims["L"] * layer_elements(st) + root_elements(st)
    return min(total, max(int(zc["stage3_max_live_parameters"]), largest))


def zero3_persistent_elements(st: Setup) -> int:
    """Parameters under stage3_param_persistence_threshold elements stay whole on every rank (the norms)."""
    threshold, dm = zero_config(st)["stage3_param_persistence_threshold"], st.dims
    small = [dm["h"], dm["h"], dm["d"], dm["d"]] * dm["L"] + [dm["h"]]
    if not st.full:
        small += [n for n in trainable_groups(st)["layer"] if n < threshold] * dm["L"]
    return sum(n for n in small if n < threshold)


def zero_state_terms(st: Setup, cst: Setup, world: int, moment: str) -> dict[str, int]:
    """One rank's model states under ZeRO-2 / ZeRO-3 at a moment.

    Both: the optimizer partition (`zero_optimizer_bytes`); gradients reduced bucket by bucket through
    a flat ipg buffer of reduce_bucket_size elements in the half dtype (contiguous_gradients), each
    layer's grads unsharded in the half dtype until copied in, and the rank's half grad partition (P/N);
    at the step the partition's grads in fp32 (4P/N) and torch foreach AdamW's sqrt temporary of the
    same size. ZeRO-2 (DeepSpeed 0.19 stage_1_and_2.py) allocates the ipg buffer lazily, in setup_buckets
    from the first gradient hook of a backward (process_gradients), and frees it in that backward's
    epilogue (independent_gradient_partition_epilogue -> _release_ipg_buffers, every micro-batch): it is
    alive in the layers' backward and, when lm_head trains, in lm_head's, never at the end of the
    forward, in the loss's backward (no parameter grad yet) or at the optimizer step. ZeRO-3 is counted
    resident in every moment (estimate: allocated once). ZeRO-2 replicates
    the half parameters and fills its grad partition as buckets are reduced; ZeRO-3 partitions the
    parameters (weights/N, persistent small ones whole), gathers `zero3_live_elements` in forward and
    backward, allocates the grad partition once and steps sub-group by sub-group (sub_group_size). The
    half dtype of the grad partition assumes DeepSpeed's grad_accum_dtype default (the model dtype). Offload moves the optimizer's fp32 state and grads (and with
    optimizer_and_params the parameter partitions) to the host.
    """
    zc, spec = zero_config(st), st.spec
    stage3, offload = spec.dist == "deepspeed_zero3", spec.zero_offload
    total, layer, head = trainable_elements(st)
    hb, L = BYTES[trainable_dtype(cst)], st.dims["L"]
    ipg = int(DIST_ESTIMATES["zero_ipg_buckets"]) * int(zc["reduce_bucket_size"]) * hb
    terms: dict[str, int] = dict(zero_optimizer_bytes(st, world))
    grad_partition = _shard(total * hb, world) if offload == "none" else 0
    if stage3:
        persistent = zero3_persistent_elements(st) * hb
        if offload != "optimizer_and_params":
            terms["zero3_param_partition"] = _shard(weight_bytes(cst) - persistent, world)
        terms.update(
            zero3_persistent_params=persistent, zero_ipg_bucket=ipg, zero3_grad_partition=grad_partition
        )
        if moment != "optimizer_step":
            terms["zero3_live_params"] = zero3_live_elements(st) * hb
    else:
        terms[f"replicated_params_{cst.base}"] = weight_bytes(cst)
        if moment in ("last_layer_backward", "first_layer_backward") or (
            moment == "lm_head_backward" and head
        ):
            terms["zero_ipg_bucket"] = ipg
        if spec.grad_accum > 1 or moment == "optimizer_step":
            terms["zero2_grad_partition"] = grad_partition
        elif moment in ("last_layer_backward", "first_layer_backward"):
            done = head + (0 if moment == "last_layer_backward" else L - 1) * layer
            terms["zero2_grad_partition"] = _shard(done * hb, world) if offload == "none" else 0
    if moment == "lm_head_backward":
        terms["grads_in_flight"] = head * hb
    elif moment in ("last_layer_backward", "first_layer_backward"):
        terms["grads_in_flight"] = layer * hb
    elif moment == "optimizer_step" and offload == "none":
        step = min(_shard(total, world), ZERO3_SUB_GROUP) if stage3 else _shard(total, world)
        foreach = spec.optimizer in ("adamw", "adamw_foreach")
        width = 2 if spec.precision == "bf16" else 4  # pure bf16: the bf16 grad partition is the master grad
        terms["zero_fp32_grads"] = 0 if spec.precision == "bf16" else 4 * step
        terms["optimizer_transient"] = width * step if foreach else 0
    return terms


def dist_state_terms(st: Setup, cst: Setup, world: int, moment: str) -> dict[str, int]:
    """What the strategy adds to a moment in place of the single-GPU model states (FSDP2 / ZeRO)."""
    if st.spec.dist == "fsdp2":
        terms = dict(fsdp2_shard_bytes(st, world))
        if moment != "optimizer_step":
            terms.update(fsdp2_gathered_bytes(st, cst))
        return {**terms, **fsdp2_grad_terms(st, cst, world, moment)}
    return zero_state_terms(st, cst, world, moment)


def dist_moments(st: Setup, cst: Setup, p: Parts) -> dict[str, dict[str, int]]:
    """The moments of one rank. DDP: the single-GPU moments plus its buckets. FSDP2 / ZeRO: the moments
    of the module the ranks run (activations, loss, cuBLAS) with the model-state terms replaced."""
    world = st.spec.gpus
    if st.spec.dist == "ddp":
        return {
            name: {**terms, "ddp_grad_buckets": ddp_bucket_bytes(st)}
            for name, terms in moments(st, p).items()
        }
    out = {}
    for name, terms in moments(cst, p).items():
        kept = {
            k: v
            for k, v in terms.items()
            if k not in _MODEL_STATE_TERMS and not k.startswith(("weights_", "embed_head_norms_"))
        }
        out[name] = _nonzero({**kept, **dist_state_terms(st, cst, world, name)})
    return out


def predict_dist(st: Setup) -> Prediction:
    """predict() for a multi-GPU cell: one rank's peak allocated / reserved / NVML bytes. Slack is the
    single-GPU fit; NCCL's buffers (DIST_ESTIMATES) and ZeRO-Offload's host memory (`host_bytes`, not GPU
    memory, not in the NVML figure) are outside the allocated figure."""
    cst = compute_setup(st)
    p = parts(cst)
    table = dist_moments(st, cst, p)
    phase = max(table, key=lambda name: sum(table[name].values()))
    allocated = sum(table[phase].values())
    reserved = allocated + allocator_slack(p)
    paged = _shard(p.paged, st.spec.gpus) if st.spec.dist == "fsdp2" else p.paged
    outside = _nonzero(
        {
            "allocator_slack": reserved - allocated,
            "cuda_context": int(CALIBRATION["cuda_context_bytes"]),
            "non_torch_process": int(CALIBRATION["nvml_non_torch_bytes"]),
            "paged_optimizer_state (unified memory)": paged,
            "nccl_buffers": int(DIST_ESTIMATES["nccl_bytes"]) if st.spec.gpus > 1 else 0,
            "host_bytes": zero_host_bytes(st, cst, st.spec.gpus) if st.spec.dist in DEEPSPEED_DISTS else 0,
        }
    )
    nvml = reserved + sum(v for k, v in outside.items() if k not in ("allocator_slack", "host_bytes"))
    totals = {name: sum(terms.values()) for name, terms in table.items()}
    return Prediction(allocated, reserved, nvml, table[phase], phase, outside, totals)


def fits_budget(prediction: Prediction, budget: int) -> bool:
    """The harness caps torch's allocator at budget - CUDA context (bench.measure); under a cap the
    allocator frees its cache and retries before failing, so allocated (not reserved) must fit."""
    return prediction.peak_allocated_bytes + CALIBRATION["cuda_context_bytes"] <= budget
