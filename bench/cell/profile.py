"""Where the memory goes (issue 8): torch's memory profiler over the warm-up steps and the first
measured step of a cell, and on CUDA the caching allocator's snapshot.

`profile_memory`: `torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)`
runs from the first warm-up step to the end of the first measured step. Afterwards its memory
profile (`prof._memory_profile()`, torch.profiler._memory_profiler) gives every tensor allocation
and free on the cell's device with a category (parameter, gradient, optimizer state, activation,
temporary, input, autograd detail, or unknown). bench.model.train.Stepper marks its parts with
record_function ranges (`ftmem::step`, `ftmem::forward`, `ftmem::backward`, `ftmem::optimizer_step`,
`ftmem::zero_grad`); their start and end times (the profiler's clock, as the timeline's) say in which
step and which part the peak fell. The timeline is written as compact JSON beside the results
(bench.cell.artifacts); the row gets the categories at the peak, the peak, its phase and step.

Where torch's profiler gives no useful category, bench.cell.profile places the tensor itself (`placement`),
in columns of their own (PLACED), and the row says how many bytes at the peak that was
(`profile_by_lifetime_bytes`). That is every tensor it left unknown, filed as an input (a value
that depends on no gradient) or as autograd detail (a gradient of an activation):
- a storage of the model's own state (a parameter, buffer or bitsandbytes quantization constant,
  listed when profiling starts) that lives to the end of the profile: `parameters`. QLoRA's frozen
  4-bit weights and their absmax are "inputs" to torch (an H200, torch 2.11, Qwen3-14B: about 7.4 GB);
- made in a step's forward and freed in that step's backward: `activations` (what autograd keeps for
  backward; on CUDA torch left most of them unknown: 25 of 54 GiB of a 14B LoRA peak);
- made and freed within one part of a step: `temporaries` (e.g. the two fp32 logit-sized gradients
  of the cross-entropy's backward, torch's autograd detail: 2.49 GB at the 14B LoRA/QLoRA peaks);
- anything else keeps torch's label and counts as `other`: the token batch (made once, used by every
  step), allocations that hold no tensor (cuBLAS workspaces, 32 MiB per thread), and values that
  outlive their step or part.

What the profiler counts: the bytes of the allocations on the device (tensors' storages, and on CUDA
also allocator blocks that hold no tensor, such as cuBLAS workspaces; no allocator rounding, no cached
blocks), so its peak sits at or below max_memory_allocated. Tensors made before profiling started
count from the first time an op uses them (parameters, optimizer state), with the profile's start as
their time.

`snapshot` (CUDA only): torch.cuda.memory._record_memory_history from before the build to the end of the
first measured step, then
torch.cuda.memory._dump_snapshot: a pickle to drop on https://pytorch.org/memory_viz. A cell that
runs out of memory while recording still dumps it.

Both cost memory and time (host memory for the event buffers; the step times of the profiled steps
grow); the row's peaks are measured as without them, and a profiled cell is a cell of its own
(profile_memory and snapshot are spec fields) so the report can set the two side by side.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import torch

from bench.cell import artifacts
from bench.spec import CellSpec

TIMELINE_FORMAT = "ftmem-memory-timeline/1"
#: The profiler's categories, in the timeline's column order (None: an allocation it could not place).
CATEGORY_NAMES = {
    "PARAMETER": "parameters",
    "GRADIENT": "gradients",
    "OPTIMIZER_STATE": "optimizer_state",
    "ACTIVATION": "activations",
    "TEMPORARY": "temporaries",
    "AUTOGRAD_DETAIL": "autograd_detail",
    "INPUT": "inputs",
    None: "unknown",
}
#: Tensors torch's profiler left in OTHER, placed by their lifetime (`lifetime_category`).
BY_LIFETIME = {"activations": "activations_by_lifetime", "temporaries": "temporaries_by_lifetime"}
#: All that bench.cell.profile places itself (`placement`): the model's own state by storage, the rest by lifetime.
PLACED = {"parameters": "parameters_by_storage", **BY_LIFETIME}
TIMELINE_CATEGORIES = tuple(CATEGORY_NAMES.values()) + tuple(PLACED.values())
#: The row's categories: the first five as the profiler has them (with those PLACED), the rest
#: (what torch files as autograd detail, inputs or unknown and `placement` could not place) as `other`.
ROW_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "other")
OTHER = ("autograd_detail", "inputs", "unknown")
PHASES = ("forward", "backward", "optimizer_step", "zero_grad")
MARK_PREFIX = "ftmem::"
#: Points kept in the timeline file; each bucket keeps its highest point, so the peak survives.
MAX_POINTS = 4000


def row_categories(by_category: dict[str, int]) -> dict[str, int]:
    """Timeline categories -> the row's six (inputs, autograd_detail and unknown as `other`)."""
    out = {name: int(by_category.get(name, 0)) for name in ROW_CATEGORIES[:-1]}
    for name, placed in PLACED.items():
        out[name] += int(by_category.get(placed, 0))
    out["other"] = int(sum(by_category.get(name, 0) for name in OTHER))
    return out


