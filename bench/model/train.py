"""The training step of a cell: synthetic tokens, forward with causal-LM loss, backward, optimizer step."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bench.model.build import autocast_dtype
from bench.spec import CellSpec


def make_optimizer(spec: CellSpec, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-5
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if spec.optimizer in ("adamw", "adamw_fused", "adamw_foreach"):
        impl = {"adamw": {}, "adamw_fused": {"fused": True}, "adamw_foreach": {"foreach": True}}[
            spec.optimizer
        ]
        return torch.optim.AdamW(params, lr=lr, **impl)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[spec.optimizer]
    return cls(params, lr=lr)


def make_batches(spec: CellSpec, vocab_size: int, device: torch.device) -> list[torch.Tensor]:
    """`grad_accum` micro-batches of random token ids (labels are the inputs, shifted by the model)."""
    generator = torch.Generator(device="cpu").manual_seed(spec.seed + 1)
    shape = (spec.batch_size, spec.seq_len)
    return [
        torch.randint(0, vocab_size, shape, generator=generator).to(device) for _ in range(spec.grad_accum)
    ]


class Stepper:
    """Runs one optimizer step over the micro-batches, with autocast and loss scaling as the spec says."""

    def __init__(
        self, spec: CellSpec, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ):
        self.spec, self.model, self.optimizer, self.device = spec, model, optimizer, device
        self.autocast = autocast_dtype(spec)
        self.scaler = torch.amp.GradScaler(device.type) if spec.precision == "fp16_mixed" else None
        self.last_loss: float | None = None
        #: Optional name -> context manager around each part of the step (bench.cell.profile's markers).
        self.marker = None

    def _mark(self, name: str):
        return contextlib.nullcontext() if self.marker is None else self.marker(name)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def step(self, batches: list[torch.Tensor]) -> None:
        with self._mark("step"), self._attention():
            self._step(batches)

    def _attention(self):
        """sdpa_flash: SDPA may only use its FlashAttention-2 kernels (forward, backward, recompute);
        where they cannot run, the step fails rather than fall back to another kernel."""
        if self.spec.attn_impl != "sdpa_flash":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def _micro_batch(self, last: bool):
        """Context of one micro-batch's forward and backward (DDP/FSDP2 sync on the last one only)."""
        return contextlib.nullcontext()

    def _step(self, batches: list[torch.Tensor]) -> None:
        for i, ids in enumerate(batches):
            with self._micro_batch(last=i == len(batches) - 1):
                with self._mark("forward"), self._autocast():
                    loss = self.model(input_ids=ids, labels=ids).loss / len(batches)
                with self._mark("backward"):
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
            self.last_loss = float(loss.detach()) * len(batches)
            del loss
        with self._mark("optimizer_step"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        with self._mark("zero_grad"):
            self.optimizer.zero_grad(set_to_none=True)
