"""The result row: one JSON object per cell, the schema every other part of ftmem builds on.

Every row has every field below (null where it does not apply), so a results file is
self-describing and `analysis/` can load any row without the code that wrote it. Bytes are raw
integers; times are seconds. `status` is separate from the numbers: an `oom` row still carries
what was measured up to the failure. Bump SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1

STATUSES = ("ok", "oom", "error", "timeout", "invalid", "skipped")

#: field -> description. The order is the order of the keys in a written row.
FIELDS: dict[str, str] = {
    "schema_version": "version of this schema",
    "cell_id": "sha256[:16] of the spec's canonical JSON (CellSpec.cell_id)",
    "spec": "the cell's spec, field by field (bench.spec.CellSpec)",
    "status": "ok | oom (CUDA out of memory) | error | timeout | invalid (rejected spec) | skipped (OOM pruning)",
    "error": "message of the failure (status other than ok), else null",
    "implied_by": "skipped rows: cell_id of the OOM cell that implies this one would OOM",
    "sweep": "sweep rows: {name, file, claims}: the sweep and the guide claim ids (C1-C20) the cell tests",
    "repeat": "repeat index of this cell in its sweep (0 for the first run)",
    "budget_bytes": "memory cap in bytes (card name -> nvidia-smi MiB; number -> 10^9 bytes), null if none",
    "fits_budget": "true if the cell ran every step under the cap, false if it hit OOM under it, null without a cap",
    "oom_phase": "build | first_step | steady: the phase that ran out of memory",
    "oom_requested_bytes": "bytes the failing allocation asked for (parsed from torch's message)",
    "oom_allocated_bytes": "torch.cuda.memory_allocated() when the OOM was caught",
    "oom_reserved_bytes": "torch.cuda.memory_reserved() when the OOM was caught",
    "oom_rank": "multi-GPU cells (spec gpus/dist): the first rank that ran out of memory (status oom); "
    "the oom_* fields are that rank's",
    "context_bytes": "NVML process memory after CUDA context creation, before any tensor (the baseline)",
    "build_peak_allocated_bytes": "torch max_memory_allocated while building the model (weights, quantization)",
    "build_peak_reserved_bytes": "torch max_memory_reserved while building the model",
    "first_step_peak_allocated_bytes": "max_memory_allocated over the first optimizer step (peaks reset before it)",
    "first_step_peak_reserved_bytes": "max_memory_reserved over the first optimizer step",
    "peak_allocated_bytes": "max_memory_allocated over the measured (steady-state) steps: the headline figure",
    "peak_reserved_bytes": "max_memory_reserved over the measured steps (allocated + caching-allocator slack)",
    "nvml_peak_process_bytes": "peak NVML memory of this process over the whole cell (context + reserved + non-torch)",
    "nvml_peak_device_bytes": "peak NVML used memory of the whole device over the whole cell; multi-GPU "
    "cells: the peak of the sum over the cell's GPUs on this node, sampled together by the parent",
    "nvml_baseline_device_bytes": "NVML used memory of the device before the cell's process touched CUDA "
    "(multi-GPU: summed over the GPUs, before torchrun started)",
    "peak_rss_bytes": "CPU cells: peak resident set size of the process (ru_maxrss)",
    "host_peak_rss_bytes": "multi-GPU cells: peak of the summed resident set size of the cell's processes "
    "(torchrun and its ranks; pinned host buffers of CPU offload included), sampled every 0.1 s by the parent",
    "host_min_available_bytes": "multi-GPU cells: the least memory the host had available (psutil) while the cell ran",
    "host_total_bytes": "multi-GPU cells: the host's total memory",
    "host_oom": "multi-GPU cells: true when a rank was killed by the kernel's OOM killer (SIGKILL, not sent by "
    "ftmem) while the host had under 5% of its memory available: status oom, the host ran out, not the GPU",
    "baseline_rss_bytes": "CPU cells: resident set size before the model was built",
    "param_bytes": "bytes of all parameters (packed bytes + quantization constants for 4/8-bit)",
    "n_params": "number of parameters, counted as the unquantized model has them",
    "trainable_param_bytes": "bytes of the trainable parameters",
    "n_trainable_params": "number of trainable parameters",
    "grad_bytes": "bytes of the gradients of the trainable parameters (their dtype)",
    "optimizer_state_bytes": "bytes of the tensors in optimizer.state after the measured steps",
    "buffer_bytes": "bytes of the model's buffers (rotary tables)",
    "step_time_s": "median wall time of one measured optimizer step (grad_accum micro-batches)",
    "step_times_s": "wall time of each measured step",
    "tokens_per_s": "tokens per optimizer step / step_time_s (multi-GPU: all ranks' tokens / the slowest rank)",
    "first_step_time_s": "wall time of the first (warm-up) step, compilation included",
    "build_time_s": "wall time of building the model",
    "build_breakdown_s": "build time by stage: imports (transformers, peft, bitsandbytes), weights (skeleton, random init, quantization), prepare, lora, wrap",
    "startup_to_first_step_s": "process start to the start of the first training step",
    "startup_breakdown_s": "startup_to_first_step_s by stage: interpreter_and_imports (to the start of the "
    "measurement), cuda_context (context and budget), build (the model), training_setup (batches, optimizer)",
    "cell_process": "fresh (a new Python interpreter) or forked (from ftmem's preloaded fork server, torch and "
    "transformers imported once per sweep: sweep --preload, the default; startup_to_first_step_s then leaves out those imports)",
    "cell_wall_time_s": "wall time of the cell as the parent saw it (process start to row)",
    "final_loss": "loss of the last measured micro-batch (random weights: a sanity value only)",
    "attn_impl_used": "attention implementation the model really ran with",
    "experts_implementation": "mixture-of-experts cells: transformers' experts code that ran (grouped_mm, "
    "batched_mm or eager); null for dense models",
    "moe_expert_tokens": "mixture-of-experts cells: tokens routed to each expert, one list per MoE layer, in the "
    "first forward of the warm-up step (outside the measured steps)",
    "moe_imbalance": "mixture-of-experts cells: the busiest expert's tokens over the mean, the largest over layers",
    "unavailable": "features asked for that this machine lacks (e.g. flash_attention_2)",
    "profile_peak_bytes": "profile_memory cells: peak of torch's memory profiler timeline over the profiled steps "
    "(warm-up + first measured; tensor bytes on the cell's device, no allocator rounding)",
    "profile_categories_bytes": "profile_memory cells: bytes by category at that peak: parameters, gradients, "
    "optimizer_state, activations, temporaries, other (what torch filed as inputs, autograd detail or unknown "
    "and bench.cell.profile could not place: the token batch, allocations without a tensor such as cuBLAS "
    "workspaces); sums to profile_peak_bytes",
    "profile_by_lifetime_bytes": "profile_memory cells: of profile_categories_bytes, the bytes that bench.cell.profile "
    "placed itself where torch's profiler left them unknown or filed them as inputs or autograd detail: the "
    "model's own state (parameters, buffers, quantization constants, matched by storage) as parameters; made in "
    "forward and freed in that step's backward as activations; made and freed within one part of a step as "
    "temporaries",
    "profile_peak_phase": "profile_memory cells: forward | backward | optimizer_step | zero_grad | other: "
    "the part of the step (record_function markers of bench.model.train.Stepper) the peak fell in",
    "profile_peak_step": "profile_memory cells: the profiled step of the peak, 'warmup N' or 'measured 1'",
    "profile_timeline_file": "profile_memory cells: the memory timeline JSON (bench.cell.profile), relative to the "
    "results file's folder (runner's artifacts folder)",
    "profile_analysis_s": "profile_memory cells: seconds spent building the memory profile after the steps",
    "snapshot_file": "snapshot cells: the CUDA allocator snapshot pickle (for pytorch.org/memory_viz), "
    "relative like profile_timeline_file",
    "ranks": "multi-GPU cells: one object per rank (rank, local_rank, host, status, error and that rank's "
    "measured fields); the row's peaks, times and model-state bytes are the max over ranks, and model-state "
    "bytes count the rank's own shard. torch's counters miss NCCL buffers and workspaces: only the NVML "
    "figures (nvml_peak_process_bytes per rank, nvml_peak_device_bytes summed) see them. Null for 1-process cells",
    "env": "provenance: gpu_name, gpu_total_bytes, gpu_count (GPUs on the host), cuda_visible_devices "
    "(the GPUs the cell was given, null when unrestricted), pytorch_cuda_alloc_conf (the allocator's options, "
    "null for torch's defaults), driver, cuda, torch, transformers, peft, "
    "bitsandbytes, accelerate, liger_kernel, flash_attn, python, platform, hostname, git_commit, git_dirty, started_at",
}


def new_row(spec_dict: dict[str, Any], cell_id: str, status: str = "ok", **values: Any) -> dict[str, Any]:
    """A row with every schema field present, in schema order."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise KeyError(f"fields not in the result schema: {sorted(unknown)}")
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(schema_version=SCHEMA_VERSION, cell_id=cell_id, spec=spec_dict, status=status, repeat=0)
    row.update(values)
    return row


