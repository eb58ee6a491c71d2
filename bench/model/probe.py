"""What autograd really keeps per decoder layer: the measured side of the predictor's layer walk.

`saved_per_layer` runs one forward of a built model with `torch.autograd.graph.saved_tensors_hooks` and
a pre/post hook on each decoder layer, and adds up, per layer, the bytes of the storages autograd saved
there (each storage once; parameters and storages shared by several layers, the cos/sin tables, left
out). It is device independent but for the attention kernel, which is why tests run it on CPU for every
family and a GPU run checks the kernels.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_per_layer(model: nn.Module, input_ids: torch.Tensor, autocast: torch.dtype | None) -> list[int]:
    """Bytes autograd saved in each decoder layer's forward (see the module docstring). The graph is
    freed before returning."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = decoder_layers(model)
    current: list[int | None] = [None]
    seen: list[dict[int, int]] = [{} for _ in layers]

    def pack(t: torch.Tensor):
        key = _storage(t)
        if current[0] is not None and key is not None and key[0] not in params:
            seen[current[0]][key[0]] = key[1]
        return t

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda _m, _a, _o: current.__setitem__(0, None)))
    cast = torch.autocast(input_ids.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        del loss
    finally:
        for handle in handles:
            handle.remove()
    counts: dict[int, int] = {}
    for per_layer in seen:
        for ptr in per_layer:
            counts[ptr] = counts.get(ptr, 0) + 1
    return [sum(n for ptr, n in per_layer.items() if counts[ptr] == 1) for per_layer in seen]