class CellProfiler:
    """Profiles one cell's warm-up steps and first measured step; see the module docstring."""

    def __init__(self, spec: CellSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.warmup = max(1, spec.warmup_steps)  # the first step always runs, as in bench.cell.measure
        self.prof: torch.profiler.profile | None = None
        self.model_storages: frozenset[int] = frozenset()
        self.recording_history = False
        self.steps = 0
        self.values: dict[str, Any] = {}

    # -- during the steps ---------------------------------------------------------------------
    def record_history(self) -> None:
        """Before the build: the snapshot's trace then holds every segment the process reserves (the build's
        upcasts and the cache emptied after them too), so a replay needs no guess at its start."""
        if self.spec.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self.recording_history = True

    def start(self, stepper) -> None:
        if self.spec.profile_memory:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities, profile_memory=True, record_shapes=True, with_stack=True
            )
            self.model_storages = model_storages(stepper.model)
            self.prof.start()
            stepper.marker = self.mark
        self.stepper = stepper

    def mark(self, name: str):
        if name == "step":
            self.steps += 1
            label = f"warmup {self.steps}" if self.steps <= self.warmup else "measured 1"
            return torch.profiler.record_function(f"{MARK_PREFIX}step:{label}")
        return torch.profiler.record_function(MARK_PREFIX + name)

    def stop(self) -> None:
        """After the first measured step: stop recording (analysis waits for `results`)."""
        self.stepper.marker = None
        if self.prof is not None:
            self.prof.stop()
        self._dump_snapshot()

    def on_failure(self) -> dict[str, Any]:
        """A cell that failed (OOM) mid-profile: the snapshot up to the failure, if recording."""
        with contextlib.suppress(Exception):
            if self.prof is not None:
                self.prof.stop()
        with contextlib.suppress(Exception):
            self._dump_snapshot()
        return dict(self.values)

    def _dump_snapshot(self) -> None:
        if not self.recording_history:
            return
        path = artifacts.artifact_path(".snapshot.pickle", self.spec.cell_id)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording_history = False
        self.values["snapshot_file"] = str(path)

    # -- afterwards ------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        """The row's profile fields; writes the timeline file."""
        if self.prof is None:
            return dict(self.values)
        start = time.perf_counter()
        timeline = build_timeline(self.prof, self.device, model_ptrs=self.model_storages)
        timeline.update(cell_id=self.spec.cell_id, spec=self.spec.to_dict())
        path = artifacts.artifact_path(".timeline.json", self.spec.cell_id)
        path.write_text(json.dumps(timeline, separators=(",", ":")))
        peak = timeline["peak"]
        self.values.update(
            profile_peak_bytes=peak["total"],
            profile_categories_bytes=row_categories(peak["categories"]),
            profile_by_lifetime_bytes=sum(peak["categories"].get(c, 0) for c in PLACED.values()),
            profile_peak_phase=peak["phase"],
            profile_peak_step=peak["step"],
            profile_timeline_file=str(path),
            profile_analysis_s=time.perf_counter() - start,
        )
        self.prof = None
        return dict(self.values)


def _name(node) -> str | None:
    try:
        return node.name
    except UnicodeDecodeError:  # some events' names do not decode (seen on torch 2.13, CPU)
        return None