def check_row(row: dict[str, Any]) -> list[str]:
    """Problems with a row (missing or unknown fields, bad status); empty when it is well formed."""
    problems = [f"missing field {k!r}" for k in FIELDS if k not in row]
    problems += [f"unknown field {k!r}" for k in row if k not in FIELDS]
    if row.get("status") not in STATUSES:
        problems.append(f"status {row.get('status')!r} not in {STATUSES}")
    return problems


# -- validation of rows read back -------------------------------------------------------------------
#: What a field may hold besides null, as the types JSON values load as. A row written by ftmem always
#: matches; a row edited by hand, or by another tool, may not (a peak of "n/a" would otherwise turn into
#: a missing number and change verdicts without a word).
_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "cell_id": (str,),
    "spec": (dict,),
    "status": (str,),
    "repeat": (int,),
    "sweep": (dict,),
    "env": (dict,),
    "fits_budget": (bool,),
    "host_oom": (bool,),
    "oom_rank": (int,),
    "n_params": (int,),
    "n_trainable_params": (int,),
    "step_times_s": (list,),
    "build_breakdown_s": (dict,),
    "startup_breakdown_s": (dict,),
    "profile_categories_bytes": (dict,),
    "unavailable": (list,),
    "ranks": (list,),
    "tokens_per_s": _NUMBER,
    "final_loss": _NUMBER,
    **dict.fromkeys(
        (
            "error",
            "implied_by",
            "oom_phase",
            "cell_process",
            "attn_impl_used",
            "profile_peak_phase",
            "profile_peak_step",
            "profile_timeline_file",
            "snapshot_file",
        ),
        (str,),
    ),
}
#: Fields every row must carry: without them a row cannot be told apart, judged or placed.
REQUIRED = ("schema_version", "cell_id", "spec", "status")
#: Spec fields the analysis cannot do without, and their types.
REQUIRED_SPEC: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "method": (str,),
    "seq_len": (int,),
    "batch_size": (int,),
}


