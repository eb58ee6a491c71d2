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


def device_count() -> int:
    """GPUs the driver sees (0 without a driver), whatever CUDA_VISIBLE_DEVICES says."""
    if not available():
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def _handle(index: int = 0):
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def device_index() -> int:
    """Physical index of the device this process uses: entry LOCAL_RANK (0 outside torchrun) of
    CUDA_VISIBLE_DEVICES, or LOCAL_RANK itself when that is unset (UUID entries are not resolved)."""
    local_rank = os.environ.get("LOCAL_RANK", "0")
    return visible_indices(int(local_rank) + 1)[-1] if local_rank.isdigit() else 0


def visible_indices(count: int) -> list[int]:
    """Physical indices of the first `count` devices a child process would see as cuda:0, cuda:1, ..."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        return list(range(count))
    return [int(v) if v.isdigit() else 0 for v in visible[:count]] + [0] * max(0, count - len(visible))


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


class Sampling:
    """A daemon thread that calls `sample()` every `interval_s` while the `with` block runs."""

    interval_s: float

    def sample(self) -> None:
        raise NotImplementedError

    def _active(self) -> bool:
        return available()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        if self._active():
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.sample()


class PeakSampler(Sampling):
    """Samples process and device memory every `interval_s` in a daemon thread; keeps the peaks."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_process_bytes: int | None = None
        self.peak_device_bytes: int | None = None

    def sample(self) -> None:
        proc, dev = process_used_bytes(), device_used_bytes()
        if proc is not None:
            self.peak_process_bytes = max(proc, self.peak_process_bytes or 0)
        if dev is not None:
            self.peak_device_bytes = max(dev, self.peak_device_bytes or 0)


class DevicesSampler(Sampling):
    """The parent's view of a multi-GPU cell: NVML used memory of each of `indices`, sampled together.

    `peak_sum_bytes` is the peak of the sum over the devices at one instant (what the cell holds on
    this node, NCCL buffers and every rank's context included); `peak_bytes` each device's own peak.
    """

    def __init__(self, indices: list[int], interval_s: float = 0.01):
        self.indices, self.interval_s = list(indices), interval_s
        self.peak_sum_bytes: int | None = None
        self.baseline_sum_bytes: int | None = None
        self.peak_bytes: list[int | None] = [None] * len(self.indices)

    def _active(self) -> bool:
        return available() and bool(self.indices)

    def sample(self) -> None:
        used = [device_used_bytes(i) for i in self.indices]
        if any(u is None for u in used):
            return
        total = sum(used)
        if self.baseline_sum_bytes is None:
            self.baseline_sum_bytes = total
        self.peak_sum_bytes = max(total, self.peak_sum_bytes or 0)
        self.peak_bytes = [max(u, p or 0) for u, p in zip(used, self.peak_bytes, strict=True)]
