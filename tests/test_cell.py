"""Real cells of a tiny Qwen3 on CPU, each in a fresh process through bench.cell.runner."""

import pytest

from bench.cell.runner import run_cell
from bench.schema import FIELDS, SCHEMA_VERSION, check_row
from bench.spec import CellSpec
from tests.conftest import TINY


def _run(method, timeout_s=120, **changes):
    spec = CellSpec.create(**{**TINY, "method": method, **changes})
    return spec, run_cell(spec, timeout_s=timeout_s)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_real_cell_runs_and_records_a_complete_row(method):
    spec, row = _run(method, precision="fp32" if method == "full" else "bf16_mixed")
    assert row["status"] == "ok", row["error"]
    assert check_row(row) == [] and row["schema_version"] == SCHEMA_VERSION
    assert CellSpec.from_dict(row["spec"]) == spec and row["cell_id"] == spec.cell_id
    assert row["peak_rss_bytes"] > row["baseline_rss_bytes"] > 0
    assert row["step_time_s"] > 0 and row["tokens_per_s"] > 0 and len(row["step_times_s"]) == spec.steps
    assert row["param_bytes"] > 0 and row["n_params"] >= 229_760
    assert {"imports", "weights", "prepare", "wrap"} <= set(row["build_breakdown_s"])
    assert sum(row["build_breakdown_s"].values()) <= row["build_time_s"] + 0.01
    assert row["env"]["torch"] and row["env"]["python"] and row["env"]["started_at"]
    trainable = row["n_trainable_params"]
    if method == "full":
        # AdamW: exp_avg and exp_avg_sq like the params, plus a 4-byte step counter per tensor.
        extra = row["optimizer_state_bytes"] - 2 * row["trainable_param_bytes"]
        assert trainable == 229_760 and 0 <= extra <= 4 * 32
    else:
        # LoRA r=8 on the seven projections of two layers: far fewer than the base.
        assert 0 < trainable < 50_000


def test_qlora_uses_4bit_base_and_the_fp32_upcast_costs_memory():
    _, up = _run("qlora", kbit_fp32_upcast=True)
    _, plain = _run("qlora", kbit_fp32_upcast=False)
    _, lora = _run("lora")
    assert up["status"] == plain["status"] == lora["status"] == "ok"
    # Upcast: embeddings and lm_head go from bf16 to fp32 (2 x 1024 x 64 x 2 extra bytes at least).
    assert up["param_bytes"] - plain["param_bytes"] >= 2 * 1024 * 64 * 2
    # 4-bit linear layers take less than their bf16 copies.
    assert plain["param_bytes"] < lora["param_bytes"]


@pytest.mark.parametrize("phase", ["build", "first_step", "steady"])
def test_oom_is_a_row_with_its_phase(monkeypatch, phase):
    monkeypatch.setenv("FTMEM_TEST_FAULT", f"oom:{phase}")
    _, row = _run("lora")
    assert row["status"] == "oom" and row["oom_phase"] == phase
    assert row["oom_requested_bytes"] == 2 * 2**30
    assert "out of memory" in row["error"]


def test_error_is_a_row_with_the_message(monkeypatch):
    monkeypatch.setenv("FTMEM_TEST_FAULT", "error:first_step")
    _, row = _run("lora")
    assert row["status"] == "error" and "injected failure" in row["error"]
    assert row["build_time_s"] is not None  # what was measured before the failure is kept


def test_timeout_kills_the_cell_and_still_writes_a_row(monkeypatch):
    monkeypatch.setenv("FTMEM_TEST_FAULT", "hang:build")
    spec, row = _run("lora", timeout_s=15)
    assert row["status"] == "timeout" and "15" in row["error"]
    assert row["cell_id"] == spec.cell_id and row["env"]["python"]
    assert 15 <= row["cell_wall_time_s"] < 60
    assert set(row) == set(FIELDS)


def test_a_killed_worker_gives_an_error_row(monkeypatch):
    # A worker killed outright (segfault, kernel OOM killer) writes no row: the parent does.
    monkeypatch.setenv("FTMEM_TEST_FAULT", "crash:first_step")
    _, row = _run("lora")
    assert row["status"] == "error" and "exited with code -9" in row["error"]


