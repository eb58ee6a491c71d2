"""The caching allocator's simulation (analysis.predict.allocator): its rules one by one, and replays of
the allocator's own traces recorded on an H200 (results/nvidia-h200-x1/allocator.artifacts)."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import pytest

from analysis.predict.allocator import (
    MIB,
    CachingAllocator,
    OutOfMemory,
    replay,
    replay_snapshot,
    round_size,
    segment_size,
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "results" / "nvidia-h200-x1" / "allocator.artifacts"


def test_requests_round_to_512_bytes_and_segments_follow_the_size_classes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert segment_size(MIB) == 2 * MIB  # small pool: 2 MiB segments
    assert segment_size(MIB + 512) == 20 * MIB  # under 10 MiB: 20 MiB segments
    assert segment_size(10 * MIB) == 10 * MIB and segment_size(11 * MIB + 1) == 12 * MIB


def test_small_requests_share_a_segment_and_large_ones_split_only_beyond_one_mib():
    sim = CachingAllocator()
    a, b = sim.malloc(1000), sim.malloc(1000)
    assert sim.reserved == 2 * MIB and a.addr != b.addr
    big = sim.malloc(100 * MIB)
    sim.free(big)
    exact = sim.malloc(99 * MIB + 512 * 1024)  # the rest (0.5 MiB) is not worth a block: not split
    assert exact.size == 100 * MIB and sim.reserved == 102 * MIB
    sim.free(exact)
    part = sim.malloc(60 * MIB)  # the rest (40 MiB) stays cached as a block of its own
    assert part.size == 60 * MIB
    rest = sim.malloc(40 * MIB)
    assert sim.reserved == 102 * MIB and rest.addr == part.addr + 60 * MIB


def test_best_fit_merging_and_empty_cache():
    sim = CachingAllocator()
    x, y = sim.malloc(30 * MIB), sim.malloc(50 * MIB)
    sim.free(x)
    z = sim.malloc(40 * MIB)  # 30 MiB cached is too small: a new segment
    assert sim.reserved == 120 * MIB
    sim.free(y)
    sim.free(z)
    sim.empty_cache()
    assert sim.reserved == 0 and sim.allocated == 0 and sim.peak_reserved == 120 * MIB


def test_a_full_cap_releases_cached_segments_before_it_runs_out():
    sim = CachingAllocator(cap=100 * MIB)
    a = sim.malloc(60 * MIB)
    sim.free(a)
    b = sim.malloc(80 * MIB)  # 60 MiB cached does not hold it; at the cap it is released and retried
    assert b.size == 80 * MIB and sim.reserved == 80 * MIB
    with pytest.raises(OutOfMemory):
        sim.malloc(30 * MIB)


def test_replay_reports_each_phase_and_empties_the_cache_where_the_harness_does():
    events = [("alloc", 1, 50 * MIB), ("mark", "build_end", 0), ("alloc", 2, 30 * MIB), ("free", 2, 0),
              ("mark", "first_step_end", 0), ("mark", "empty_cache", 0), ("mark", "measured_start", 0),
              ("alloc", 3, 10 * MIB)]
    peaks = replay(events)
    assert (peaks.build_reserved, peaks.first_step_reserved) == (50 * MIB, 80 * MIB)
    assert peaks.reserved == 60 * MIB and peaks.allocated == 60 * MIB


def _snapshots():
    return sorted(ARTIFACTS.glob("*.snapshot.pickle.gz"))


def _load(path):
    with gzip.open(path, "rb") as f:
        return pickle.load(f)


def _traces(sweep: str, keep) -> list:
    """The shipped snapshots of results/nvidia-h200-x1/<sweep>.jsonl rows that `keep` selects."""
    rows = [json.loads(line) for line in (ARTIFACTS.parent / f"{sweep}.jsonl").read_text().splitlines()]
    ids = {r["cell_id"] for r in rows if keep(r)}
    return sorted(p for p in (ARTIFACTS.parent / f"{sweep}.artifacts").glob("*.snapshot.pickle.gz") if p.name[:16] in ids)


#: Session 7's traces, recorded from before the build, of the cells that ran without a budget.
FROM_BUILD = _traces("allocator-trace", lambda r: not r["spec"].get("budget_gb"))


@pytest.mark.parametrize(
    "path, tolerance",
    [(p, 0.001) for p in _snapshots()] + [(p, 0.0005) for p in FROM_BUILD],
    ids=lambda v: v.name[:16] if isinstance(v, Path) else str(v),
)
def test_replaying_a_recorded_gpu_trace_reproduces_its_reserved_peak(path, tolerance):
    """Llama 3.2 1B full, Gemma 3 1B eager LoRA, Qwen3-1.7B QLoRA, Qwen1.5-MoE QLoRA (within 0.1%), and from
    the build on, OLMo 2 7B eager at 4096 and Qwen3-14B LoRA eager at 8192 (95.7 GB reserved in its first
    step; peft's and the harness's empty_cache included, within 0.05%): with the segments where cudaMalloc
    put them, every reserved byte; with the simulator's own placement within the tolerance."""
    snapshot = _load(path)
    traced, placed = replay_snapshot(snapshot, cuda_addresses=True)
    assert placed == traced
    traced, own = replay_snapshot(snapshot)
    assert abs(own - traced) <= tolerance * traced


