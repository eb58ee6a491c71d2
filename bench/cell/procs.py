"""The runner's child processes: they die with the runner, and a timeout or an interrupt kills them.

Each cell runs in a session of its own, so that a timeout can kill everything it started (compile
workers, torchrun's ranks). Two things keep a cell from outliving the sweep that started it: the
child asks the kernel for SIGKILL when its parent dies (kill -9 of the runner included), and the
runner kills the child's whole tree when it is interrupted (Ctrl-C, SIGTERM from `timeout` or a
scheduler). A cell left running would hold GPU memory under the next cell's measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.cell.nvml import Sampling

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "FTMEM_PARENT_PID"


def die_with_parent(check_env: bool = True) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies. With `check_env`, exit at
    once if the parent named in FTMEM_PARENT_PID died before the request took effect."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return
    parent = os.environ.get(PARENT_ENV)
    if check_env and parent and parent.isdigit() and os.getppid() != int(parent):
        os._exit(1)


def parent_env() -> dict[str, str]:
    """Environment entries that let a child check its parent (die_with_parent)."""
    return {PARENT_ENV: str(os.getpid())}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every descendant (each may have a session of its own)."""
    import psutil

    tree = kill_pid_tree(proc.pid)
    proc.wait()
    psutil.wait_procs(tree, timeout=10)


def kill_pid_tree(pid: int) -> list:
    """SIGKILL process `pid`, its process group and its descendants; returns the descendants.

    A group is killed only when it is not this process's own: a cell caught before it starts its own
    session (a forked cell killed in its first instant) still shares the runner's group, and killing that
    group would kill the runner and whatever started it (a shell, a test runner)."""
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        tree = []
    own = os.getpgrp()
    for each in [pid] + [p.pid for p in tree]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(each)
            if group != own:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, signal.SIGKILL)
    return tree


def wait_or_kill_tree(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for `proc`; on timeout kill its tree and return True. On an interrupt (KeyboardInterrupt,
    SystemExit from a signal handler) kill its tree and re-raise."""
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return True
    except BaseException:
        kill_tree(proc)
        raise


def terminate_as_interrupt() -> None:
    """Make SIGTERM (timeout, Slurm, docker stop) interrupt the runner as Ctrl-C does."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def bytecode_cache_env(child: dict[str, str]) -> dict[str, str]:
    """Keep Python's bytecode cache for the cells, where the parent's Python would not write one.

    Every cell is a fresh interpreter that imports torch, transformers and peft: some 3000 modules.
    Where Python writes no bytecode cache (PYTHONDONTWRITEBYTECODE, a read-only site-packages, as on
    some GPU images) each cell compiles them all again: measured 10 s and more per cell on an H200
    host. The cells then share a cache under FTMEM_PYCACHE (default ~/.cache/ftmem/pycache).
    """
    if child.get("PYTHONPYCACHEPREFIX") or not _bytecode_cache_off(child):
        return child
    cache = child.get("FTMEM_PYCACHE") or os.path.join(
        child.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ftmem", "pycache"
    )
    child = {k: v for k, v in child.items() if k != "PYTHONDONTWRITEBYTECODE"}
    child["PYTHONPYCACHEPREFIX"] = cache
    return child


#: What every cell imports before it measures (bench.model.build imports the rest by method).
WARM_IMPORTS = "import bench.cell.measure, transformers.models.qwen3.modeling_qwen3, peft"


def warm_bytecode_cache(child: dict[str, str], timeout_s: float = 600.0) -> float | None:
    """Fill an empty ftmem bytecode cache (bytecode_cache_env) once, before the first cell, so that
    no cell's start-up time includes compiling its imports. Returns the seconds it took, or None when
    there was nothing to do (no cache of ftmem's own, or one already filled)."""
    cache = child.get("PYTHONPYCACHEPREFIX")
    if cache is None or cache == os.environ.get("PYTHONPYCACHEPREFIX"):
        return None  # Python's own cache (or the user's prefix) is in use
    if os.path.isdir(cache) and any(os.scandir(cache)):
        return None
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", WARM_IMPORTS],
        env=child,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=timeout_s,
        check=False,
    )
    return time.monotonic() - start


def _bytecode_cache_off(child: dict[str, str]) -> bool:
    if child.get("PYTHONDONTWRITEBYTECODE"):
        return True
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    package = os.path.dirname(spec.origin)
    cache = os.path.join(package, "__pycache__")
    return not (os.access(cache, os.W_OK) if os.path.isdir(cache) else os.access(package, os.W_OK))


class HostMemorySampler(Sampling):
    """Host memory of a process tree while a `with` block runs, sampled every `interval_s` in a thread:
    the peak of the tree's summed resident set size (pinned and page-locked buffers included) and the
    lowest memory the system had available. A cell with CPU offload can exhaust the host, not the GPU."""

    def __init__(self, interval_s: float = 0.1):
        import psutil

        self.interval_s = interval_s
        self.pid: int | None = None
        self.peak_tree_rss_bytes: int | None = None
        self.min_available_bytes: int | None = None
        self.total_bytes = psutil.virtual_memory().total

    def _active(self) -> bool:
        return True  # host memory, with or without an NVIDIA driver

    def watch(self, pid: int) -> None:
        self.pid = pid

    def sample(self) -> None:
        import psutil

        available = psutil.virtual_memory().available
        if self.min_available_bytes is None or available < self.min_available_bytes:
            self.min_available_bytes = available
        if self.pid is None:
            return
        rss = 0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
        if rss:
            self.peak_tree_rss_bytes = max(rss, self.peak_tree_rss_bytes or 0)


def cell_env() -> dict[str, str]:
    """The environment of a cell's process: this one's, with ftmem importable, offline, and a
    bytecode cache where Python keeps none (bytecode_cache_env)."""
    child = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    child["PYTHONPATH"] = os.pathsep.join(p for p in (root, child.get("PYTHONPATH")) if p)
    child.setdefault("TOKENIZERS_PARALLELISM", "false")
    child.setdefault("HF_HUB_OFFLINE", "1")
    return bytecode_cache_env(child)
