"""Mixture-of-experts cells: how the step's tokens were routed, and which experts code ran.

Random tokens through random weights route roughly evenly; real data need not. With transformers'
grouped-matmul experts every activation is sized by tokens x top_k whatever the routing, so the row
records the per-expert token counts of one step (the warm-up step, outside the measured ones) for a
reader to check that claim against the measured peak, and `experts_implementation` says which code ran.
"""

from __future__ import annotations

import torch
from torch import nn


def routers(model: nn.Module) -> list[nn.Module]:
    """The router of every MoE layer (transformers 5 names their classes *TopKRouter)."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


class RoutingCounter:
    """Counts the tokens each expert receives in each MoE layer while attached (forward hooks)."""

    def __init__(self, model: nn.Module):
        self.counts: list[list[int]] = []
        self._handles = [r.register_forward_hook(self._hook) for r in routers(model)]

    def _hook(self, module: nn.Module, _inputs, outputs) -> None:
        indices = outputs[-1]  # (router_logits, router_scores, router_indices)
        experts = getattr(module, "num_experts", int(indices.max()) + 1)
        with torch.no_grad():
            self.counts.append(torch.bincount(indices.reshape(-1), minlength=experts).tolist())

    def close(self) -> list[list[int]]:
        for handle in self._handles:
            handle.remove()
        return self.counts


def routing_fields(model: nn.Module, counts: list[list[int]]) -> dict:
    """Row fields of an MoE cell: the experts implementation and one forward's per-layer expert token counts
    (the first forward of the counted step: with grad_accum, its first micro-batch)."""
    config = getattr(model, "config", None)
    layers = len(routers(model))
    first = counts[:layers]
    busiest = max((max(c) * len(c) / max(1, sum(c)) for c in first if sum(c)), default=None)
    return {
        "experts_implementation": getattr(config, "_experts_implementation", None),
        "moe_expert_tokens": first,
        "moe_imbalance": busiest,  # tokens of the busiest expert / the mean, over layers
    }