def test_weights_drawn_on_another_device_land_on_the_target():
    """What a ZeRO-3 cell does (GPU random numbers, host-memory model), here on the CPU alone."""
    import torch

    from bench.model.build import build_model

    spec = CellSpec(**{**TINY, "method": "lora", "device": "cpu", "precision": "fp32"})
    same = build_model(spec, torch.device("cpu"))
    drawn = build_model(spec, torch.device("cpu"), init_device=torch.device("cpu"))
    for (name, a), (_, b) in zip(same.named_parameters(), drawn.named_parameters(), strict=True):
        assert b.device.type == "cpu", name
        if "lora_" not in name:  # adapters come from peft's own (global) random numbers
            assert torch.equal(a, b), name


@pytest.mark.gpu
def test_weights_drawn_on_the_gpu_for_a_host_memory_model():
    import torch

    from bench.model.build import build_model

    spec = CellSpec(**{**TINY, "method": "lora", "device": "cpu", "precision": "fp32"})
    model = build_model(spec, torch.device("cpu"), init_device=torch.device("cuda", 0))
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.gpu
def test_lora_adapters_are_made_on_the_gpu():
    import torch

    from bench.model.build import build_model

    spec = CellSpec(**{**TINY, "method": "lora", "device": "cuda", "precision": "bf16_mixed"})
    model = build_model(spec, torch.device("cuda", 0))
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.device.type == "cuda" and p.dtype == torch.float32 for p in adapters)


def test_sdpa_flash_holds_sdpa_to_its_flash_kernels():
    import torch

    from bench.model.build import hf_attn_impl
    from bench.model.train import Stepper

    spec = CellSpec(**{**TINY, "device": "cuda", "method": "lora", "attn_impl": "sdpa_flash"})
    assert hf_attn_impl(spec) == "sdpa"
    stepper = Stepper(spec, torch.nn.Linear(2, 2), None, torch.device("cpu"))
    with stepper._attention():
        assert not torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()  # restored afterwards
    plain = Stepper(CellSpec(**{**TINY, "method": "lora"}), torch.nn.Linear(2, 2), None, torch.device("cpu"))
    with plain._attention():
        assert torch.backends.cuda.math_sdp_enabled()


@pytest.mark.gpu
def test_sdpa_flash_cell_on_the_gpu():
    spec = CellSpec(
        **{**TINY, "device": "cuda", "method": "lora", "attn_impl": "sdpa_flash", "precision": "bf16_mixed"}
    )
    row = run_cell(spec, timeout_s=300)
    assert row["status"] == "ok", row["error"]
    assert row["attn_impl_used"] == "sdpa"


@pytest.mark.gpu
def test_a_budget_of_the_cards_own_size_runs_uncapped_and_a_larger_one_is_refused():
    """nvidia-smi's total (the card's size) is a little more than torch's total_memory: a budget of the
    card itself must run, not fail as 'cannot be emulated'; a budget over the card is an error."""
    from bench.cell import nvml

    card = nvml.device_info()["total_bytes"]
    base = {**TINY, "device": "cuda", "method": "lora", "precision": "bf16_mixed"}
    row = run_cell(CellSpec(**{**base, "budget_gb": card / 1e9}), timeout_s=300)
    assert row["status"] == "ok", row["error"]
    over = run_cell(CellSpec(**{**base, "budget_gb": card * 1.01 / 1e9}), timeout_s=300)
    assert over["status"] == "error" and "budget_gb" in over["error"] and "at most the card" in over["error"]


@pytest.mark.gpu
def test_expandable_segments_cell_runs_with_the_allocator_option_on():
    spec = CellSpec(**{**TINY, "device": "cuda", "method": "lora", "precision": "bf16_mixed", "expandable_segments": True})
    for preload in (False, True):
        row = run_cell(spec, timeout_s=300, preload=preload)
        assert row["status"] == "ok", row["error"]
        assert "expandable_segments:True" in row["env"]["pytorch_cuda_alloc_conf"]


@pytest.mark.gpu
def test_allocator_settings_take_effect_after_torch_is_imported():
    """A forked cell imports torch before its spec is known: the setter must still switch segments."""
    import subprocess
    import sys

    code = (
        "import torch; from bench.cell.measure import allocator_settings; "
        "allocator_settings('expandable_segments:True'); x = torch.empty(2**20, device='cuda'); "
        "print(sorted({bool(s.get('is_expandable')) for s in torch.cuda.memory_snapshot()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[True]"
