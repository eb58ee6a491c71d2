"""Whether this machine can run CUDA cells, decided before any cell runs.

The runner's process never imports torch (seconds) nor initialises CUDA (its forked cells could not
use it then), so the check reads torch's version file and asks NVML. Without it, every CUDA cell of a
sweep on a CPU machine became an error row, and `ftmem run` died with an AttributeError from torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from bench.cell import env, nvml
from bench.spec import CellSpec


class NoCuda(RuntimeError):
    """CUDA cells asked for on a machine that cannot run them: said once, before any row."""


def _hidden_by_env() -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing, or to -1 first (CUDA stops at the first bad entry)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return False
    first = visible.split(",")[0].strip()
    return first == "" or first.startswith("-")


def cuda_missing() -> str | None:
    """Why CUDA cells cannot run here, or None when they can."""
    torch_version = env.package_version("torch")
    if torch_version is None:
        return "torch is not installed"
    if env.torch_cuda_version() is None:
        return f"torch {torch_version} is a CPU build"
    if _hidden_by_env():
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    if not nvml.device_count():
        return "no NVIDIA GPU or driver was found (NVML)"
    return None


#: What to do about it, for `ftmem run` and `ftmem sweep`.
CPU_REMEDY = (
    "Run on CPU with --device cpu (in a sweep file, device: cpu in its base, as sweeps/smoke-cpu.yaml has), "
    "or on a machine with a GPU"
)


def require_cuda(specs: Iterable[CellSpec], remedy: str = CPU_REMEDY) -> None:
    """Raise NoCuda if any spec needs device cuda and this machine has none."""
    needing = sum(spec.device == "cuda" for spec in specs)
    if not needing:
        return
    why = cuda_missing()
    if why is None:
        return
    cells = "the cell needs" if needing == 1 else f"{needing} cells need"
    raise NoCuda(f"no CUDA GPU here: {why}, and {cells} device cuda. {remedy}")
