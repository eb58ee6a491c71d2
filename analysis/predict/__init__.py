"""Predicted GPU memory of one cell, from first principles. Imports no torch.

`predict(spec)` is the entry point (a CellSpec or a dict of one). The parts, one concern each:
`resolve` (the spec resolved into the architecture and the dtypes bench builds), `state` (weights,
adapters, gradients, optimizer state), `graph` and `layer` (the op-by-op walk of a decoder layer, read
from the architecture description in bench.model.arch), `head` (final norm, lm_head, loss), `step` (the
moments of a step and the single-GPU answer), `dist` (what one rank of a multi-GPU cell holds) and
`calibration` (every empirical constant, in one place).
"""

from __future__ import annotations

import os
from typing import Any

from analysis.predict.attention import (
    attention_eager,
    attention_flash,
    attention_kernel,
    attention_masked,
    attention_math,
    eager_mask_bytes,
)
from analysis.predict.calibration import CALIBRATION, CALIBRATION_CELL_IDS, DIST_ESTIMATES
from analysis.predict.dist import (
    compute_setup,
    fsdp2_gathered_bytes,
    fsdp2_grad_terms,
    fsdp2_shard_bytes,
    layer_elements,
    predict_dist,
    root_elements,
    trainable_elements,
    zero3_live_elements,
    zero3_persistent_elements,
    zero_host_bytes,
    zero_optimizer_bytes,
    zero_state_terms,
)
from analysis.predict.graph import Graph, T
from analysis.predict.head import fused_loss_bytes, head_graph, loss_bytes
from analysis.predict.layer import layer_graph, stream_dtype
from analysis.predict.resolve import Prediction, Setup, as_spec, notes, setup
from analysis.predict.state import (
    adapter_bytes,
    decoder_weight_bytes,
    grad_bytes,
    nf4_linear_bytes,
    optimizer_state_bytes,
    optimizer_step_transient,
    unquantized_weight_bytes,
    weight_bytes,
)
from analysis.predict.step import (
    Parts,
    allocator_slack,
    layer_backward_moments,
    moments,
    parts,
    predict_single,
)
from bench.model.arch import UnsupportedArchitecture
from bench.spec import CellSpec


def predict(spec: dict[str, Any] | CellSpec, arch: dict | None = None, simulate: bool | str = False) -> Prediction:
    """Predicted steady-state peak allocated / reserved / NVML bytes of the cell `spec`.

    `simulate`: True replays the cell's allocations through the caching allocator (analysis.predict.simulate:
    seconds the first time a cell is seen, then cached) for reserved and NVML as exact as allocated;
    "cached" does so only where the result is already cached (bulk callers: reports, dry runs, searches);
    False keeps the analytic estimate of the allocator's slack. Single-GPU cells only.
    Raises UnsupportedArchitecture, with the reason, for a model or setting the walk does not describe."""
    st = setup(as_spec(spec, arch), arch)
    said = notes(st)
    if st.spec.dist != "none":
        return predict_dist(st, said)
    pred = predict_single(st, said)
    if simulate and arch is None:
        from analysis.predict import simulate as sim

        if os.environ.get("FTMEM_SIMULATE") == "0":  # tests of other code: only what is cached already
            simulate = "cached"
        if simulate != "cached" or sim.is_cached(st.spec):
            pred = sim.refine(pred, st.spec)
    return pred


def fits_budget(prediction: Prediction, budget: int) -> bool:
    """Does the cell fit a card of `budget` bytes (its nvidia-smi total)? A card runs out when the process's
    memory as nvidia-smi shows it reaches the total, so the predicted NVML process peak must fit: allocated,
    the allocator's slack, the CUDA context and the memory outside torch (the harness's own verdict,
    bench.cell.measure: the run under the cap, confirmed by NVML)."""
    return nvml_uncapped(prediction) <= budget


def fits_allocated(prediction: Prediction, budget: int) -> bool:
    """Does the allocated peak (with the CUDA context and the memory outside torch) fit? Where it does
    and `fits_budget` does not, the shortfall is the caching allocator's slack: fragmentation that
    expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) can save."""
    outside = prediction.outside_allocated
    return prediction.peak_allocated_bytes + outside.get("cuda_context", 0) + outside.get("non_torch_process", 0) <= budget


def fit_verdict(prediction: Prediction, budget: int) -> str:
    """"fits", "OOM" or "marginal" on a card of `budget` bytes. Marginal: the allocated peak fits but the
    allocator's uncapped slack does not, so the cell fits only if the allocator, at the cap, frees its
    cached segments and then finds room in what the live blocks leave. That turns on where every block
    lies, to the byte: cells measured on an H200 fit at one budget and ran out at a larger one
    (results/nvidia-h200-x1/allocator-trace.jsonl), and 0.4 GB more allocated (a profiler's) turned a fit
    into an OOM. The simulation under the cap has an outcome of its own, shown beside the verdict (right on
    42 of 45 such rows), not taken for one. Expandable segments make such cells fit."""
    if fits_budget(prediction, budget):
        return "fits"
    return "marginal" if fits_allocated(prediction, budget) else "OOM"


def nvml_uncapped(prediction: Prediction) -> int:
    """The NVML process peak the cell would reach on a card without a cap (the slack in full)."""
    outside = prediction.outside_allocated
    extra = sum(v for k, v in outside.items() if k not in ("allocator_slack", "host_bytes"))
    return max(prediction.uncapped_reserved_bytes, prediction.peak_reserved_bytes) + extra


__all__ = [
    "CALIBRATION",
    "CALIBRATION_CELL_IDS",
    "DIST_ESTIMATES",
    "Graph",
    "Parts",
    "Prediction",
    "Setup",
    "T",
    "UnsupportedArchitecture",
    "adapter_bytes",
    "allocator_slack",
    "attention_eager",
    "attention_flash",
    "attention_kernel",
    "attention_masked",
    "attention_math",
    "compute_setup",
    "decoder_weight_bytes",
    "eager_mask_bytes",
    "fit_verdict",
    "fits_allocated",
    "fits_budget",
    "nvml_uncapped",
    "fsdp2_gathered_bytes",
    "fsdp2_grad_terms",
    "fsdp2_shard_bytes",
    "fused_loss_bytes",
    "grad_bytes",
    "head_graph",
    "layer_backward_moments",
    "layer_elements",
    "layer_graph",
    "loss_bytes",
    "moments",
    "nf4_linear_bytes",
    "optimizer_state_bytes",
    "optimizer_step_transient",
    "parts",
    "predict",
    "predict_dist",
    "root_elements",
    "setup",
    "stream_dtype",
    "trainable_elements",
    "unquantized_weight_bytes",
    "weight_bytes",
    "zero3_live_elements",
    "zero3_persistent_elements",
    "zero_host_bytes",
    "zero_optimizer_bytes",
    "zero_state_terms",
]
