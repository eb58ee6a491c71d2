"""PyTorch's CUDA caching allocator, simulated: what it reserves for a sequence of allocations and frees.

The rules are the allocator's own (c10/cuda/CUDACachingAllocator.cpp, default settings: no
max_split_size, no power-of-two rounding, no expandable segments, one stream):
- a request is rounded up to a multiple of 512 bytes; up to 1 MiB it is served from the small pool,
  above from the large pool;
- a request is served by the smallest cached free block of its pool that holds it (ties: lowest address);
- none fits: a new segment is reserved (cudaMalloc) of 2 MiB (small requests), 20 MiB (requests under
  10 MiB) or the request rounded up to 2 MiB; at the cap (set_per_process_memory_fraction) or when the
  card is full, every cached segment that is wholly free is released first, and the request retried;
- a block larger than the request is split when the rest is at least 512 bytes (small pool) or more than
  1 MiB (large pool); the rest stays cached in its segment;
- a freed block merges with free neighbours of its segment; segments are released only by
  `empty_cache` or by the retry above, and only when wholly free;
- new segments lie below the earlier ones, as cudaMalloc placed them (placement breaks the ties above).
Expandable segments (ExpandableAllocator) follow the same file's expandable path: pages mapped on demand
in one virtual range per pool, a best fit that counts the range a block could grow into.
Checked against allocation traces recorded on an H200 (tests/test_allocator.py): every one replays to
the byte with cudaMalloc's placements, within 0.05% with the simulator's own, expandable ones to the byte.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

MIB = 2**20
MIN_BLOCK = 512
SMALL_SIZE = MIB
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB


def round_size(size: int) -> int:
    return MIN_BLOCK * max(1, -(-size // MIN_BLOCK))


def segment_size(size: int) -> int:
    """What cudaMalloc is asked for when no cached block holds a (rounded) request."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


@dataclass(eq=False)
class Block:
    addr: int
    size: int
    small: bool
    free: bool = True
    prev: Block | None = None
    next: Block | None = None
    mapped: bool = True  # expandable segments: a free range whose pages are given back (or never mapped)

    @property
    def key(self) -> tuple[int, int]:
        return (self.size, self.addr)


class OutOfMemory(Exception):
    """The request does not fit under the cap even with every wholly free segment released."""