def markers(memory_profile) -> list[dict[str, Any]]:
    """The record_function ranges of bench.model.train.Stepper: name, step label, start and end (ns)."""
    found = []
    for node in memory_profile._op_tree.sorted_nodes:
        name = _name(node)
        if name and name.startswith(MARK_PREFIX):
            found.append(
                {"name": name[len(MARK_PREFIX) :], "start": node.start_time_ns, "end": node.end_time_ns}
            )
    steps = [m for m in found if m["name"].startswith("step:")]
    for m in found:
        inside = [s for s in steps if s["start"] <= m["start"] <= s["end"]]
        m["step"] = inside[0]["name"].removeprefix("step:") if inside else None
    return found


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def model_storages(model: torch.nn.Module) -> frozenset[int]:
    """Data pointers of the storages of the model's own state: parameters, buffers and the tensors
    bitsandbytes hangs on a quantized parameter (Params4bit.quant_state with its nested state,
    Int8Params.CB/SCB). Torch's profiler files frozen 4-bit weights as inputs; these pointers say
    they are parameters."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        tensors += [
            t for t in (getattr(p, "CB", None), getattr(p, "SCB", None)) if isinstance(t, torch.Tensor)
        ]
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return frozenset(ptr for t in tensors if (ptr := _storage_ptr(t)))


def _storage_ptr(tensor: torch.Tensor) -> int:
    """The data pointer of a tensor's storage (a DTensor's local shard); 0 where there is none."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    try:
        return local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta tensors, tensor subclasses without storage
        return 0


def lifetime_category(created: int, destroyed: int | None, marks: list[dict[str, Any]]) -> str | None:
    """Where torch's profiler gives a tensor no useful category, its lifetime does: made in a step's
    forward and freed in that step's backward is what autograd keeps for backward (`activations`);
    made and freed within one part of a step is `temporaries`; anything else None."""
    if destroyed is None:
        return None
    made_phase, made_step = where(created, marks)
    freed_phase, freed_step = where(destroyed, marks)
    if made_step is None or made_step != freed_step:
        return None
    if made_phase == "forward" and freed_phase == "backward":
        return BY_LIFETIME["activations"]
    if made_phase == freed_phase and made_phase in PHASES:
        return BY_LIFETIME["temporaries"]
    return None


def _holds_no_tensor(key) -> bool:
    """torch's plain Key (device only, no TensorKey): an allocation with no tensor, such as a cuBLAS
    workspace. All of a device's share one key, so they have no lifetime of their own."""
    from torch.profiler._memory_profiler import Key, TensorKey

    return isinstance(key, Key) and not isinstance(key, TensorKey)


def placement(
    key, made: dict, freed: dict, marks: list[dict[str, Any]], model_ptrs: frozenset[int]
) -> str | None:
    """The PLACED column of a tensor torch's profiler left in OTHER, or None to keep torch's label.

    Model state (its storage among `model_ptrs`, never freed while profiled): `parameters`; else by
    lifetime (lifetime_category)."""
    if _holds_no_tensor(key):
        return None
    storage = getattr(key, "storage", None)
    if key not in freed and getattr(storage, "ptr", None) in model_ptrs:
        return PLACED["parameters"]
    created = made.get(key)
    return None if created is None or not marks else lifetime_category(created, freed.get(key), marks)


def _lifetimes(events, device: torch.device) -> tuple[dict, dict]:
    """(first creation time, destruction time) in ns of each tensor key on `device`."""
    from torch.profiler._memory_profiler import Action

    made: dict = {}
    freed: dict = {}
    for t, action, (key, _), _ in events:
        if not _same_device(key.device, device):
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            made.setdefault(key, t)
        elif action == Action.DESTROY:
            freed[key] = t
    return made, freed


def coalesce(
    memory_timeline,
    device: torch.device,
    marks: list[dict[str, Any]] | None = None,
    model_ptrs: frozenset[int] = frozenset(),
) -> tuple[list[int], list[list[int]]]:
    """(times ns, bytes per TIMELINE_CATEGORIES after all events at that time) for one device.

    As torch's MemoryProfileTimeline._coalesce_timeline, but in ns, with named columns (torch's own
    puts its columns one place to the right of its category index). Tensors torch left in OTHER are
    placed by `placement` (model state by `model_ptrs`, the rest by lifetime where `marks` are
    given), in columns of their own."""
    from torch.profiler._memory_profiler import Action, TensorKey

    column = {name: i for i, name in enumerate(TIMELINE_CATEGORIES)}
    made, freed = _lifetimes(memory_timeline.timeline, device)
    placed: dict = {}
    times: list[int] = []
    sizes: list[list[int]] = []
    current = [0] * len(column)
    t_first = min((t for t, *_ in memory_timeline.timeline if t > 0), default=0)

    def col(key, version) -> int:
        category = memory_timeline.categories.get(key, version) if isinstance(key, TensorKey) else None
        name = CATEGORY_NAMES.get(category.name if category is not None else None, "unknown")
        if name not in OTHER:
            return column[name]
        if key not in placed:
            placed[key] = placement(key, made, freed, marks or [], model_ptrs)
        return column[placed[key] or name]

    for t, action, (key, version), numbytes in memory_timeline.timeline:
        if not _same_device(key.device, device):
            continue
        t = t_first if t < 0 else t
        if times and t != times[-1]:
            sizes.append(current.copy())
        elif times:
            times.pop()
        times.append(t)
        if action in (Action.PREEXISTING, Action.CREATE):
            current[col(key, version)] += numbytes
        elif action == Action.INCREMENT_VERSION:
            current[col(key, version)] -= numbytes
            current[col(key, version + 1)] += numbytes
        elif action == Action.DESTROY:
            current[col(key, version)] -= numbytes
    if times:
        sizes.append(current.copy())
    return times, sizes


