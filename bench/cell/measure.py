"""The measurement routine of one cell. It runs inside a fresh worker process (bench.cell.worker).

On CUDA, in order:
1. NVML device baseline, then the CUDA context alone: `context_bytes` is NVML's figure for this
   process before any tensor exists (the device delta where the driver hides per-process figures).
2. The budget, if any: the caching allocator is capped at budget - context bytes with
   torch.cuda.set_per_process_memory_fraction, so the budget means what nvidia-smi would show.
3. Build the model (peaks reset before; the build peak recorded).
4. The first optimizer step (its own peak), then the other warm-up steps.
5. gc.collect, empty_cache, synchronize, reset peaks; the measured steps, each timed.
An NVML thread samples the process's and the device's memory through all of it.
On CPU the same steps run and the process's peak RSS stands in for the CUDA figures.
An OOM is data: the row says in which phase, what was asked for and what was in use.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import signal
import statistics
import sys
import time
from typing import Any

import psutil
import torch

from bench.cards import gib
from bench.cell import nvml, profile
from bench.model import build, moe, train
from bench.spec import CellSpec

_OOM_SIZE = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)")
_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}
#: Where the allocated peak up to an OOM goes: the field of the phase that failed.
_PHASE_PEAK_FIELD = {
    "build": "build_peak_allocated_bytes",
    "first_step": "first_step_peak_allocated_bytes",
    "steady": "peak_allocated_bytes",
}


class Unavailable(RuntimeError):
    """The cell asks for a feature this machine lacks (flash-attn, liger-kernel, bitsandbytes)."""


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def oom_requested_bytes(message: str) -> int | None:
    match = _OOM_SIZE.search(message)
    return None if match is None else int(float(match.group(1)) * _UNITS[match.group(2)])


def allocator_settings(conf: str) -> None:
    """Set the caching allocator's options for this process, as PYTORCH_CUDA_ALLOC_CONF would at start:
    the variable for anything that reads it later, and torch's setter, since a cell forked from the
    preloaded server imported torch before the spec was known."""
    own = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    conf = f"{own},{conf}" if own else conf
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    torch.cuda.memory._set_allocator_settings(conf)


class StartupClock:
    """Seconds from the process's creation to each start-up milestone: where a cell's overhead goes."""

    def __init__(self, echo: bool = False):
        self._last = psutil.Process().create_time()
        self.seconds: dict[str, float] = {}
        self.echo = echo  # print each milestone (a multi-GPU rank's log shows where a timeout struck)

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = now - self._last
        self._last = now
        if self.echo:
            print(f"ftmem: {name} done after {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)


class CellRun:
    """State of one cell's measurement; `values` collects the result fields as they are measured."""

    def __init__(self, spec: CellSpec):
        self.spec = spec
        # An explicit index: the budget and peak APIs need one ("cuda" means the first visible device).
        self.device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device(spec.device)
        self.cuda = self.device.type == "cuda"
        self.phase = "setup"
        # The cap the cell runs under (null without one), recorded whatever the outcome.
        self.values: dict[str, Any] = {"budget_bytes": spec.budget_bytes}
        self.profiler: profile.CellProfiler | None = None  # profile_memory / snapshot (bench.cell.profile)
        self.clock = StartupClock()

    # -- phases ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.clock.lap("interpreter_and_imports")
        missing = build.unavailable_features(self.spec)
        if missing:
            self.values["unavailable"] = missing
            raise Unavailable(f"not available on this machine: {', '.join(missing)}")
        torch.manual_seed(self.spec.seed)
        if self.cuda:
            self._cuda_context_and_budget()
        else:
            self.values["baseline_rss_bytes"] = psutil.Process().memory_info().rss
        self.clock.lap("cuda_context")
        self.profiler = profile.for_cell(self.spec, self.device)
        if self.profiler is not None:  # the allocator's history from the build on
            self.profiler.record_history()
        model = self._build()
        self.clock.lap("build")
        self._train(model)
        return self.values

    def _cuda_context_and_budget(self) -> None:
        if self.spec.expandable_segments:
            allocator_settings("expandable_segments:True")
        before = nvml.device_used_bytes()
        torch.cuda.set_device(self.device)
        torch.cuda.synchronize()
        time.sleep(0.05)
        process = nvml.process_used_bytes()
        after = nvml.device_used_bytes()
        device_delta = None if before is None or after is None else after - before
        self.values["nvml_baseline_device_bytes"] = before
        self.values["context_bytes"] = process if process is not None else device_delta
        budget = self.spec.budget_bytes
        if budget is not None:
            self._cap(budget)

    def _cap(self, budget: int) -> None:
        """Cap the allocator at the budget less the context. A budget of the card's own size (its
        nvidia-smi total, which torch's total_memory undercounts) leaves the card uncapped."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        card = nvml.device_info().get("total_bytes") or total
        cap = budget - (self.values["context_bytes"] or 0)
        if cap <= 0 or budget > card:
            raise ValueError(
                f"budget_gb: {budget} bytes ({gib(budget):.2f} GiB) cannot be emulated on this card "
                f"of {card} bytes ({gib(card):.2f} GiB): allowed is at most the card's size"
            )
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device)

    def _build(self):
        self.phase = "build"
        self._fault()
        self._reset_peaks()
        start = time.perf_counter()
        model = self._build_model()
        self._sync()
        self.values["build_time_s"] = time.perf_counter() - start
        if self.cuda:
            self.values["build_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self.values["build_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        self.values.update(build.model_state(model))
        config = getattr(model, "config", None)
        self.values["attn_impl_used"] = getattr(config, "_attn_implementation", None)
        return model

    def _train(self, model) -> None:
        spec = self.spec
        batches = train.make_batches(spec, model.config.vocab_size, self.device)
        optimizer, stepper = self._training(model)
        if self.profiler is not None:  # warm-up steps and the first measured step
            self.profiler.start(stepper)

        self.phase = "first_step"
        self._fault()
        self._reset_peaks()
        self.clock.lap("training_setup")
        self.values["startup_breakdown_s"] = dict(self.clock.seconds)
        self.values["startup_to_first_step_s"] = sum(self.clock.seconds.values())
        counter = moe.RoutingCounter(model) if moe.routers(model) else None
        self.values["first_step_time_s"] = self._timed(stepper, batches)
        if counter is not None:  # counted in the warm-up step, outside the measured ones
            self.values.update(moe.routing_fields(model, counter.close()))
        if self.cuda:
            self.values["first_step_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self.values["first_step_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        for _ in range(spec.warmup_steps - 1):
            self._timed(stepper, batches)

        self.phase = "steady"
        self._fault()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        self._reset_peaks()
        times = [self._timed(stepper, batches)]
        if self.profiler is not None:
            self.profiler.stop()
        times += [self._timed(stepper, batches) for _ in range(spec.steps - 1)]
        if self.cuda:
            self.values["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self.values["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        median = statistics.median(times)
        self.values.update(
            step_times_s=times,
            step_time_s=median,
            tokens_per_s=spec.tokens_per_step / median,
            final_loss=stepper.last_loss,
            optimizer_state_bytes=build.optimizer_state_bytes(optimizer),
        )
        if self.profiler is not None:  # analysed after the measured steps, outside their timing
            self.values.update(self.profiler.results())

    # -- helpers -----------------------------------------------------------------------------
    def _build_model(self):
        """The model of the build phase (bench.multigpu.dist.RankCellRun builds ZeRO-3 models partitioned)."""
        stages = build.BuildStages(self.device)
        model = build.build_model(self.spec, self.device, stages)
        self.values["build_breakdown_s"] = stages.seconds
        return model

    def _training(self, model) -> tuple[Any, train.Stepper]:
        """(optimizer, stepper) of the training phases; bench.multigpu.dist wraps the model first (DDP, FSDP2, DeepSpeed)."""
        optimizer = train.make_optimizer(self.spec, model)
        return optimizer, train.Stepper(self.spec, model, optimizer, self.device)

    def _fault(self) -> None:
        """Test hook: FTMEM_TEST_FAULT=<kind>:<phase> fails this phase (oom, error, hang, crash, or
        cudainit: only in a forked cell)."""
        kind, _, phase = os.environ.get("FTMEM_TEST_FAULT", "").partition(":")
        only_rank = os.environ.get("FTMEM_TEST_FAULT_RANK")  # multi-GPU cells: fail this rank only
        if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
            return
        if phase != self.phase:
            return
        if kind == "oom":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected by FTMEM_TEST_FAULT)"
            )
        if kind == "error":
            raise RuntimeError("injected failure (FTMEM_TEST_FAULT)")
        if kind == "hang":
            time.sleep(3600)
        if kind == "crash":  # as the kernel's OOM killer or a segfault would end it
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "cudainit" and os.environ.get("FTMEM_FORKED") == "1":  # a fork server that touched CUDA
            raise RuntimeError("CUDA error: initialization error (injected by FTMEM_TEST_FAULT)")

    def _timed(self, stepper: train.Stepper, batches) -> float:
        self._sync()
        start = time.perf_counter()
        stepper.step(batches)
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _reset_peaks(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def record_oom(self, exc: BaseException) -> None:
        self.values["oom_phase"] = self.phase
        if self.profiler is not None:  # the allocator snapshot up to the OOM, if recording
            self.values.update(self.profiler.on_failure())
        self.values["oom_requested_bytes"] = oom_requested_bytes(str(exc))
        if self.cuda:
            self.values["oom_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            self.values["oom_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            peak_field = _PHASE_PEAK_FIELD.get(self.phase)
            if peak_field is not None:
                self.values[peak_field] = torch.cuda.max_memory_allocated(self.device)
        if self.spec.budget_bytes is not None:
            self.values["fits_budget"] = False

    def finish(self, status: str, nvml_peak_process_bytes: int | None) -> None:
        """CPU: the peak RSS. Under a budget: the verdict, which NVML must confirm.

        The allocator cap leaves out memory allocated outside torch after the context baseline
        (lazily loaded kernels, library handles); NVML sees it, as a real card's limit would.
        """
        if not self.cuda:
            self.values["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        budget = self.spec.budget_bytes
        if budget is not None and status == "ok":
            over = nvml_peak_process_bytes is not None and nvml_peak_process_bytes > budget
            self.values["fits_budget"] = not over


def measure(spec: CellSpec, cell_class: type[CellRun] = CellRun) -> tuple[str, str | None, dict[str, Any]]:
    """Run the cell; return (status, error message, measured values). Never raises for a cell failure."""
    cell = cell_class(spec)  # bench.multigpu.dist.RankCellRun for a rank of a multi-GPU cell
    status, error = "ok", None
    with nvml.PeakSampler() as sampler:
        try:
            cell.run()
        except Exception as exc:  # a failed cell is a row, not a crash
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if is_oom(exc):
                status = "oom"
                cell.record_oom(exc)
            else:
                status = "error"
            del exc
    cell.finish(status, sampler.peak_process_bytes)
    cell.values["nvml_peak_process_bytes"] = sampler.peak_process_bytes
    cell.values["nvml_peak_device_bytes"] = sampler.peak_device_bytes
    return status, error, cell.values