def test_shipped_snapshots_are_there():
    assert len(_snapshots()) == 4 and len(FROM_BUILD) == 2


def test_expandable_segments_grow_one_segment_and_give_pages_back():
    from analysis.predict.allocator import ExpandableAllocator

    sim = ExpandableAllocator()
    a = sim.malloc(30 * MIB)
    assert sim.reserved == 40 * MIB  # 20 MiB pages
    b = sim.malloc(5 * MIB)  # fits the mapped free end: no new pages
    assert sim.reserved == 40 * MIB and b.addr == a.addr + 30 * MIB
    sim.free(a)
    c = sim.malloc(31 * MIB)  # the free 30 MiB at the start is too small; the end grows by what is missing
    assert sim.reserved == 80 * MIB and c.addr == b.addr + 5 * MIB
    sim.free(c)
    sim.empty_cache()  # pages wholly inside free blocks are unmapped
    assert sim.reserved < 80 * MIB and sim.allocated == 5 * MIB
    before = sim.reserved
    sim.malloc(60 * MIB)  # taking the free range maps its pages again
    assert sim.reserved > before


def test_placement_decides_an_eager_trace_and_cudamalloc_places_new_segments_lower():
    """Llama 3.2 3B, eager attention at 4096 tokens (results/nvidia-h200-x1/eager-trace.artifacts): many
    equal blocks, so which one the allocator takes (the lowest address) decides which segments stay
    whole. Placing new segments one above the other leaves the replay 7.8% short of the GPU's reserved
    peak; below the earlier ones, as cudaMalloc placed them on the H200 (the default), it lands within
    0.05%, and so do the other traces."""
    snapshot = _load(next((ARTIFACTS.parent / "eager-trace.artifacts").glob("*.snapshot.pickle.gz")))
    traced, upward = replay_snapshot(snapshot, descending=False)
    _, downward = replay_snapshot(snapshot)
    assert upward < 0.93 * traced
    assert abs(downward - traced) <= 0.0005 * traced
    for other in _snapshots():
        traced, downward = replay_snapshot(_load(other))
        assert abs(downward - traced) <= 0.0005 * traced


@pytest.mark.parametrize(
    "path",
    _traces("allocator-band", lambda r: r["spec"].get("expandable_segments") and r.get("snapshot_file")),
    ids=lambda p: p.name[:16],
)
def test_expandable_segments_replay_their_gpu_trace_to_the_byte(path):
    """Qwen3-8B QLoRA at 4096 x 2 and Gemma 3 4B eager LoRA with expandable segments, traced on an H200 from
    before the build: pages mapped at the lowest unmapped range, best fit that counts the range a block could
    grow into, empty_cache unmapping the pages inside free blocks. Counting pages without placing them was
    3.1% over on the first."""
    traced, simulated = replay_snapshot(_load(path))
    assert simulated == traced


def test_expandable_best_fit_takes_a_block_at_the_mapped_end_last():
    """A free block that borders the unmapped range counts as large as it could grow: a request that fits
    both it and a larger free block elsewhere goes to the other (as the H200 trace of Qwen3-8B did)."""
    from analysis.predict.allocator import ExpandableAllocator

    sim = ExpandableAllocator()
    a = sim.malloc(32 * MIB)  # maps 40 MiB: 8 MiB free at the mapped end
    sim.malloc(30 * MIB)  # those 8 MiB and 40 more mapped: 18 MiB free at the end
    sim.free(a)  # a free 32 MiB block at the start
    c = sim.malloc(8 * MIB)  # the 18 MiB end is the smaller fit, but it could grow: the 32 MiB block
    assert c.addr == a.addr