def _downsample(times: list[int], sizes: list[list[int]], limit: int) -> list[int]:
    """Indices to keep: every point if few, else the highest point of each of `limit` buckets."""
    if len(times) <= limit:
        return list(range(len(times)))
    totals = [sum(s) for s in sizes]
    edges = [round(i * len(times) / limit) for i in range(limit + 1)]
    keep = [max(range(a, b), key=totals.__getitem__) for a, b in zip(edges, edges[1:], strict=False) if b > a]
    return sorted(set(keep + [0, len(times) - 1]))


def where(t: int, marks: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(phase, step) of time t: the innermost marker range holding it."""
    phase = next((m for m in marks if m["name"] in PHASES and m["start"] <= t <= m["end"]), None)
    if phase is not None:
        return phase["name"], phase["step"]
    step = next((m for m in marks if m["name"].startswith("step:") and m["start"] <= t <= m["end"]), None)
    return "other", (step["name"].removeprefix("step:") if step else None)


def build_timeline(
    prof, device: torch.device, limit: int = MAX_POINTS, model_ptrs: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """The compact timeline of a stopped profiler: points, markers, the peak and per-step peaks.

    Times are seconds from the first event; bytes per category in TIMELINE_CATEGORIES order;
    `model_ptrs` (model_storages) place the model's own state that torch left in OTHER."""
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    memory_profile = prof._memory_profile()
    marks = markers(memory_profile)
    times, sizes = coalesce(MemoryProfileTimeline(memory_profile), device, marks, model_ptrs)
    if not times:
        raise RuntimeError(f"the memory profiler saw no tensor on {device}")
    t0 = times[0]
    totals = [sum(s) for s in sizes]
    peak_i = max(range(len(times)), key=totals.__getitem__)
    phase, step = where(times[peak_i], marks)

    def seconds(t: int) -> float:
        return round((t - t0) / 1e9, 9)

    step_peaks = []
    for m in (m for m in marks if m["name"].startswith("step:")):
        inside = [i for i, t in enumerate(times) if m["start"] <= t <= m["end"]]
        if inside:
            i = max(inside, key=totals.__getitem__)
            step_peaks.append(
                {
                    "step": m["name"].removeprefix("step:"),
                    "t": seconds(times[i]),
                    "total": totals[i],
                    "phase": where(times[i], marks)[0],
                }
            )
    keep = _downsample(times, sizes, limit)
    return {
        "format": TIMELINE_FORMAT,
        "device": str(device),
        "torch": torch.__version__,
        "units": {"t": "seconds from the first profiled event", "bytes": "bytes"},
        "categories": list(TIMELINE_CATEGORIES),
        "t": [seconds(times[i]) for i in keep],
        "bytes": [sizes[i] for i in keep],
        "points_total": len(times),
        "markers": [
            {"name": m["name"], "step": m["step"], "start": seconds(m["start"]), "end": seconds(m["end"])}
            for m in marks
        ],
        "peak": {
            "t": seconds(times[peak_i]),
            "total": totals[peak_i],
            "categories": dict(zip(TIMELINE_CATEGORIES, sizes[peak_i], strict=True)),
            "phase": phase,
            "step": step,
        },
        "category_max": {name: max(s[j] for s in sizes) for j, name in enumerate(TIMELINE_CATEGORIES)},
        "step_peaks": step_peaks,
    }


def for_cell(spec: CellSpec, device: torch.device) -> CellProfiler | None:
    """A profiler when the spec asks for one (profile_memory or snapshot), else None."""
    if not (spec.profile_memory or spec.snapshot):
        return None
    return CellProfiler(spec, device)
