"""One rank of a multi-GPU cell, run by torchrun (bench.multigpu.launch starts it):

    python -m torch.distributed.run --nproc-per-node N ... -m bench.multigpu.dist SPEC.json OUTDIR

Each rank measures like a single-GPU cell (bench.cell.measure.CellRun: context, budget, build, first
step, steady steps, per-phase peaks, OOM as data) on its own device cuda:LOCAL_RANK, with the
model wrapped the way the spec's `dist` says:
- ddp: torch DistributedDataParallel (no_sync on all but the last micro-batch);
- fsdp2: torch.distributed.fsdp.fully_shard on every decoder layer, then the root, with a
  MixedPrecisionPolicy (param_dtype = the autocast dtype, fp32 reduce) under *_mixed;
- deepspeed_zero2 / deepspeed_zero3: deepspeed.initialize with bench.multigpu.deepspeed_config's config
  (its AdamW); ZeRO-3 models are built on the CPU and partitioned onto the GPUs with
  deepspeed.zero.Init(module=...), so no rank ever holds the whole model (as HF's zero.Init loading).
Every rank writes OUTDIR/rank<RANK>.json (its values, status, error) and exits 3 after a failure,
so that torchrun ends the other ranks instead of leaving them blocked in a collective.
Per-rank model-state fields (param_bytes, trainable_param_bytes, grad_bytes,
optimizer_state_bytes) are what this rank holds (its shard); n_params counts the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from bench.cell.measure import CellRun
from bench.cell.procs import die_with_parent
from bench.model import build, train
from bench.spec import DEEPSPEED_DISTS, CellSpec

FAILED_EXIT_CODE = 3


def rank_info() -> dict[str, int]:
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def init_process_group(spec: CellSpec, timeout_s: float) -> None:
    """gloo on CPU, nccl on CUDA (no device_id: NCCL communicators start lazily, after the context
    baseline). DeepSpeed cells go through deepspeed.init_distributed, which adopts this group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if spec.device == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if spec.dist in DEEPSPEED_DISTS:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)


class DistStepper(train.Stepper):
    """train.Stepper for DDP and FSDP2: gradients are synchronised on the last micro-batch only."""

    def _micro_batch(self, last: bool):
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
        elif hasattr(self.model, "no_sync") and not last:  # DDP
            return self.model.no_sync()
        return contextlib.nullcontext()


class DeepSpeedStepper(train.Stepper):
    """The DeepSpeed engine's loop: engine.backward scales by grad_accum and the loss scale,
    engine.step steps the optimizer (and zeroes gradients) at the accumulation boundary."""

    def __init__(self, spec, engine, optimizer, device):
        super().__init__(spec, engine, optimizer, device)
        self.autocast, self.scaler = None, None  # the engine holds the module in its half dtype

    def _step(self, batches: list[torch.Tensor]) -> None:
        engine = self.model
        for ids in batches:
            with self._mark("forward"):
                loss = engine(input_ids=ids, labels=ids).loss
            with self._mark("backward"):
                engine.backward(loss)
            with self._mark("optimizer_step"):
                engine.step()
            self.last_loss = float(loss.detach())
            del loss


class RankCellRun(CellRun):
    """A CellRun on cuda:LOCAL_RANK whose model is wrapped for the spec's `dist`."""

    def __init__(self, spec: CellSpec):
        super().__init__(spec)
        self.info = rank_info()
        self.clock.echo = True  # into torchrun's log, which a timed-out row quotes
        if self.cuda:
            self.device = torch.device("cuda", self.info["local_rank"])
        self.ds_config = None
        if spec.dist in DEEPSPEED_DISTS:
            from bench.multigpu.deepspeed_config import deepspeed_config

            self.ds_config = deepspeed_config(spec, self.info["world_size"])

    def _build_model(self):
        spec = self.spec
        if spec.dist not in DEEPSPEED_DISTS:
            return super()._build_model()
        # DeepSpeed's bf16 mode holds the module in bf16 (fp32 masters live in the ZeRO optimizer):
        # build it in bf16 at once rather than in fp32 and let deepspeed.initialize cast it.
        build_spec = dataclasses.replace(spec, precision="bf16") if spec.precision == "bf16_mixed" else spec
        if spec.dist == "deepspeed_zero2":
            model = build.build_model(build_spec, self.device)
            return model.half() if spec.precision == "fp16_mixed" else model
        import deepspeed

        model = build.build_model(build_spec, torch.device("cpu"), init_device=self.device)
        if spec.precision == "fp16_mixed":
            model = model.half()
        deepspeed.zero.Init(module=model, config_dict_or_path=self.ds_config)
        return model

    def _training(self, model):
        spec = self.spec
        if spec.dist in DEEPSPEED_DISTS:
            import deepspeed

            trainable = [p for p in model.parameters() if p.requires_grad]
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=trainable, config=self.ds_config
            )
            self._local_state(model)
            return optimizer, DeepSpeedStepper(spec, engine, optimizer, self.device)
        if spec.dist == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.cuda else None
            wrapped = DistributedDataParallel(model, device_ids=device_ids)
            optimizer = train.make_optimizer(spec, model)
            return optimizer, DistStepper(spec, wrapped, optimizer, self.device)
        if spec.dist == "fsdp2":
            shard_fsdp2(model, spec, self.device, self.info["world_size"])
            self._local_state(model)
            optimizer = train.make_optimizer(spec, model)
            return optimizer, DistStepper(spec, model, optimizer, self.device)
        return super()._training(model)

    def _local_state(self, model) -> None:
        """param/trainable/grad bytes of this rank's shards (n_params keeps the whole model's count)."""
        params = list(model.parameters())
        local = [_local_tensor(p) for p in params]
        trainable = [t for t, p in zip(local, params, strict=True) if p.requires_grad]
        self.values["param_bytes"] = build.tensor_bytes(local)
        self.values["trainable_param_bytes"] = build.tensor_bytes(trainable)
        if self.spec.dist == "deepspeed_zero2":
            self.values["grad_bytes"] = -(-build.tensor_bytes(trainable) // self.info["world_size"])
        else:
            self.values["grad_bytes"] = build.tensor_bytes(trainable)


def _local_tensor(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def shard_fsdp2(model, spec: CellSpec, device: torch.device, world_size: int) -> None:
    """fully_shard every decoder layer, then the root (embeddings, norm, lm_head), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    half = build.autocast_dtype(spec)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else None
    kwargs: dict[str, Any] = {"mesh": mesh}
    if policy is not None:
        kwargs["mp_policy"] = policy
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def main(argv: list[str]) -> int:
    spec_path, out_dir = Path(argv[0]), Path(argv[1])
    timeout_s = float(argv[2]) if len(argv) > 2 else 1800.0
    die_with_parent(check_env=False)  # the parent is torchrun's agent (bench.cell.procs)
    from bench.cell import env
    from bench.cell.measure import measure

    spec = CellSpec.from_dict(json.loads(spec_path.read_text()))
    info = rank_info()
    status, error, values = "error", None, {}
    try:
        init_process_group(spec, timeout_s)
        status, error, values = measure(spec, cell_class=RankCellRun)
    except Exception as exc:  # a failure outside the measurement (process group, deepspeed import)
        error = f"{type(exc).__name__}: {exc}"[:2000]
    record = {
        **info,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "status": status,
        "error": error,
        "values": values,
        "env": env.collect(cuda_runtime=torch.version.cuda) if info["rank"] == 0 else None,
    }
    path = out_dir / f"rank{info['rank']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    if status != "ok":
        return FAILED_EXIT_CODE  # torchrun then ends the other ranks
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
