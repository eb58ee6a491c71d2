"""Symbolic tensors and what autograd keeps of them, counted once per storage."""

from __future__ import annotations

from dataclasses import dataclass

from analysis.predict.resolve import BYTES, Setup


@dataclass(frozen=True)
class T:
    """A symbolic tensor: id (storage identity), element count, dtype, requires_grad. A view (a slice of a
    fused projection's output) shares its base's id and `store`s the base's element count: saving the
    view keeps the whole base alive."""

    id: int
    numel: int
    dtype: str
    grad: bool
    store: int = 0

    @property
    def nbytes(self) -> int:
        return (self.store or self.numel) * BYTES[self.dtype]


class Graph:
    """The tensors autograd keeps for backward in one stretch of forward, counted once per storage.

    `saved`: activations, released as their op's backward runs; `kept`: tensors a custom autograd
    Function stores on its ctx (bitsandbytes' MatMul8bitLt keeps its input there), which neither
    checkpointing nor backward releases: they live until the graph is freed after backward.
    `casts`: autocast's half copies of weights, name -> (bytes, cached, saved): copies of trainable fp32
    leaves are cached until the autocast region ends (the end of the forward), saved or not; a matmul
    saves the copy when its input needs a grad. `bwd_transient` / `fwd_transient`: the largest extra
    working set of the layer's backward (beyond all its saved tensors) / of the forward's s x s scores.

    Backward runs the ops in reverse and each op's saved tensors are released once its backward has run,
    so at the backward of op k only the tensors saved up to op k are alive. `bump_backward_at` records
    such a point: the saved bytes so far and the gradients alive there; `bwd_transient` counts it as
    its excess over the whole layer's saved bytes (which the moments add).

    Forward runs the other way: at op k the tensors saved so far are alive, plus the op's own inputs and
    outputs and what the modules' Python frames still hold (`frame`: a norm's output while the block it
    feeds runs, the residual while the MLP runs) where they are not saved. `forward_at` records such a
    point; `recompute_transient` is the largest excess over the whole layer's saved bytes: the working
    set of a checkpointed layer's recomputation, which runs inside its backward.
    """

    def __init__(self, st: Setup):
        self.st = st
        self.saved: dict[int, int] = {}
        self.kept: dict[int, int] = {}
        self.casts: dict[str, tuple[int, bool, bool]] = {}
        self.fwd_transient = 0
        self.residual_grad = 0  # bytes of the residual stream's gradient, set by the layer walk
        self.input_saved = 0  # bytes of the layer input itself among the saved tensors (the layer walk)
        self._bwd_over_all = 0
        self._bwd_points: list[tuple[int, int]] = []
        self.frame: dict[str, T] = {}
        self._fwd_points: list[int] = []
        self.recompute_grads = 0  # gradients held while a checkpointed layer recomputes (the layer walk)
        self._ids = 0

    def new(self, numel: int, dtype: str, grad: bool) -> T:
        self._ids += 1
        return T(self._ids, numel, dtype, grad)

    def view(self, base: T, numel: int) -> T:
        """A slice of `base` (its storage, fewer elements)."""
        return T(base.id, numel, base.dtype, base.grad, base.store or base.numel)

    def cast(self, t: T, dtype: str | None) -> T:
        """x.to(dtype) / an autocast input cast: the same tensor if the dtype already matches."""
        if dtype is None or t.dtype == dtype:
            return t
        return self.new(t.numel, dtype, t.grad)

    def save(self, t: T | None) -> None:
        if t is not None:
            self.saved[t.id] = t.nbytes

    def keep(self, t: T) -> None:
        self.kept[t.id] = t.nbytes

    def saved_bytes(self) -> int:
        """Saved tensors that their op's backward releases (kept ones are counted apart)."""
        return sum(n for i, n in self.saved.items() if i not in self.kept)

    def kept_bytes(self) -> int:
        return sum(self.kept.values())

    def held_bytes(self) -> int:
        """Everything of this stretch alive at the end of its forward: saved and kept."""
        return self.saved_bytes() + self.kept_bytes()

    def forward_casts(self) -> int:
        """Weight copies alive at the end of the forward: cached (trainable) or saved by a matmul."""
        return sum(n for n, cached, saved in self.casts.values() if cached or saved)

    def saved_casts(self) -> int:
        """Weight copies a matmul saved, alive until that matmul's backward."""
        return sum(n for n, _, saved in self.casts.values() if saved)

    def bump(self, backward: int, forward: int = 0) -> None:
        """Record temporaries beyond the saved tensors, in backward and in forward."""
        self._bwd_over_all = max(self._bwd_over_all, backward)
        self.fwd_transient = max(self.fwd_transient, forward)

    def bump_backward_at(self, held: int) -> None:
        """Record a point of the backward where `held` bytes of gradients and temporaries are alive
        beside the tensors saved so far in the walk (those saved later are released by then)."""
        self._bwd_points.append((self.held_bytes(), held))

    def forward_at(self, *tensors: T) -> None:
        """Record a point of the forward where `tensors` and the frames' tensors are alive beside the
        tensors saved so far (each storage once; saved ones are counted among the saved)."""
        known = self.saved.keys() | self.kept.keys()
        alive = {t.id: t.nbytes for t in (*tensors, *self.frame.values()) if t.id not in known}
        self._fwd_points.append(self.held_bytes() + sum(alive.values()))

    @property
    def recompute_transient(self) -> int:
        """The largest working set of the layer's forward beyond its saved tensors (`forward_at`)."""
        return max(0, *(alive - self.held_bytes() for alive in self._fwd_points))

    @property
    def bwd_transient(self) -> int:
        """The largest working set of the backward beyond the whole layer's saved tensors."""
        total = self.held_bytes()
        at_points = (alive + held - total for alive, held in self._bwd_points)
        return max(self._bwd_over_all, *at_points, 0)
