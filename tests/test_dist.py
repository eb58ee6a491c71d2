"""Multi-GPU cells: spec fields, DeepSpeed config, and real 2-process cells on CPU (gloo) through torchrun."""

import os
import uuid

import psutil
import pytest

from bench.cell.runner import run_cell
from bench.multigpu.deepspeed_config import deepspeed_config
from bench.multigpu.launch import NCCL_ENV_DEFAULTS, LaunchConfig, child_env, merge_ranks, torchrun_command
from bench.schema import FIELDS, check_row
from bench.spec import CellSpec, SpecError
from tests.conftest import TINY

BASE = {"model": "qwen3-14b", "method": "lora", "seq_len": 2048, "batch_size": 1}


# -- spec ---------------------------------------------------------------------------------------
def test_default_multi_gpu_fields_keep_published_cell_ids():
    spec = CellSpec.create(**BASE, precision="bf16_mixed", gradient_checkpointing=False)
    assert (spec.gpus, spec.dist, spec.zero_offload) == (1, "none", "none")
    assert spec.cell_id == "526a5bd9fc1004a6"
    explicit = CellSpec.create(**BASE, gpus=1, dist="none", zero_offload="none")
    assert explicit.cell_id == spec.cell_id
    assert CellSpec.create(**BASE, gpus=2, dist="ddp").cell_id != spec.cell_id
    assert CellSpec.create(**BASE, dist="ddp").cell_id != spec.cell_id  # 1-rank DDP is its own cell


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"gpus": 0}, "gpus"),
        ({"gpus": "2"}, "gpus"),
        ({"gpus": 2}, "dist"),
        ({"dist": "zero2"}, "dist"),
        ({"zero_offload": "nvme"}, "zero_offload"),
        ({"dist": "ddp", "zero_offload": "optimizer"}, "zero_offload"),
        ({"dist": "deepspeed_zero2", "zero_offload": "optimizer_and_params"}, "zero_offload"),
        ({"dist": "fsdp2", "method": "qlora"}, "method"),
        ({"dist": "deepspeed_zero3", "method": "lora8bit"}, "method"),
        ({"dist": "deepspeed_zero3", "precision": "bf16", "zero_offload": "optimizer"}, "zero_offload"),
        ({"dist": "deepspeed_zero2", "optimizer": "paged_adamw_8bit"}, "optimizer"),
    ],
)
def test_bad_multi_gpu_specs_name_key_and_value(changes, key):
    with pytest.raises(SpecError) as err:
        CellSpec.create(**{**BASE, **changes})
    assert err.value.key == key and key in str(err.value)


def test_good_multi_gpu_specs():
    for changes in (
        {"gpus": 2, "dist": "deepspeed_zero3", "zero_offload": "optimizer_and_params", "method": "full"},
        {"gpus": 2, "dist": "deepspeed_zero2", "zero_offload": "optimizer"},
        {"gpus": 2, "dist": "deepspeed_zero2", "method": "qlora"},
        {"gpus": 4, "dist": "fsdp2", "method": "full", "budget_gb": "h100-80gb"},
        {"gpus": 1, "dist": "ddp"},
        {"gpus": 2, "dist": "fsdp2", "device": "cpu", "seq_len": 32},
    ):
        spec = CellSpec.create(**{**BASE, **changes})
        assert CellSpec.from_dict(spec.to_dict()) == spec


# -- DeepSpeed config (no deepspeed needed) -----------------------------------------------------
def test_deepspeed_config_zero2_lora_bf16():
    spec = CellSpec.create(**{**BASE, "batch_size": 2}, gpus=2, dist="deepspeed_zero2", grad_accum=4)
    cfg = deepspeed_config(spec)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 2 * 4 * 2
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert "offload_optimizer" not in cfg["zero_optimization"]
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["zero_optimization"]["overlap_comm"] is False


def test_deepspeed_config_pure_bf16_keeps_masters_and_moments_in_bf16():
    spec = CellSpec.create(
        **{**BASE, "gpus": 4, "dist": "deepspeed_zero3", "method": "full", "precision": "bf16"}
    )
    cfg = deepspeed_config(spec, 4)
    assert cfg["bf16"] == {
        "enabled": True,
        "bf16_master_weights_and_grads": True,
        "bf16_optimizer_states": True,
    }
    mixed = deepspeed_config(
        CellSpec.create(**{**BASE, "gpus": 4, "dist": "deepspeed_zero3", "method": "full"}), 4
    )
    assert mixed["bf16"] == {"enabled": True}


