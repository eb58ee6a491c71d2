"""Reserved and NVML peaks from the caching allocator itself: the cell's step is run on the meta device
(bench.model.dryrun: the real modelling code, every allocation and free in order) and its events replayed
through the allocator's rules (analysis.predict.allocator), build, first step and measured steps alike.

The NVML process peak is the largest reserved figure of any phase (nvidia-smi sees the whole process:
a QLoRA build that upcasts experts to fp32 can reserve more than any step), plus the CUDA context and the
memory outside torch by then. Results are cached, keyed by the spec and SIMULATION_VERSION: those of the
shipped rows in `simulated.jsonl` beside this file, new ones in ~/.cache/ftmem/simulated.jsonl
(FTMEM_SIMULATION_CACHE): a few seconds a cell the first time, instant after.
Imports torch only when a cell is first simulated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, replace
from functools import cache, lru_cache
from pathlib import Path

from analysis.predict.allocator import OutOfMemory, Peaks, replay
from analysis.predict.calibration import CALIBRATION
from analysis.predict.resolve import Prediction
from analysis.predict.step import cap_bytes
from bench.spec import CellSpec

#: Bump when the trace or the replay changes what they produce: cached entries of other versions are ignored.
SIMULATION_VERSION = 5
#: Likewise for cells with expandable segments (analysis.predict.allocator.ExpandableAllocator).
EXPANDABLE_VERSION = 2
#: Simulations of every shipped row's cell (scripts/simulate_rows.py writes it), read-only here.
SHIPPED = Path(__file__).with_name("simulated.jsonl")
#: Where new simulations are kept: the user's cache, not the package.
CACHE = Path(os.environ.get("FTMEM_SIMULATION_CACHE") or Path.home() / ".cache" / "ftmem" / "simulated.jsonl")


def _key(spec: CellSpec) -> str:
    fields = {k: v for k, v in spec.to_dict().items() if k not in ("profile_memory", "snapshot")}
    version = {"version": SIMULATION_VERSION}
    if spec.expandable_segments:  # its own model: a change there leaves the other cells' entries valid
        version["expandable"] = EXPANDABLE_VERSION
    text = json.dumps({"spec": fields, **version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@cache
def _cached() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in dict.fromkeys((SHIPPED, CACHE)):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: that entry is simulated again
            if _valid(entry):  # anything else (an edited or foreign line) is simulated again too
                out[entry["key"]] = entry
    return out


def _valid(entry) -> bool:
    """A cache line as `simulate` writes it: a reason the cell is not simulated, or its peaks (or the OOM)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
        return False
    if "unsupported" in entry:
        return isinstance(entry["unsupported"], str)
    if "uncapped" not in entry or not (entry["uncapped"] is None or _peaks(entry["uncapped"])):
        return False
    if entry.get("peaks") is None:
        return isinstance(entry.get("oom"), str) and entry["uncapped"] is not None
    return _peaks(entry["peaks"])


def _peaks(peaks) -> bool:
    fields = {f.name for f in dataclasses.fields(Peaks)}
    return isinstance(peaks, dict) and set(peaks) == fields and all(isinstance(v, int) for v in peaks.values())


