"""Running a multi-GPU cell (spec.gpus > 1 or spec.dist != none) through torchrun, with a timeout.

The parent starts `python -m torch.distributed.run --nproc-per-node N ... -m bench.multigpu.dist` in a new
session, samples NVML used memory of its N GPUs together (summed: NCCL buffers, every rank's CUDA
context and non-torch memory included), waits up to the timeout and then kills the whole tree:
torchrun's agent starts every rank in a session of its own, so killing the agent's process group
is not enough; each rank also dies with its agent (PR_SET_PDEATHSIG in bench.multigpu.dist). Each rank writes
its own JSON; `merge_ranks` makes the row: every rank's figures in `ranks`, the headline fields the
max over ranks, status oom with `oom_rank` when any rank ran out of memory.

DeepSpeed cells use torchrun too (deepspeed.initialize reads RANK/LOCAL_RANK/WORLD_SIZE from it).

Multi-node cells: the launcher reads the rendezvous from the environment, the same on every node
(a Slurm script sets them from SLURM_NODEID and the first host of SLURM_JOB_NODELIST):
  FTMEM_NNODES, FTMEM_NODE_RANK, FTMEM_RDZV_BACKEND (default c10d), FTMEM_RDZV_ENDPOINT (host:port),
  FTMEM_RDZV_ID (a job id: the cell id and repeat are appended, so each cell has its own rendezvous),
  FTMEM_RANK_DIR (a shared folder for the per-rank JSON, so node 0 sees every rank).
spec.gpus is the world size; it must be a multiple of FTMEM_NNODES. Without FTMEM_RANK_DIR each
node's row holds its own ranks only (the others are marked missing). Rows of node 0 are the ones to keep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import schema
from bench.cards import gib
from bench.cell import env, nvml
from bench.cell.procs import HostMemorySampler, cell_env, wait_or_kill_tree
from bench.cell.rows import failure_row
from bench.spec import CellSpec

#: Set in every rank's environment unless already set: the GPU machines need NVLink SHARP
#: (NVLS) multicast off in NCCL and in torch's symmetric memory.
NCCL_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

#: Headline fields of a multi-GPU row: the max over the ranks (the rank that decides whether it fits).
MAX_FIELDS = (
    "context_bytes",
    "build_peak_allocated_bytes",
    "build_peak_reserved_bytes",
    "first_step_peak_allocated_bytes",
    "first_step_peak_reserved_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_process_bytes",
    "peak_rss_bytes",
    "baseline_rss_bytes",
    "param_bytes",
    "trainable_param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "buffer_bytes",
    "step_time_s",
    "first_step_time_s",
    "build_time_s",
    "startup_to_first_step_s",
)
#: Fields taken from rank 0 (the same on every rank, or a sanity value).
RANK0_FIELDS = ("n_params", "n_trainable_params", "final_loss", "attn_impl_used", "unavailable")
_OOM_FIELDS = ("oom_phase", "oom_requested_bytes", "oom_allocated_bytes", "oom_reserved_bytes")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """torchrun's rendezvous; the defaults are one node (torchrun --standalone)."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rank_dir: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> LaunchConfig:
        e = os.environ if environ is None else environ
        return cls(
            nnodes=int(e.get("FTMEM_NNODES", "1")),
            node_rank=int(e.get("FTMEM_NODE_RANK", "0")),
            rdzv_backend=e.get("FTMEM_RDZV_BACKEND", "c10d"),
            rdzv_endpoint=e.get("FTMEM_RDZV_ENDPOINT") or None,
            rdzv_id=e.get("FTMEM_RDZV_ID") or None,
            rank_dir=e.get("FTMEM_RANK_DIR") or None,
        )


def nproc_per_node(spec: CellSpec, config: LaunchConfig) -> int:
    if config.nnodes < 1 or spec.gpus % config.nnodes:
        raise ValueError(f"gpus {spec.gpus} is not a multiple of FTMEM_NNODES {config.nnodes}")
    return spec.gpus // config.nnodes