def test_deepspeed_config_zero3_offload_and_precisions():
    full = {**BASE, "method": "full", "gpus": 2, "dist": "deepspeed_zero3"}
    both = deepspeed_config(CellSpec.create(**full, zero_offload="optimizer_and_params"))
    zero = both["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in both["optimizer"]["params"]  # DeepSpeedCPUAdam with offload
    opt_only = deepspeed_config(CellSpec.create(**full, zero_offload="optimizer"))["zero_optimization"]
    assert "offload_optimizer" in opt_only and "offload_param" not in opt_only
    fp16 = deepspeed_config(CellSpec.create(**full, precision="fp16_mixed"))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and not fp16["bf16"]["enabled"]
    fp32 = deepspeed_config(CellSpec.create(**full, precision="fp32"), world_size=4)
    assert not fp32["fp16"]["enabled"] and not fp32["bf16"]["enabled"] and fp32["train_batch_size"] == 4
    fused = deepspeed_config(CellSpec.create(**full, optimizer="adamw_fused"))
    assert fused["optimizer"]["params"]["fused"] is True
    with pytest.raises(ValueError):
        deepspeed_config(CellSpec.create(**BASE, gpus=2, dist="ddp"))


# -- launcher pieces ----------------------------------------------------------------------------
def test_torchrun_command_single_node_and_multi_node(tmp_path):
    spec = CellSpec.create(**{**BASE, "method": "full"}, gpus=4, dist="fsdp2")
    one = torchrun_command(spec, tmp_path / "s.json", tmp_path, LaunchConfig(), 60, "abc")
    assert "--standalone" in one and one[one.index("--nproc-per-node") + 1] == "4"
    assert one[one.index("-m", 2) + 1] == "bench.multigpu.dist"
    env = {
        "FTMEM_NNODES": "2",
        "FTMEM_NODE_RANK": "1",
        "FTMEM_RDZV_ENDPOINT": "node0:29500",
        "FTMEM_RDZV_ID": "j7",
    }
    multi = torchrun_command(spec, tmp_path / "s.json", tmp_path, LaunchConfig.from_env(env), 60, "abc")
    assert "--standalone" not in multi and multi[multi.index("--nproc-per-node") + 1] == "2"
    for flag, value in (("--nnodes", "2"), ("--node-rank", "1"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "node0:29500"), ("--rdzv-id", "j7-abc")):  # fmt: skip
        assert multi[multi.index(flag) + 1] == value


def test_child_env_keeps_nccl_multicast_off_unless_set():
    env = child_env({"NCCL_NVLS_ENABLE": "1"})
    assert env["NCCL_NVLS_ENABLE"] == "1" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert all(child_env()[k] == v for k, v in NCCL_ENV_DEFAULTS.items() if k not in os.environ)


def test_merge_takes_the_max_and_names_the_oom_rank():
    spec = CellSpec.create(**BASE, gpus=2, dist="deepspeed_zero2", budget_gb="rtx4090-24gb")
    records = {
        0: {"rank": 0, "status": "ok", "values": {"peak_allocated_bytes": 5, "fits_budget": True}},
        1: {
            "rank": 1,
            "status": "oom",
            "error": "CUDA out of memory",
            "values": {"peak_allocated_bytes": 9, "oom_phase": "steady", "fits_budget": False},
        },
    }
    row = merge_ranks(spec, records)
    assert row["status"] == "oom" and row["oom_rank"] == 1 and row["oom_phase"] == "steady"
    assert row["peak_allocated_bytes"] == 9 and row["fits_budget"] is False
    assert row["error"].startswith("rank 1:") and check_row(row) == []


def test_host_memory_sampler_sees_a_child_tree(tmp_path):
    import subprocess
    import sys

    from bench.cell.procs import HostMemorySampler

    script = "import subprocess, sys, time; b = bytearray(300 << 20); subprocess.run([sys.executable, '-c',"
    script += " 'b = bytearray(200 << 20); import time; time.sleep(1.5)']); time.sleep(0.2)"
    with HostMemorySampler(interval_s=0.05) as host:
        proc = subprocess.Popen([sys.executable, "-c", script])
        host.watch(proc.pid)
        proc.wait()
    assert host.peak_tree_rss_bytes >= 500 << 20  # parent and grandchild together
    assert 0 < host.min_available_bytes < host.total_bytes


def test_a_sigkilled_rank_on_an_exhausted_host_is_a_host_oom():
    from bench.cell.procs import HostMemorySampler
    from bench.multigpu.launch import host_exhausted

    host = HostMemorySampler()
    host.peak_tree_rss_bytes, host.total_bytes = 250 << 30, 256 << 30
    killed = "exitcode  : -9 (pid: 3018)\n  traceback : Signal 9 (SIGKILL) received by PID 3018"
    host.min_available_bytes = 1 << 30
    assert host_exhausted(host, killed)
    assert not host_exhausted(host, "exitcode  : 1 (pid: 3018)")  # a crash, not the OOM killer
    host.min_available_bytes = 100 << 30
    assert not host_exhausted(host, killed)  # killed with memory to spare: not the OOM killer


# -- real 2-process cells on CPU ----------------------------------------------------------------
def _dist(method="full", dist="ddp", timeout_s=180, **changes):
    spec = CellSpec.create(**{**TINY, "method": method, "gpus": 2, "dist": dist, **changes})
    return spec, run_cell(spec, timeout_s=timeout_s)


@pytest.mark.parametrize("dist", ["ddp", "fsdp2"])
def test_two_rank_cell_on_cpu(dist):
    spec, row = _dist(dist=dist, precision="fp32")
    assert row["status"] == "ok", row["error"]
    assert check_row(row) == [] and set(row) == set(FIELDS) and row["cell_id"] == spec.cell_id
    ranks = row["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["status"] == "ok" for r in ranks)
    for name in ("peak_rss_bytes", "param_bytes", "optimizer_state_bytes", "step_time_s"):
        assert row[name] == max(r[name] for r in ranks) > 0
    assert row["n_params"] >= 229_760
    assert row["host_peak_rss_bytes"] >= 0.9 * row["peak_rss_bytes"]  # the tree holds both ranks
    assert 0 < row["host_min_available_bytes"] < row["host_total_bytes"] and row["host_oom"] is None
    if dist == "fsdp2":  # each rank holds half of the parameters and of AdamW's state
        assert row["param_bytes"] < 0.6 * 4 * row["n_params"]
    else:
        assert row["param_bytes"] >= 4 * row["n_params"] - 4 * 64 * 1024  # tied embeddings counted once


@pytest.mark.parametrize(
    "method, dist, precision",
    [
        ("lora", "deepspeed_zero2", "fp32"),
        ("full", "deepspeed_zero3", "fp32"),
        ("full", "deepspeed_zero3", "bf16"),
    ],
)
def test_deepspeed_cell_on_cpu(method, dist, precision):
    """DeepSpeed's own engine on 2 gloo processes (its CPU accelerator): the ZeRO-3 path builds the
    model in host memory and partitions it, so each rank holds half of the parameters."""
    pytest.importorskip("deepspeed")
    spec, row = _dist(method=method, dist=dist, precision=precision, timeout_s=300)
    assert row["status"] == "ok", row["error"]
    assert [r["status"] for r in row["ranks"]] == ["ok", "ok"] and check_row(row) == []
    whole = row["n_params"] * (2 if precision == "bf16" else 4)
    if dist == "deepspeed_zero3":
        assert row["param_bytes"] <= 0.55 * whole
    else:
        assert (
            row["param_bytes"] >= whole - 4 * 64 * 1024
        )  # every rank holds the model (tied embeddings once)


def test_four_rank_fsdp2_cell_on_cpu():
    """The launch path of the 4-GPU cells (issue 7), here as 4 gloo processes: each rank holds a
    quarter of the parameters."""
    spec = CellSpec.create(**{**TINY, "method": "full", "gpus": 4, "dist": "fsdp2", "precision": "fp32"})
    row = run_cell(spec, timeout_s=300)
    assert row["status"] == "ok", row["error"]
    assert [r["rank"] for r in row["ranks"]] == [0, 1, 2, 3] and all(
        r["status"] == "ok" for r in row["ranks"]
    )
    assert row["param_bytes"] < 0.35 * 4 * row["n_params"]


def test_a_failing_rank_fails_the_cell_and_is_named(monkeypatch):
    monkeypatch.setenv("FTMEM_TEST_FAULT", "oom:first_step")
    monkeypatch.setenv("FTMEM_TEST_FAULT_RANK", "1")
    _, row = _dist(method="lora")
    assert row["status"] == "oom" and row["oom_rank"] == 1 and row["oom_phase"] == "first_step"
    assert row["ranks"][1]["status"] == "oom" and row["error"].startswith("rank 1:")


def test_a_hung_rank_hits_the_timeout_and_every_process_is_killed(monkeypatch):
    mark = uuid.uuid4().hex
    monkeypatch.setenv("FTMEM_TEST_MARK", mark)
    monkeypatch.setenv("FTMEM_TEST_FAULT", "hang:first_step")
    monkeypatch.setenv("FTMEM_TEST_FAULT_RANK", "1")
    _, row = _dist(method="lora", timeout_s=25)
    assert row["status"] == "timeout" and "25" in row["error"]
    assert "ftmem: build done after" in row["error"]  # the log's tail: how far the ranks got
    assert 25 <= row["cell_wall_time_s"] < 90 and check_row(row) == []
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FTMEM_TEST_MARK") == mark and proc.pid != os.getpid():
                left.append(proc)
        except psutil.Error:
            pass
    assert not left, [p.cmdline() for p in left]
