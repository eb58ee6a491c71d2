"""What a forked cell finds already imported (`ftmem sweep --preload`; bench.cell.forked).

Imported once in the fork server, never in a cell: torch, transformers' Qwen3 modelling and ftmem's
measurement code. Nothing here may initialise CUDA, or the forked cells could not use it: torch's
availability check goes through NVML, and peft is left out (it imports bitsandbytes, which asks the
CUDA runtime for the device's capability at import).
"""

import os

from bench.cell.procs import die_with_parent

# The server dies with the runner (and its cells with it, bench.cell.worker.forked_main): Python's fork
# server would otherwise live on while a cell holds its "alive" pipe, and so would the cell.
die_with_parent(check_env=False)
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402
import transformers.models.qwen3.modeling_qwen3  # noqa: E402, F401

import bench.cell.measure  # noqa: E402, F401

if torch.cuda.is_initialized():  # pragma: no cover - a library initialised CUDA at import
    raise RuntimeError("CUDA was initialised while preloading; forked cells could not use it")