def field_types(name: str) -> tuple[type, ...] | None:
    """The types a field may hold besides null: as listed, else a number for bytes and seconds; None
    for a field not typed here (a field added later is read as it is until it is typed)."""
    if name in _FIELD_TYPES:
        return _FIELD_TYPES[name]
    return _NUMBER if name.endswith(("_bytes", "_s")) else None


def _type_problem(where: str, value: Any, types: tuple[type, ...]) -> str | None:
    """Why `value` is not one of `types`; None when it is (or is null). A bool is no number here,
    though Python counts it as an int."""
    if value is None or (isinstance(value, types) and (bool in types or not isinstance(value, bool))):
        return None
    kind = "a number" if types == _NUMBER else " or ".join(_JSON_NAMES[t] for t in types)
    return f"{where}: {value!r} is not {kind}"


_JSON_NAMES = {
    int: "a whole number",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "an object",
    list: "a list",
}


def newer_schema(row: dict[str, Any]) -> bool:
    """A row written by a newer ftmem (its schema_version above SCHEMA_VERSION): this code cannot
    know what its fields mean, so it must not read it."""
    version = row.get("schema_version")
    return isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION


def validate_row(row: Any) -> list[str]:
    """Why a row read back from a results file cannot be analysed; empty when it can.

    Fields written by an older ftmem may be absent (they read as null); a present field must hold
    its type: numbers for bytes and seconds, a known status, a spec naming model, method, seq_len and
    batch_size. A newer schema_version is a problem too (see `newer_schema`)."""
    if not isinstance(row, dict):
        return [f"a row must be a JSON object, not {type(row).__name__}"]
    problems = [f"no {name!r}" for name in REQUIRED if row.get(name) is None]
    for name, value in row.items():
        types = field_types(name)
        problem = _type_problem(name, value, types) if types else None
        problems += [problem] if problem else []
    if isinstance(row.get("status"), str) and row["status"] not in STATUSES:
        problems.append(f"status: {row['status']!r} is not one of {', '.join(STATUSES)}")
    if newer_schema(row):
        problems.append(
            f"schema_version {row['schema_version']} is newer than this ftmem reads ({SCHEMA_VERSION})"
        )
    spec = row.get("spec")
    if isinstance(spec, dict):
        for name, types in REQUIRED_SPEC.items():
            problem = _type_problem(f"spec.{name}", spec.get(name), types)
            problems += [problem] if problem else [f"no spec.{name}"] if spec.get(name) is None else []
    env = row.get("env")
    if isinstance(env, dict):
        for name, types in (("started_at", (str,)), ("gpu_total_bytes", (int,)), ("gpu_name", (str,))):
            problem = _type_problem(f"env.{name}", env.get(name), types)
            problems += [problem] if problem else []
    return problems
