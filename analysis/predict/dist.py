"""Several GPUs: what one rank holds (bench/multigpu/dist.py). Every rank holds alike (sharding is even up to
padding), so one rank's figure is the row's headline (the max over ranks).

The activations come from the same walk on the module the ranks really run (`compute_setup`), and the
model states (weights, grads, optimizer state) are replaced by what the strategy leaves on one rank
(`dist_state_terms`: DDP buckets, FSDP2 / ZeRO shards, gathered parameters, ZeRO buckets; ZeRO-Offload
state goes to `host_bytes`). Those terms are derived from the libraries' designs: DIST_ESTIMATES holds
their estimated constants.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from analysis.predict.calibration import DIST_ESTIMATES, ZERO3_SUB_GROUP
from analysis.predict.resolve import BYTES, Prediction, Setup
from analysis.predict.state import (
    grad_bytes,
    optimizer_state_bytes,
    optimizer_step_transient,
    trainable_dtype,
    trainable_groups,
    trainable_shapes,
    weight_bytes,
)
from analysis.predict.step import Parts, allocator_slack, answer, moments, nonzero, parts
from bench.multigpu.deepspeed_config import deepspeed_config
from bench.spec import DEEPSPEED_DISTS, CellSpec

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

    DeepSpeed (bench.multigpu.dist): under *_mixed the module is built in the half dtype (the engine holds it there
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


def layer_elements(st: Setup) -> int:
    """Parameters of one decoder layer: the seven projections, four norms, the LoRA adapters if any."""
    lora = 0 if st.full else sum(trainable_groups(st)["layer"])
    return st.desc.layer_params + lora


def root_elements(st: Setup) -> int:
    """Parameters outside the decoder layers: embedding, lm_head (none when tied), final norm."""
    return st.desc.embedding_params + st.desc.lm_head_params + st.desc.hidden


def trainable_elements(st: Setup) -> tuple[int, int, int]:
    """(all trainable elements P, one layer's, the head's done before layer backward: lm_head + norm)."""
    groups = trainable_groups(st)
    head = sum(groups["lm_head"]) + sum(groups["final_norm"])
    if st.tied:
        head += sum(groups["embedding"])  # the tied lm_head's grad is the embedding's
    return sum(trainable_shapes(st)), sum(groups["layer"]), head


def ddp_bucket_bytes(st: Setup) -> int:
    """DDP's gradient buckets. bench.multigpu.dist wraps with torch's defaults: gradient_as_bucket_view=False and
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
    """zero_optimization of bench.multigpu.deepspeed_config for this cell (bucket sizes, thresholds, offload)."""
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
    largest = max(dm["V"] * dm["h"], *(p.numel for p in st.desc.projections))
    total = st.dims["L"] * layer_elements(st) + root_elements(st)
    return min(total, max(int(zc["stage3_max_live_parameters"]), largest))


def zero3_persistent_elements(st: Setup) -> int:
    """Parameters under stage3_param_persistence_threshold elements stay whole on every rank (the norms)."""
    threshold, dm = zero_config(st)["stage3_param_persistence_threshold"], st.dims
    small = [*st.desc.layer_norm_widths, *st.desc.layer_bias_widths] * dm["L"] + [dm["h"]]
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
            if k not in _MODEL_STATE_TERMS and not k.startswith(("weights_", "experts_", "embed_head_norms_"))
        }
        out[name] = nonzero({**kept, **dist_state_terms(st, cst, world, name)})
    return out


def predict_dist(st: Setup, notes: tuple[str, ...] = ()) -> Prediction:
    """predict() for a multi-GPU cell: one rank's peak allocated / reserved / NVML bytes. Slack is the
    single-GPU fit; NCCL's buffers (DIST_ESTIMATES) and ZeRO-Offload's host memory (`host_bytes`, not GPU
    memory, not in the NVML figure) are outside the allocated figure."""
    cst = compute_setup(st)
    p = parts(cst)
    outside = {
        "paged_optimizer_state (unified memory)": _shard(p.paged, st.spec.gpus) if st.spec.dist == "fsdp2" else p.paged,
        "nccl_buffers": int(DIST_ESTIMATES["nccl_bytes"]) if st.spec.gpus > 1 else 0,
        "host_bytes": zero_host_bytes(st, cst, st.spec.gpus) if st.spec.dist in DEEPSPEED_DISTS else 0,
    }
    return answer(st, dist_moments(st, cst, p), allocator_slack(p), outside, notes)