def _store(entry: dict) -> None:
    _cached()[entry["key"]] = entry
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        torn = CACHE.exists() and CACHE.stat().st_size and not CACHE.read_bytes().endswith(b"\n")
        with CACHE.open("a") as f:  # after a torn last line (a crash mid-write), start a line of its own
            f.write(("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only install: the result still serves this process


def is_cached(spec: CellSpec) -> bool:
    return _key(spec) in _cached()


def simulate(spec: CellSpec) -> dict:
    """{'peaks': Peaks fields, 'oom': None or the phase that ran out} or {'unsupported': reason}."""
    key = _key(spec)
    if key in _cached():
        return _cached()[key]
    from bench.model.dryrun import Unsupported

    entry: dict = {"key": key, "model": spec.model}
    try:
        events = _trace(replace(spec, budget_gb=None, expandable_segments=False))  # the allocator's own settings
    except Unsupported as err:
        entry["unsupported"] = str(err)
        _store(entry)
        return entry
    except Exception as err:  # noqa: BLE001 - a refinement: the analytic answer stands, with the reason
        return {**entry, "unsupported": f"the trace failed ({type(err).__name__}: {err}); not cached"}
    cap = cap_bytes(spec)
    uncapped = asdict(replay(events, None, spec.expandable_segments))
    entry["uncapped"] = uncapped if cap is not None else None  # what the cell holds on a card without the cap
    try:
        entry["peaks"] = uncapped if cap is None else asdict(replay(events, cap, spec.expandable_segments))
        entry["oom"] = None
    except OutOfMemory as err:
        entry["peaks"], entry["oom"] = None, str(err)
    _store(entry)
    return entry


@lru_cache(maxsize=2)
def _trace(spec: CellSpec) -> list:
    """The cell's events; a budget or the allocator's settings do not change them (cells differing only by
    those share one trace)."""
    from bench.model.dryrun import trace

    return trace(spec).items


def non_torch_bytes(spec: CellSpec) -> int:
    """Kernel images and library state loaded lazily outside torch's allocator, by the end of the first step."""
    extra = CALIBRATION["nvml_int8_kernels_bytes"] if spec.method == "lora8bit" else 0
    if spec.attn_impl == "eager":
        extra -= CALIBRATION["nvml_sdpa_kernels_bytes"]
    return int(CALIBRATION["nvml_non_torch_bytes"] + extra)


def refine(pred: Prediction, spec: CellSpec) -> Prediction:
    """The prediction with allocated, reserved and NVML peaks from the simulated allocator (under the
    spec's budget, and without it for `uncapped_reserved_bytes`); unchanged but for a note where the cell
    cannot be simulated."""
    entry = simulate(spec)
    if "unsupported" in entry:
        note = f"allocator not simulated ({entry['unsupported']}): reserved and NVML from the analytic slack"
        return replace(pred, notes=(*pred.notes, note))
    context = int(CALIBRATION["cuda_context_bytes"])
    outside = non_torch_bytes(spec)
    paged = sum(v for k, v in pred.outside_allocated.items() if k.startswith("paged"))
    free = Peaks(**(entry["uncapped"] or entry["peaks"]))
    free_build, free_step = _process_reserved(free, outside)
    notes = [*pred.notes, "allocated, reserved and NVML peaks from the caching allocator's replay of the "
             "cell's allocations (build, first step, measured steps)"]
    if free_build > free_step:
        notes.append(f"the NVML peak comes from the build: it reserves {free.build_reserved} bytes, "
                     f"{free.build_reserved - free.reserved} more than the measured steps")
    common = dict(
        peak_allocated_bytes=free.allocated,
        uncapped_reserved_bytes=max(free_build, free_step) - outside,
        simulated=True,
    )
    if entry["oom"] is not None:
        cap = cap_bytes(spec) or 0
        notes.append(f"the simulated allocator runs out under the cap of {cap} bytes: {entry['oom']}")
        over = max(pred.peak_allocated_bytes, cap) + 1  # past the cap: fits_budget says no
        return replace(pred, **common, peak_reserved_bytes=cap, nvml_process_bytes=over + context,
                       outside_allocated=dict(pred.outside_allocated, non_torch_process=outside), notes=tuple(notes))
    p = Peaks(**entry["peaks"])
    build, step = _process_reserved(p, outside)
    return replace(
        pred,
        **common,
        peak_reserved_bytes=p.reserved,
        nvml_process_bytes=max(build, step) + context + paged,
        outside_allocated=dict(pred.outside_allocated, allocator_slack=p.reserved - p.allocated,
                               non_torch_process=outside),
        notes=tuple(notes),
    )


def _process_reserved(p: Peaks, outside: int) -> tuple[int, int]:
    """What the process holds outside the CUDA context at the build's peak and at the steps' peak: the
    allocator's reserved bytes, with the kernel images and library state loaded by then."""
    build = p.build_reserved + int(CALIBRATION["nvml_build_non_torch_bytes"])
    return build, max(p.first_step_reserved, p.reserved) + outside
