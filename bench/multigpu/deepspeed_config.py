"""The DeepSpeed config of a cell, as a pure function of its spec (no deepspeed, no torch import).

Every knob that changes memory is written out rather than left to DeepSpeed's defaults, so a row
means the same thing under another DeepSpeed version. The bucket sizes are DeepSpeed's documented
defaults (what a minimal user config gets); overlap_comm follows DeepSpeed's defaults too (off for
ZeRO-2, on for ZeRO-3), since HF's example configs turning it on for ZeRO-2 cost 4.5x the buckets.

Precision: DeepSpeed's bf16/fp16 modes cast the module to the half dtype and keep fp32 master
weights in the ZeRO optimizer partitions: the memory model of bf16_mixed / fp16_mixed (2-byte
weights and gradients, 4-byte master copy, 8-byte AdamW moments), not torch autocast's fp32 weights.
The optimizer is DeepSpeed's own AdamW: torch.optim.AdamW ("torch_adam") on the GPU, which needs no
CUDA compiler (FusedAdam is JIT-built with nvcc); with optimizer offload DeepSpeedCPUAdam, as users
run it (its C++ op is JIT-built on first use and needs a host compiler).
"""

from __future__ import annotations

from typing import Any

from bench.spec import DEEPSPEED_DISTS, CellSpec

LR = 1e-5  # as bench.model.train.make_optimizer
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, so the update matches the single-GPU cells
BUCKET = 500_000_000  # reduce_bucket_size / allgather_bucket_size: DeepSpeed's default (elements)


def bf16_section(spec: CellSpec) -> dict[str, Any]:
    """bf16_mixed: DeepSpeed's bf16 mode (bf16 module, fp32 masters and Adam moments in the ZeRO
    partitions). Pure bf16: its low-precision mode, with the masters, grads and moments in bf16 too."""
    section: dict[str, Any] = {"enabled": spec.precision in ("bf16_mixed", "bf16")}
    if spec.precision == "bf16":
        section.update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    return section


def deepspeed_config(spec: CellSpec, world_size: int | None = None) -> dict[str, Any]:
    """The ds_config dict of `spec` for deepspeed.initialize(config=...) and zero.Init."""
    if spec.dist not in DEEPSPEED_DISTS:
        raise ValueError(f"dist {spec.dist!r} is not a DeepSpeed strategy ({', '.join(DEEPSPEED_DISTS)})")
    world = spec.gpus if world_size is None else world_size
    stage = 3 if spec.dist == "deepspeed_zero3" else 2
    offload_optimizer = spec.zero_offload in ("optimizer", "optimizer_and_params")
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": stage == 3,
        "reduce_scatter": True,
        "reduce_bucket_size": BUCKET,
    }
    if stage == 2:
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = BUCKET
    else:
        zero.update(
            stage3_prefetch_bucket_size=50_000_000,
            stage3_param_persistence_threshold=100_000,
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.zero_offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    optimizer_params: dict[str, Any] = {
        "lr": LR,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": WEIGHT_DECAY,
        "adam_w_mode": True,
    }
    if not offload_optimizer:
        optimizer_params["torch_adam"] = True
        if spec.optimizer == "adamw_fused":
            optimizer_params["fused"] = True
        elif spec.optimizer == "adamw_foreach":
            optimizer_params["foreach"] = True

    return {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.batch_size * spec.grad_accum * world,
        "gradient_clipping": 0.0,
        "bf16": bf16_section(spec),
        "fp16": {
            "enabled": spec.precision == "fp16_mixed",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_allow_untested_optimizer": True,
        "activation_checkpointing": {"partition_activations": False},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
