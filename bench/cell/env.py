"""Provenance recorded with every row: the card, the driver, library versions, git commit, date.

Reads versions from package metadata, so the parent process can describe the environment of a
row (a timeout, a crash) without importing torch.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import runpy
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from bench.cell import nvml

PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "bitsandbytes": "bitsandbytes",
    "accelerate": "accelerate",
    "liger_kernel": "liger-kernel",
    "flash_attn": "flash-attn",
    "deepspeed": "deepspeed",
}


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torch_cuda_version() -> str | None:
    """torch.version.cuda read from torch's version.py, without importing torch (parent rows)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(spec.submodule_search_locations[0]) / "version.py"
    try:
        return runpy.run_path(str(version_file)).get("cuda")
    except Exception:  # an unusual build: the row says null rather than failing the cell
        return None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the ftmem checkout. FTMEM_GIT_COMMIT (with FTMEM_GIT_DIRTY=1 if dirty) wins
    where set: a copy of the tree on a rented machine may carry no .git, or a stale one."""
    override = os.environ.get("FTMEM_GIT_COMMIT")
    if override:
        return override, os.environ.get("FTMEM_GIT_DIRTY") == "1"
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def collect(cuda_runtime: str | None = None) -> dict:
    """The `env` object of a row. `cuda_runtime` is torch.version.cuda where torch is imported."""
    commit, dirty = git_commit()
    gpu = nvml.device_info()
    env = {
        "gpu_name": gpu.get("name"),
        "gpu_total_bytes": gpu.get("total_bytes"),
        "gpu_count": gpu.get("count"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "driver": gpu.get("driver"),
        "cuda": cuda_runtime if cuda_runtime is not None else torch_cuda_version(),
        "cuda_driver_api": gpu.get("cuda_driver"),
    }
    env.update({key: package_version(dist) for key, dist in PACKAGES.items()})
    env.update(
        python=platform.python_version(),
        platform=platform.platform(),
        hostname=socket.gethostname(),
        executable=sys.executable,
        git_commit=commit,
        git_dirty=dirty,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return env