def torchrun_command(
    spec: CellSpec, spec_path: Path, out_dir: Path, config: LaunchConfig, timeout_s: float, run_id: str
) -> list[str]:
    """The torchrun command line of one cell (rank processes run `-m bench.multigpu.dist`)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc_per_node(spec, config)),
    ]
    if config.nnodes == 1 and config.rdzv_endpoint is None:
        cmd += ["--standalone"]  # a free local port: cells of parallel sweeps do not collide
    else:
        if config.rdzv_endpoint is None:
            raise ValueError("a multi-node cell needs FTMEM_RDZV_ENDPOINT (host:port of node 0)")
        rdzv_id = f"{config.rdzv_id}-{run_id}" if config.rdzv_id else run_id
        cmd += [
            "--nnodes", str(config.nnodes),
            "--node-rank", str(config.node_rank),
            "--rdzv-backend", config.rdzv_backend,
            "--rdzv-endpoint", config.rdzv_endpoint,
            "--rdzv-id", rdzv_id,
        ]  # fmt: skip
    cmd += ["--max-restarts", "0", "-m", "bench.multigpu.dist", str(spec_path), str(out_dir), f"{timeout_s:g}"]
    return cmd


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:

    child = cell_env() if base is None else dict(base)
    for key, value in NCCL_ENV_DEFAULTS.items():
        child.setdefault(key, value)
    child.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default with several ranks, without its warning
    return child


def run_dist_cell(
    spec: CellSpec, timeout_s: float, repeat: int = 0, config: LaunchConfig | None = None
) -> dict[str, Any]:
    """Measure a multi-GPU cell through torchrun; always returns a row (never hangs past the timeout)."""
    config = LaunchConfig.from_env() if config is None else config
    start = time.monotonic()
    run_id = f"{spec.cell_id}-r{repeat}"
    with tempfile.TemporaryDirectory(prefix="ftmem-dist-") as tmp:
        spec_path, log_path = Path(tmp, "spec.json"), Path(tmp, "log.txt")
        out_dir = Path(config.rank_dir, run_id) if config.rank_dir else Path(tmp, "ranks")
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("rank*.json"):
            stale.unlink()
        spec_path.write_text(json.dumps(spec.to_dict()))
        try:
            nproc = nproc_per_node(spec, config)
            cmd = torchrun_command(spec, spec_path, out_dir, config, timeout_s, run_id)
        except ValueError as exc:
            return failure_row(spec, "error", str(exc))
        devices = nvml.visible_indices(nproc) if spec.device == "cuda" else []
        with (
            open(log_path, "wb") as log,
            nvml.DevicesSampler(devices) as sampler,
            HostMemorySampler() as host,
        ):
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=child_env()
            )
            host.watch(proc.pid)
            timed_out = wait_or_kill_tree(proc, timeout_s)
        records = read_rank_records(out_dir)
        tail = log_path.read_bytes()[-3000:].decode(errors="replace")
    row = merge_ranks(
        spec, records, timed_out=timed_out, timeout_s=timeout_s, exit_code=proc.returncode, log_tail=tail
    )
    row["nvml_peak_device_bytes"] = sampler.peak_sum_bytes
    row["nvml_baseline_device_bytes"] = sampler.baseline_sum_bytes
    row["host_peak_rss_bytes"] = host.peak_tree_rss_bytes
    row["host_min_available_bytes"] = host.min_available_bytes
    row["host_total_bytes"] = host.total_bytes
    if row["status"] == "error" and host_exhausted(host, tail):
        row["status"], row["host_oom"] = "oom", True
        row["error"] = (
            f"host memory ran out: a rank was killed by SIGKILL (the kernel's OOM killer) while the host had "
            f"{gib(host.min_available_bytes):.1f} GiB of {gib(host.total_bytes):.1f} GiB available and "
            f"the cell's processes held {gib(host.peak_tree_rss_bytes or 0):.1f} GiB resident (GiB = 2^30 bytes)."
            f" {row['error']}"
        )
    row["cell_wall_time_s"] = time.monotonic() - start
    row["repeat"] = repeat
    return row


#: A rank killed by SIGKILL that ftmem did not send (no timeout) while the host had less than this
#: share of its memory available: the kernel's OOM killer, i.e. the cell does not fit in host memory.
HOST_OOM_AVAILABLE_SHARE = 0.05


def host_exhausted(host: HostMemorySampler, log_tail: str) -> bool:
    killed = "SIGKILL" in log_tail or "exitcode: -9" in log_tail or "exitcode  : -9" in log_tail
    low = (
        host.min_available_bytes is not None
        and host.min_available_bytes < HOST_OOM_AVAILABLE_SHARE * host.total_bytes
    )
    return killed and low


def read_rank_records(out_dir: Path) -> dict[int, dict[str, Any]]:
    records = {}
    for path in out_dir.glob("rank*.json"):
        with contextlib.suppress(ValueError, OSError):
            record = json.loads(path.read_text())
            records[int(record["rank"])] = record
    return records


def merge_ranks(
    spec: CellSpec,
    records: dict[int, dict[str, Any]],
    *,
    timed_out: bool = False,
    timeout_s: float | None = None,
    exit_code: int | None = None,
    log_tail: str = "",
) -> dict[str, Any]:
    """The row of a multi-GPU cell from its ranks' records (bench.multigpu.dist writes them)."""
    ranks: list[dict[str, Any]] = []
    for r in range(spec.gpus):
        record = records.get(r)
        if record is None:
            why = "wrote no result: killed by torchrun after another rank failed, by the timeout, or it ran"
            why += " on another node without a shared FTMEM_RANK_DIR"
            ranks.append({"rank": r, "status": "timeout" if timed_out else "error", "error": why})
            continue
        entry = {k: record.get(k) for k in ("rank", "local_rank", "host", "status", "error")}
        entry.update(record.get("values") or {})
        ranks.append(entry)
    present = [e for e in ranks if r_has_record(e, records)]
    missing = [e["rank"] for e in ranks if not r_has_record(e, records)]

    values: dict[str, Any] = {"ranks": ranks}
    for name in MAX_FIELDS:
        found = [e[name] for e in present if e.get(name) is not None]
        values[name] = max(found) if found else None
    first = records.get(0) or (records[min(records)] if records else None)
    if first is not None:
        for name in RANK0_FIELDS:
            values[name] = (first.get("values") or {}).get(name)
    times = [e.get("step_times_s") for e in present if e.get("step_times_s")]
    if times and len({len(t) for t in times}) == 1:
        values["step_times_s"] = [max(step) for step in zip(*times, strict=True)]
    if values.get("step_time_s"):
        # Tokens of all ranks per optimizer step over the slowest rank's step time.
        values["tokens_per_s"] = spec.tokens_per_step * spec.gpus / values["step_time_s"]

    status, error = "ok", None
    ooms = [e for e in present if e["status"] == "oom"]
    errors = [e for e in present if e["status"] not in ("ok", "oom")]
    if ooms:
        status, culprit = "oom", ooms[0]
        values["oom_rank"] = culprit["rank"]
        values.update({k: culprit.get(k) for k in _OOM_FIELDS})
        error = f"rank {culprit['rank']}: {culprit['error']}"
    elif errors:
        status, culprit = "error", errors[0]
        error = f"rank {culprit['rank']}: {culprit['error']}"
    elif timed_out:
        status, error = (
            "timeout",
            f"no result within the timeout of {timeout_s:g} s (ranks without a result: {missing});"
            f" the log ended:\n{log_tail}",
        )
    elif missing:
        status = "error"
        error = f"ranks {missing} wrote no result; torchrun exited with code {exit_code}:\n{log_tail}"

    budget = spec.budget_bytes
    if budget is not None:
        values["budget_bytes"] = budget
        verdicts = [e.get("fits_budget") for e in present]
        if ooms or False in verdicts:
            values["fits_budget"] = False
        elif status == "ok" and all(v is True for v in verdicts):
            values["fits_budget"] = True
    row = schema.new_row(spec.to_dict(), spec.cell_id, status=status, error=error, **values)
    row["env"] = (first or {}).get("env") or env.collect()
    return row


def r_has_record(entry: dict[str, Any], records: dict[int, dict[str, Any]]) -> bool:
    return entry["rank"] in records