@dataclass
class CachingAllocator:
    """`cap`: bytes the allocator may reserve (None: unlimited). Sizes are requested bytes, unrounded."""

    cap: int | None = None
    reserved: int = 0
    allocated: int = 0
    peak_reserved: int = 0
    peak_allocated: int = 0
    _pools: dict[bool, list[tuple[int, int]]] = field(default_factory=lambda: {True: [], False: []})
    _free: dict[tuple[bool, int, int], Block] = field(default_factory=dict)
    _segments: list[Block] = field(default_factory=list)  # each segment's first block
    _next_addr: int = 0
    #: where new segments go (a replay of a GPU trace can place them where cudaMalloc did); else one after another
    addresses: Iterator[int] | None = None
    #: new segments below the earlier ones, as cudaMalloc placed them in the H200's traces (ties between
    #: equal free blocks go to the lowest address, so placement decides which segments stay whole);
    #: False places each above the last (7.8% short on an eager trace, results/.../eager-trace.jsonl)
    descending: bool = True
    _low: int = 2**47  # where the next descending segment ends

    # ------------------------------------------------------------------------------------------
    def malloc(self, size: int) -> Block:
        size = round_size(size)
        small = size <= SMALL_SIZE
        block = self._take(small, size)
        if block is None:
            block = self._new_segment(small, size)
        block.free = False
        if self._should_split(block, size):
            rest = Block(block.addr + size, block.size - size, small, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._insert(rest)
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        self.allocated -= block.size
        block.free = True
        self._insert(self._merge(block))

    def _merge(self, block: Block) -> Block:
        """The free block merged with its free neighbours of the same kind (mapped or not); the neighbours
        leave their pool or list."""
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free and neighbour.mapped == block.mapped:
                self._remove(neighbour)
                first, second = (neighbour, block) if neighbour is block.prev else (block, neighbour)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                block = first
        return block

    def empty_cache(self) -> None:
        """Release every wholly free segment (torch.cuda.empty_cache, and the allocator's retry)."""
        for head in list(self._segments):
            if head.free and head.prev is None and head.next is None:
                self._remove(head)
                self._segments.remove(head)
                self.reserved -= head.size

    def adopt_segment(self, addr: int, size: int, used: list[tuple[int, int]]) -> dict[int, Block]:
        """Add a segment reserved before the simulation began, with its allocated blocks (addr, size);
        the gaps between them are cached free blocks. Returns the allocated blocks by address."""
        small = size == SMALL_BUFFER and all(s <= SMALL_SIZE for _, s in used)
        cuts, at, prev = [], addr, None
        for a, s in sorted(used):
            if a > at:
                cuts.append((at, a - at, True))
            cuts.append((a, s, False))
            at = a + s
        if at < addr + size:
            cuts.append((at, addr + size - at, True))
        out = {}
        for a, s, free in cuts:
            block = Block(a, s, small, free, prev)
            if prev is not None:
                prev.next = block
            else:
                self._segments.append(block)
            prev = block
            if free:
                self._insert(block)
            else:
                out[a] = block
                self.allocated += s
        self.reserved += size
        self._next_addr = max(self._next_addr, addr + size + ROUND_LARGE)
        self._low = min(self._low, addr)  # new segments go below those already there
        return out

    # ------------------------------------------------------------------------------------------
    def _take(self, small: bool, size: int) -> Block | None:
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        block = self._best(small, i)
        self._remove(block)
        return block

    def _best(self, small: bool, i: int) -> Block:
        """The block taken from the pool's i-th smallest on (the smallest that holds the request)."""
        return self._free[(small, *self._pools[small][i])]

    def _new_segment(self, small: bool, size: int) -> Block:
        want = segment_size(size)
        self._make_room(want, size)
        if self.addresses is not None:
            addr = next(self.addresses, self._next_addr)
        elif self.descending:
            self._low -= want + ROUND_LARGE
            addr = self._low
        else:
            addr = self._next_addr
        block = Block(addr, want, small, True)
        self._next_addr = max(self._next_addr, addr + want + ROUND_LARGE)  # segments never adjoin
        self._segments.append(block)
        self._grow(want)
        return block

    def _make_room(self, nbytes: int, size: int) -> None:
        """At the cap, release every wholly free segment (or unmap free pages) before reserving `nbytes`
        more for a request of `size`; run out if that is still not enough."""
        if self.cap is not None and self.reserved + nbytes > self.cap:
            self.empty_cache()
            if self.reserved + nbytes > self.cap:
                raise OutOfMemory(f"{size} bytes requested, {self.reserved} reserved, cap {self.cap}")

    def _grow(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    @staticmethod
    def _should_split(block: Block, size: int) -> bool:
        rest = block.size - size
        return rest >= MIN_BLOCK if block.small else rest > SMALL_SIZE

    def _insert(self, block: Block) -> None:
        bisect.insort(self._pools[block.small], block.key)
        self._free[(block.small, *block.key)] = block

    def _remove(self, block: Block) -> None:
        pool = self._pools[block.small]
        del pool[bisect.bisect_left(pool, block.key)]
        del self._free[(block.small, *block.key)]


@dataclass(frozen=True)
class Peaks:
    """Peak allocated and reserved bytes of each phase bench.cell.measure reports."""

    build_allocated: int
    build_reserved: int
    first_step_allocated: int
    first_step_reserved: int
    allocated: int
    reserved: int


def replay(events, cap: int | None = None, expandable: bool = False, descending: bool = True) -> Peaks:
    """Run a cell's allocation events (bench.model.dryrun) through the allocator: the build, the first
    step, then the measured steps; the cache is emptied where the events say (peft after k-bit upcasts,
    the harness before the measured steps)."""
    sim = allocator(cap, expandable, descending)
    blocks: dict[object, Block] = {}
    marks: dict[str, tuple[int, int]] = {}
    for kind, ident, size in events:
        if kind == "alloc":
            blocks[ident] = sim.malloc(size)
        elif kind == "free":
            sim.free(blocks.pop(ident))
        elif ident in ("build_end", "first_step_end"):
            marks[ident] = (sim.peak_allocated, sim.peak_reserved)
            sim.peak_allocated, sim.peak_reserved = sim.allocated, sim.reserved
        elif ident == "empty_cache":
            sim.empty_cache()
        elif ident == "measured_start":
            sim.peak_allocated, sim.peak_reserved = sim.allocated, sim.reserved
    build = marks.get("build_end", (0, 0))
    first = marks.get("first_step_end", (0, 0))
    return Peaks(*build, *first, sim.peak_allocated, sim.peak_reserved)


class ExpandableAllocator(CachingAllocator):
    """The allocator with expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), as
    c10's try_allocate_expandable_block does it: each pool has one virtual range, mapped on demand in pages
    of 2 MiB (small pool) or 20 MiB (large pool). A request no mapped free block holds takes the lowest
    unmapped range that, with the free block just before it and the free ranges after, is large enough,
    and maps the pages it needs there (merging with the free blocks beside them). Blocks split down to
    512 bytes in both pools. `empty_cache` unmaps the pages wholly inside free blocks. At the cap the check
    is the ordinary segment's size against reserved, with release and retry as without expandable segments."""

    #: virtual range of each pool's segment (torch reserves 9/8 of the card; any range larger than the card)
    RANGE = LARGE_BUFFER * 2**22  # a whole number of pages of either pool

    def __init__(self, cap: int | None = None):
        super().__init__(cap=cap)
        self._unmapped: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (addr, id) by address
        self._by_key: dict[tuple[int, int], Block] = {}

    def _new_segment(self, small: bool, size: int) -> Block:
        self._make_room(segment_size(size), size)
        block = self._candidate(small, size)
        if not block.mapped:
            block = self._map(block, min(block.size, size))
        while block.size < size:
            block = self._map(block.next, min(size - block.size, block.next.size))
        self._remove(block)
        return block

    def _best(self, small: bool, i: int) -> Block:
        """Best fit, where a block's size counts the unmapped range after it (it could grow into it): from
        the smallest block that holds the request, move on to the next larger while that one could grow
        less (c10's get_free_block). A free block at the mapped end is thus taken last."""
        pool = self._pools[small]
        block = self._free[(small, *pool[i])]
        while i + 1 < len(pool) and _growable(after := self._free[(small, *pool[i + 1])]) < _growable(block):
            i, block = i + 1, after
        return block

    def _candidate(self, small: bool, size: int) -> Block:
        """The lowest unmapped range (or the free block before it) with room for `size` from there on."""
        for key in self._unmapped[small]:
            block = self._by_key[key]
            if block.prev is not None and block.prev.free and block.prev.mapped:
                block = block.prev
            room, b = 0, block
            while room < size and b is not None and b.free:
                room, b = room + b.size, b.next
            if room >= size:
                return block
        block = Block(self._next_addr, self.RANGE, small, True, mapped=False)  # the pool's virtual range
        self._next_addr += self.RANGE
        self._segments.append(block)
        self._insert(block)
        return block

    def _map(self, block: Block, nbytes: int) -> Block:
        """Map the pages holding the first `nbytes` of an unmapped block; the rest stays unmapped."""
        page = SMALL_BUFFER if block.small else LARGE_BUFFER
        mapped = min(block.size, page * -(-nbytes // page))
        self._remove(block)
        if block.size > mapped:
            rest = Block(block.addr + mapped, block.size - mapped, block.small, True, block, block.next, mapped=False)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, mapped
            self._insert(rest)
        block.mapped = True
        self._grow(mapped)
        block = self._merge(block)
        self._insert(block)
        return block

    @staticmethod
    def _should_split(block: Block, size: int) -> bool:
        return block.size - size >= MIN_BLOCK

    def empty_cache(self) -> None:
        """Unmap the pages wholly inside each mapped free block."""
        for block in [b for b in self._free.values() if b.mapped]:
            page = SMALL_BUFFER if block.small else LARGE_BUFFER
            start, end = page * -(-block.addr // page), page * ((block.addr + block.size) // page)
            if end <= start:
                continue
            self._remove(block)
            for lo, hi in ((block.addr, start), (end, block.addr + block.size)):
                if hi > lo:  # the mapped ends beside the pages given back stay free blocks
                    self._insert(self._carve(block, lo, hi))
            block.mapped = False
            self.reserved -= end - start
            self._insert(self._merge(block))

    def _carve(self, block: Block, lo: int, hi: int) -> Block:
        """Split [lo, hi) off the start or the end of `block` as a mapped free block of its own."""
        piece = Block(lo, hi - lo, block.small, True)
        if lo == block.addr:
            piece.prev, piece.next = block.prev, block
            if block.prev is not None:
                block.prev.next = piece
            elif block in self._segments:
                self._segments[self._segments.index(block)] = piece
            block.prev, block.addr = piece, hi
        else:
            piece.prev, piece.next = block, block.next
            if block.next is not None:
                block.next.prev = piece
            block.next = piece
        block.size -= hi - lo
        return piece

    # unmapped blocks are kept by address (taking the lowest first), mapped free ones in the size pools
    def _insert(self, block: Block) -> None:
        if block.mapped:
            return super()._insert(block)
        key = (block.addr, id(block))
        bisect.insort(self._unmapped[block.small], key)
        self._by_key[key] = block

    def _remove(self, block: Block) -> None:
        if block.mapped:
            return super()._remove(block)
        key = (block.addr, id(block))
        pool = self._unmapped[block.small]
        del pool[bisect.bisect_left(pool, key)]
        del self._by_key[key]


def _growable(block: Block) -> int:
    return block.size + (block.next.size if block.next is not None and not block.next.mapped else 0)


def allocator(cap: int | None = None, expandable: bool = False, descending: bool = True) -> CachingAllocator:
    return ExpandableAllocator(cap) if expandable else CachingAllocator(cap=cap, descending=descending)


# --------------------------------------------------------------------------------------------------
# Checking the rules: replaying the allocator's own trace (torch.cuda.memory._snapshot with history).
def _start_state(snapshot: dict) -> tuple[dict[int, int], dict[int, int]]:
    """Segments (addr -> size) and allocated blocks (addr -> size) when the trace began: the end state
    with the trace's own segments and allocations taken back."""
    trace = snapshot["device_traces"][0]
    end_blocks = {}
    for seg in snapshot["segments"]:
        addr = seg["address"]
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                end_blocks[addr] = b["size"]
            addr += b["size"]
    live, start_blocks, first_seen = {}, {}, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
        elif e["action"] == "free_completed" and live.pop(e["addr"], None) is None:
            start_blocks[e["addr"]] = e["size"]
        elif e["action"] in ("segment_alloc", "segment_free"):
            first_seen.setdefault(e["addr"], (e["action"], e["size"]))
    start_blocks.update({a: s for a, s in end_blocks.items() if a not in live})
    segments = {s["address"]: s["total_size"] for s in snapshot["segments"] if first_seen.get(s["address"], ("",))[0] != "segment_alloc"}
    segments.update({a: s for a, (act, s) in first_seen.items() if act == "segment_free"})
    return segments, start_blocks


def replay_snapshot(
    snapshot: dict, cap: int | None = None, cuda_addresses: bool = False, descending: bool = True
) -> tuple[int, int]:
    """(traced, simulated) peak reserved bytes over a snapshot's trace. The cache is emptied where the
    harness empties it (before the first measured step's annotation) and, without a cap, where the trace
    released a segment or unmapped pages (only empty_cache does then). `cuda_addresses` places new
    segments where cudaMalloc placed them (ties between equal blocks then break as they did on the GPU).
    A trace of expandable segments (pages mapped and unmapped) is replayed by ExpandableAllocator, from an
    empty process: such traces are recorded from before the build."""
    trace = snapshot["device_traces"][0]
    expandable = any(e["action"] == "segment_map" for e in trace)
    if expandable:
        sim, blocks = ExpandableAllocator(cap), {}
    else:
        segments, used = _start_state(snapshot)
        sim, blocks = CachingAllocator(cap=cap, descending=descending), {}
        for addr, size in sorted(segments.items()):
            blocks.update(sim.adopt_segment(addr, size, [(a, s) for a, s in used.items() if addr <= a < addr + size]))
    sim.peak_reserved = traced = peak = sim.reserved
    if cuda_addresses:
        sim.addresses = iter([e["addr"] for e in trace if e["action"] == "segment_alloc"])
    cuts = sorted(a["time_us"] for a in snapshot.get("external_annotations") or []
                  if a["stage"] == "START" and "measured" in a["name"])
    for e in trace:
        while cuts and e["time_us"] > cuts[0]:
            cuts.pop(0)
            sim.empty_cache()
        if e["action"] == "alloc":
            blocks[e["addr"]] = sim.malloc(e["size"])
        elif e["action"] == "free_completed":
            sim.free(blocks.pop(e["addr"]))
        elif e["action"] in ("segment_alloc", "segment_map"):
            traced += e["size"]
            peak = max(peak, traced)
        elif e["action"] in ("segment_free", "segment_unmap"):
            traced -= e["size"]
            if cap is None:  # uncapped, only empty_cache releases (peft's after a k-bit upcast, in a build)
                sim.empty_cache()
    return peak, sim.peak_reserved
