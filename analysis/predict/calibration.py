"""Every empirical constant of the predictor, in one place.

Single-GPU constants were fit on results/nvidia-h200-x1/foundation.jsonl (H200, driver 580.159.04, torch
2.11, transformers 5.17, peft 0.21): Qwen3-14B LoRA r=8 bf16_mixed sdpa, row A = seq 2048 b1 GC off, row B
= seq 2048 b1 GC on, row C = seq 4096 b4 GC on. No family has constants of its own: the same calibration
serves every architecture (bench.model.arch), whose terms come from the libraries' code.
"""

from __future__ import annotations

MIB = 2**20

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
    # NVML beyond reserved and the context at a build-phase peak (the kernels a build loads: draws, copies,
    # quantization): 96,468,992 bytes in all three rows whose NVML peak came from the build (Qwen3-30B-A3B
    # QLoRA twice, Qwen1.5-MoE QLoRA: fp32 upcast of the experts).
    "nvml_build_non_torch_bytes": 96_468_992,
    # LLM.int8's kernels: every lora8bit row's step has 304 MiB outside torch where the others have 240.
    "nvml_int8_kernels_bytes": 64 * MIB,
    # SDPA's flash / memory-efficient kernel images: eager rows have 224 MiB outside torch, SDPA rows 240.
    "nvml_sdpa_kernels_bytes": 16 * MIB,
    # reserved - allocated at the peak, beyond the unreusable half-precision logits block (see
    # `allocator_slack`): slack_bytes + slack_layer_fraction x one decoder layer's saved activations
    # (GC off). Two parameters fit exactly on rows B and C; row A is the check (-84 MB). Rows of other
    # configurations (QLoRA: bitsandbytes' dequantized-weight temporaries) show 0.4-1.1 GB more slack.
    "slack_bytes": 280_356_571,
    "slack_layer_fraction": 0.79406,
}

#: cell_id of rows A, B and C above: the accuracy table reports the other rows apart, as held out.
CALIBRATION_CELL_IDS = ("526a5bd9fc1004a6", "4308b89cb7ed1863", "a93a1c2dc003d9f1")

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

#: DeepSpeed's default sub_group_size (not set by bench.multigpu.deepspeed_config): ZeRO-3 steps the optimizer
#: over its fp32 partition in sub-groups of this many elements.
ZERO3_SUB_GROUP = 1_000_000_000
