"""NVML (nvidia-ml-py's `pynvml`): the driver's view of memory, beside the allocator's.

torch.cuda's counters see only the caching allocator. NVML also sees the CUDA context, cuBLAS
and NCCL workspaces and anything allocated outside torch, which is what decides whether a job
fits on a card. A side thread samples the process's and the device's used memory and keeps the
peak. Everything here degrades to None where there is no NVIDIA driver.
"""

from __future__ import annotations

import os
import threading
import time

try:
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
    pynvml = None

_initialised: bool | None = None


def available() -> bool:
    global _initialised
    if _initialised is None:
        try:
            pynvml.nvmlInit()
            _initialised = True
        except Exception:
            _initialised = False
    return _initialised


def _handle(index: int = 0):
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def device_index() -> int:
    """Physical index of the device this process uses (first of CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


def device_info() -> dict:
    if not available():
        return {}
    handle = _handle(device_index())
    name = pynvml.nvmlDeviceGetName(handle)
    version = pynvml.nvmlSystemGetCudaDriverVersion()
    return {
        "name": name.decode() if isinstance(name, bytes) else name,
        "total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        "count": int(pynvml.nvmlDeviceGetCount()),
        "driver": _str(pynvml.nvmlSystemGetDriverVersion()),
        "cuda_driver": f"{version // 1000}.{version % 1000 // 10}",
    }


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def device_used_bytes(index: int | None = None) -> int | None:
    if not available():
        return None
    return int(pynvml.nvmlDeviceGetMemoryInfo(_handle(device_index() if index is None else index)).used)


def process_used_bytes(pid: int | None = None, index: int | None = None) -> int | None:
    """Memory NVML attributes to `pid` on the device, or None where the driver does not say."""
    if not available():
        return None
    pid = os.getpid() if pid is None else pid
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(
            _handle(device_index() if index is None else index)
        )
    except pynvml.NVMLError:
        return None
    for proc in procs:
        if proc.pid == pid and proc.usedGpuMemory is not None:
            return int(proc.usedGpuMemory)
    return None


class PeakSampler:
    """Samples process and device memory every `interval_s` in a daemon thread; keeps the peaks."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_process_bytes: int | None = None
        self.peak_device_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)

    def sample(self) -> None:
        proc, dev = process_used_bytes(), device_used_bytes()
        if proc is not None:
            self.peak_process_bytes = max(proc, self.peak_process_bytes or 0)
        if dev is not None:
            self.peak_device_bytes = max(dev, self.peak_device_bytes or 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        if available():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.sample()
