"""Multi-GPU cells in the predictor (per-rank sharding terms), the accuracy table and the claims.

Hand-computed values use qwen3-tiny (h=64, I=192, 2 layers, head_dim 16, V=1024, untied lm_head):
one decoder layer = 49,152 projection weights + 160 norm weights = 49,312 parameters; the root
(embedding, lm_head, final norm) = 2 x 1024 x 64 + 64 = 131,136; the model 229,760. LoRA r 8 on all
seven projections: 9,728 adapter parameters per layer, 19,456 in all. And Qwen3-14B: one layer
330,311,936 parameters, the root 1,555,829,760, the model P = 14,768,307,200.
Every row here is constructed, none is a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import accuracy as acc
from analysis import claims as C
from analysis import predict as pr
from analysis.load import describe_spec, rows_to_frame
from bench.cards import GIB
from bench.schema import new_row
from bench.spec import CellSpec

TINY = dict(model="qwen3-tiny", seq_len=32, batch_size=2)
Q14 = dict(model="qwen3-14b", seq_len=2048, batch_size=1, gradient_checkpointing=True)
TINY_ALL, TINY_LAYER, TINY_ROOT, TINY_LORA = 229_760, 49_312, 131_136, 19_456
P14 = 14_768_307_200
CUBLAS = 2 * 32 * 2**20


def predict(**kw) -> pr.Prediction:
    return pr.predict(CellSpec.create(**kw))


# -- the terms, by hand ----------------------------------------------------------------------------
def test_counts_of_the_tiny_and_14b_models():
    st = pr.setup(CellSpec.create(**TINY, method="full"))
    assert (pr.layer_elements(st), pr.root_elements(st)) == (TINY_LAYER, TINY_ROOT)
    assert pr.trainable_elements(st)[0] == TINY_ALL == 2 * TINY_LAYER + TINY_ROOT
    big = pr.setup(CellSpec.create(**Q14, method="full"))
    assert (pr.layer_elements(big), pr.root_elements(big)) == (330_311_936, 1_555_829_760)
    assert pr.trainable_elements(big)[0] == P14 == 40 * 330_311_936 + 1_555_829_760


def test_ddp_adds_one_copy_of_the_grads_in_buckets():
    for method, grads in (("full", 4 * TINY_ALL), ("lora", 4 * TINY_LORA)):  # fp32 weights / adapters
        single = predict(**TINY, method=method)
        ddp = predict(**TINY, method=method, gpus=2, dist="ddp")
        assert ddp.components["ddp_grad_buckets"] == grads
        assert ddp.peak_allocated_bytes == single.peak_allocated_bytes + grads
        assert ddp.peak_phase == single.peak_phase
        assert ddp.outside_allocated["nccl_buffers"] == pr.DIST_ESTIMATES["nccl_bytes"]
        assert ddp.nvml_process_bytes == single.nvml_process_bytes + grads + pr.DIST_ESTIMATES["nccl_bytes"]


def test_fsdp2_tiny_full_mixed_shards_and_unsharded_copies():
    """fp32 shards (4 B) and fp32 AdamW state (8 B) over 2 ranks; bf16 unsharded root and two layers."""
    p = predict(**TINY, method="full", gpus=2, dist="fsdp2")
    step = p.phases["optimizer_step"]
    assert step == CUBLAS + 4 * TINY_ALL // 2 + 8 * TINY_ALL // 2 + 4 * TINY_ALL // 2 + 4 * TINY_ALL // 2
    st = pr.setup(CellSpec.create(**TINY, method="full", gpus=2, dist="fsdp2"))
    cst = pr.compute_setup(st)
    assert (cst.base, cst.other, cst.autocast) == ("bf16", "bf16", "bf16")
    assert pr.fsdp2_gathered_bytes(st, cst) == {
        "fsdp_unsharded_root": 2 * TINY_ROOT,
        "fsdp_unsharded_layers": 2 * 2 * TINY_LAYER,
    }
    grads = pr.fsdp2_grad_terms(st, cst, 2, "first_layer_backward")
    # lm_head + final norm unsharded in bf16; layer 1 reduced (fp32, 1/2); layer 0 in flight: bf16 + fp32
    assert grads == {
        "fsdp_unsharded_root_grads": 2 * (1024 * 64 + 64),
        "fsdp_sharded_grads": 4 * TINY_LAYER // 2,
        "fsdp_layer_grads_in_flight": (2 + 4) * TINY_LAYER,
    }


def test_zero2_tiny_lora_replicates_half_weights_and_shards_the_optimizer():
    st = pr.setup(CellSpec.create(**TINY, method="lora", gpus=2, dist="deepspeed_zero2"))
    cst = pr.compute_setup(st)
    assert (cst.base, cst.adapter, cst.autocast) == ("bf16", "bf16", None)  # the engine's bf16 module
    terms = pr.zero_state_terms(st, cst, 2, "optimizer_step")
    assert terms["replicated_params_bf16"] == 2 * (TINY_ALL + TINY_LORA)
    assert terms["zero_fp32_master_partition"] == 4 * TINY_LORA // 2
    assert terms["zero_adam_partition"] == 8 * TINY_LORA // 2
    assert terms["zero2_grad_partition"] == 2 * TINY_LORA // 2
    assert terms["zero_fp32_grads"] == terms["optimizer_transient"] == 4 * TINY_LORA // 2
    # the ipg buffer (reduce_bucket_size of bench.multigpu.deepspeed_config, bf16) exists only inside the backward
    assert "zero_ipg_bucket" not in terms
    backward = pr.zero_state_terms(st, cst, 2, "last_layer_backward")
    assert backward["zero_ipg_bucket"] == 500_000_000 * 2


def test_zero2_ipg_bucket_lives_from_the_first_gradient_hook_to_the_backward_epilogue():
    """DeepSpeed 0.19 stage_1_and_2.py: setup_buckets allocates the ipg buffer from the first parameter's
    gradient hook and the backward's epilogue releases it: not in the forward, the loss backward (no
    parameter grad yet) or the optimizer step; in the layers' backward; in lm_head's only when it trains."""
    bucket = 500_000_000 * 2
    for method, head_trains in (("lora", False), ("full", True)):
        st = pr.setup(CellSpec.create(**TINY, method=method, gpus=2, dist="deepspeed_zero2"))
        cst = pr.compute_setup(st)
        held = {
            m: pr.zero_state_terms(st, cst, 2, m).get("zero_ipg_bucket", 0)
            for m in ("forward_end", "loss_backward", "lm_head_backward", "last_layer_backward")
            + ("first_layer_backward", "optimizer_step")
        }
        assert held == {
            "forward_end": 0,
            "loss_backward": 0,
            "lm_head_backward": bucket if head_trains else 0,
            "last_layer_backward": bucket,
            "first_layer_backward": bucket,
            "optimizer_step": 0,
        }
    # ZeRO-3 keeps its (estimated) resident bucket
    st = pr.setup(CellSpec.create(**TINY, method="lora", gpus=2, dist="deepspeed_zero3"))
    assert pr.zero_state_terms(st, pr.compute_setup(st), 2, "optimizer_step")["zero_ipg_bucket"] == bucket


def test_measured_zero2_row():
    """The Qwen3-14B LoRA r8 bf16_mixed seq 2048 b1 GC ZeRO-2 x2 row (per rank 34.48 GB, peak in the loss
    backward): within 0.1% (reached -0.02%; +2.88% when the 1 GB ipg bucket was counted there)."""
    folder = Path(__file__).resolve().parent.parent / "results" / "nvidia-h200-x2"
    rows = [
        r
        for r in (acc.load_rows(folder) if folder.exists() else [])
        if r["status"] == "ok" and r["spec"].get("dist") == "deepspeed_zero2"
    ]
    if not rows:
        pytest.skip("measured rows not present")
    for row in rows:
        pred = pr.predict(row["spec"])
        assert abs(pred.peak_allocated_bytes / row["peak_allocated_bytes"] - 1) < 0.001, row["spec"]
        assert "zero_ipg_bucket" not in pred.components


def test_zero3_qwen3_14b_full_mixed_on_4_gpus():
    """(4 + 8) B x P / 4 of fp32 master and Adam, the bf16 grad and parameter partitions (2 B x P / 4, the
    norms whole), the 1 GB ipg bucket, and at the step one sub-group's fp32 grads and sqrt temporary."""
    p = predict(**Q14, method="full", precision="bf16_mixed", gpus=4, dist="deepspeed_zero3")
    persistent = 2 * (40 * (2 * 5120 + 2 * 128) + 5120)
    expected = {
        "cublas_workspace": CUBLAS,
        "zero_fp32_master_partition": 4 * P14 // 4,
        "zero_adam_partition": 8 * P14 // 4,
        "zero3_param_partition": (2 * P14 - persistent) // 4,
        "zero3_persistent_params": persistent,
        "zero_ipg_bucket": 10**9,
        "zero3_grad_partition": 2 * P14 // 4,
        "zero_fp32_grads": 4 * 10**9,
        "optimizer_transient": 4 * 10**9,
    }
    assert p.peak_phase == "optimizer_step" and p.components == expected
    assert p.peak_allocated_bytes == sum(expected.values())
    # forward / backward hold the live (gathered) parameters instead: 1e9 elements in bf16
    st = pr.setup(CellSpec.create(**Q14, method="full", gpus=4, dist="deepspeed_zero3"))
    assert pr.zero3_live_elements(st) == 10**9
    assert 60e9 < p.peak_allocated_bytes + pr.CALIBRATION["cuda_context_bytes"] < 80 * 2**30


def test_fsdp2_qwen3_14b_full_mixed_on_4_gpus():
    """fp32 shards: params 4P/4, grads 4P/4, AdamW 8P/4, foreach's sqrt temporary 4P/4 at the step."""
    p = predict(**Q14, method="full", precision="bf16_mixed", gpus=4, dist="fsdp2")
    assert p.peak_phase == "optimizer_step"
    assert p.peak_allocated_bytes == CUBLAS + (4 + 4 + 8 + 4) * P14 // 4
    pure = predict(**Q14, method="full", precision="bf16", gpus=4, dist="fsdp2")
    assert pure.phases["optimizer_step"] == CUBLAS + (2 + 2 + 4 + 2) * P14 // 4


def test_offload_goes_to_host_bytes_not_allocated():
    kw = dict(**Q14, method="full", gpus=2, dist="deepspeed_zero3")
    plain = predict(**kw)
    opt = predict(**kw, zero_offload="optimizer")
    both = predict(**kw, zero_offload="optimizer_and_params")
    assert "host_bytes" not in plain.outside_allocated
    assert opt.outside_allocated["host_bytes"] == 16 * P14 // 2
    assert both.outside_allocated["host_bytes"] == 16 * P14 // 2 + 2 * P14 // 2
    assert "zero_adam_partition" not in opt.components and "zero3_param_partition" not in both.components
    assert both.peak_allocated_bytes < opt.peak_allocated_bytes < plain.peak_allocated_bytes
    # host memory is not GPU memory: the NVML figure leaves it out
    outside = sum(v for k, v in opt.outside_allocated.items() if k not in ("allocator_slack", "host_bytes"))
    assert opt.nvml_process_bytes == opt.peak_reserved_bytes + outside


@pytest.mark.parametrize(
    "method, dist",
    [
        ("full", "fsdp2"),
        ("full", "deepspeed_zero2"),
        ("full", "deepspeed_zero3"),
        ("lora", "fsdp2"),
        ("lora", "deepspeed_zero2"),
        ("lora", "deepspeed_zero3"),
    ],
)
def test_per_rank_memory_never_grows_with_gpus(method, dist):
    peaks = [predict(**Q14, method=method, gpus=n, dist=dist).peak_allocated_bytes for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    if dist != "deepspeed_zero2" or method == "full":
        assert peaks[0] > peaks[-1]


def test_ddp_per_rank_memory_does_not_depend_on_gpus():
    peaks = {predict(**TINY, method="full", gpus=n, dist="ddp").peak_allocated_bytes for n in (1, 2, 4)}
    assert len(peaks) == 1


def test_single_gpu_predictions_ignore_the_dist_terms():
    one = predict(**TINY, method="full")
    assert not any(k.startswith(("fsdp", "zero", "ddp")) for k in one.components)
    assert "nccl_buffers" not in one.outside_allocated and "host_bytes" not in one.outside_allocated


# -- rows: accuracy and claims ---------------------------------------------------------------------
ENV = {"gpu_name": "synthetic-test", "gpu_total_bytes": 150 * 10**9, "torch": "t1"}


def dist_row(status: str = "ok", *, nvml_gib: float | None = None, alloc: int | None = None, **spec) -> dict:
    """A constructed row; multi-GPU rows carry a `ranks` list whose max is the headline."""
    cell = CellSpec.create(**spec)
    values: dict = {
        "budget_bytes": cell.budget_bytes,
        "context_bytes": int(pr.CALIBRATION["cuda_context_bytes"]),
    }
    if status == "ok":
        values["peak_allocated_bytes"] = alloc if alloc is not None else pr.predict(cell).peak_allocated_bytes
        if nvml_gib is not None:
            values["nvml_peak_process_bytes"] = int(nvml_gib * GIB)
    if cell.gpus > 1:
        values["ranks"] = [
            {"rank": r, "status": status, "peak_allocated_bytes": values.get("peak_allocated_bytes")}
            for r in range(cell.gpus)
        ]
        values["nvml_peak_device_bytes"] = cell.gpus * values.get("nvml_peak_process_bytes", 0)
        if status == "oom":
            values["oom_rank"] = 0
    return new_row(cell.to_dict(), cell.cell_id, status, env=ENV, **values)


def test_accuracy_groups_multi_gpu_rows_apart(tmp_path):
    single = dist_row(**TINY, method="full")
    multi = dist_row(**TINY, method="full", gpus=2, dist="fsdp2")
    multi["peak_allocated_bytes"] = int(multi["peak_allocated_bytes"] / 1.05)  # 5% under-measured
    zero = dist_row(**TINY, method="lora", gpus=2, dist="deepspeed_zero2", budget_gb=1.0, status="oom")
    old = dist_row(**TINY, method="lora")
    for key in ("gpus", "dist", "zero_offload"):
        del old["spec"][key]  # a row written before multi-GPU cells existed
    path = tmp_path / "gpu" / "cells.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in (single, multi, zero, old)))
    table = acc.accuracy(tmp_path).set_index("family")
    assert table.loc["full / GC off / sdpa"]["n"] == 1 and table.loc["lora / GC off / sdpa"]["n"] == 1
    line = table.loc["full / GC off / sdpa / fsdp2 x2 (per rank)"]
    assert line["n"] == 1 and line["median"] == pytest.approx(0.05, rel=1e-6)
    assert table.loc["lora / GC off / sdpa / deepspeed_zero2 x2 (per rank)"]["n_verdicts"] == 1
    assert table.loc["all"]["n"] == 3 and table.loc["all single-GPU"]["n"] == 2
    assert table.loc["all multi-GPU (per rank, not yet calibrated)"]["n"] == 1
    assert table.loc["optimizer=adamw"]["n"] == 2  # flag lines: single-GPU rows only


def judge_claim(claim_id: str, *rows: dict) -> C.ClaimResult:
    guide = C.load_guide()
    return C.evaluate_claim(rows_to_frame(list(rows), source="constructed"), guide, guide.claim(claim_id))


FULL = dict(**Q14, method="full", precision="bf16_mixed", budget_gb="h100-80gb")
LORA = dict(**Q14, method="lora", lora_r=8, lora_alpha=16, precision="bf16_mixed")


def test_c13_supported_when_zero3_fits_where_one_gpu_ran_out():
    base = dist_row("oom", **FULL)
    zero3 = dist_row(**FULL, gpus=4, dist="deepspeed_zero3", nvml_gib=66.0)
    result = judge_claim("C13", base, zero3)
    assert result.verdict == "supported in part"  # the ZeRO-2 part has no rows
    assert "1 GPU OOM" in result.figures and "constructed:2" in result.rows


def test_c13_refuted_when_zero2_holds_more_per_card():
    base = dist_row(**LORA, nvml_gib=34.0)
    zero2 = dist_row(**LORA, gpus=2, dist="deepspeed_zero2", nvml_gib=35.5)
    zero3 = dist_row(**LORA, gpus=2, dist="deepspeed_zero3", nvml_gib=24.0)
    assert judge_claim("C13", base, zero3).verdict == "supported in part"  # ZeRO-2 not measured
    result = judge_claim("C13", base, zero2, zero3)
    assert result.verdict == "mixed"  # "stage 2 or 3": each stage judged and reported apart (issue 15)
    assert [c.verdict for c in result.checks] == ["refuted", "supported"]
    assert "ZeRO-2: 34.00 -> 35.50 per card" in result.headline and "refuted; ZeRO-3" in result.headline
    assert "2x deepspeed_zero2 vs 1 GPU" in result.checks[0].summary
    assert "2x deepspeed_zero3 vs 1 GPU" in result.checks[1].summary


def test_c13_judges_by_the_baseline_of_the_same_run_where_there_is_one():
    """Issue 6: the 1-GPU baseline measured in the same call as the multi-GPU cells decides; a
    baseline from another file (another machine or day) counts only when there is none."""
    import pandas as pd

    guide = C.load_guide()
    other_day = rows_to_frame([dist_row(**LORA, nvml_gib=36.0)], source="old.jsonl")
    same_run = rows_to_frame(
        [dist_row(**LORA, nvml_gib=34.0), dist_row(**LORA, gpus=2, dist="deepspeed_zero2", nvml_gib=35.0)],
        source="run.jsonl",
    )
    check = guide.claim("C13").checks[0]
    both = C.check_multi_gpu(pd.concat([other_day, same_run], ignore_index=True), check)
    assert both.verdict == "refuted" and "run.jsonl:2 vs run.jsonl:1" in both.summary
    assert "1 pair" in both.summary  # the other day's baseline (36 GiB) would have said "supported"
    alone = C.check_multi_gpu(pd.concat([other_day, same_run.iloc[1:]], ignore_index=True), check)
    assert alone.verdict == "supported" and "old.jsonl:1" in alone.summary
    later = rows_to_frame([dict(dist_row(**LORA, nvml_gib=36.0), env={**ENV, "git_commit": "b"})], source="run.jsonl")
    mixed = C.check_multi_gpu(pd.concat([same_run.iloc[1:], later], ignore_index=True), check)
    assert mixed.verdict == "supported"  # one file, but another commit: still the only baseline there is


def test_c13_needs_a_baseline_and_multi_gpu_rows():
    assert judge_claim("C13", dist_row(**LORA, nvml_gib=34.0)).verdict == "not measured"
    lonely = judge_claim("C13", dist_row(**LORA, gpus=2, dist="deepspeed_zero3", nvml_gib=24.0))
    assert lonely.verdict == "not measured" and "baseline" in lonely.figures


def test_c7_multi_card_part_and_single_card_part_stay_apart():
    base = dist_row("oom", **FULL)
    fits4 = dist_row(**FULL, gpus=4, dist="fsdp2", nvml_gib=72.0)
    result = judge_claim("C7", base, fits4)
    kinds = {c.kind: c.verdict for c in result.checks}
    assert kinds["fits_budget"] == "supported"  # the 4-GPU row does not count as one card
    assert kinds["multi_gpu"] == "supported"
    oom2 = dist_row("oom", **FULL, gpus=2, dist="deepspeed_zero3")
    assert {c.kind: c.verdict for c in judge_claim("C7", base, oom2).checks}["multi_gpu"] == "refuted"


def test_c19_two_24gb_cards_and_c20_zero2():
    small = dict(LORA, budget_gb="rtx4090-24gb")
    fits = dist_row(**small, gpus=2, dist="deepspeed_zero3", nvml_gib=21.0)
    assert {c.kind: c.verdict for c in judge_claim("C19", fits).checks}["multi_gpu"] == "supported"
    assert judge_claim("C20", fits).verdict == "not measured"  # C20 is about ZeRO-2
    zero2 = dist_row(**LORA, gpus=2, dist="deepspeed_zero2", nvml_gib=38.0, budget_gb="h100-80gb")
    assert judge_claim("C20", zero2).verdict == "supported"


def test_loaded_rows_default_to_one_gpu_and_describe_the_strategy():
    old = dist_row(**LORA, nvml_gib=34.0)
    for key in ("gpus", "dist", "zero_offload"):
        del old["spec"][key]
    multi = dist_row(**FULL, gpus=2, dist="deepspeed_zero3", zero_offload="optimizer", nvml_gib=25.0)
    df = rows_to_frame([old, multi])
    assert list(df["gpus"]) == [1, 2] and list(df["dist"]) == ["none", "deepspeed_zero3"]
    assert list(df["multi_gpu"]) == [False, True] and df.loc[0, "spec"]["gpus"] == 1
    assert describe_spec(df.loc[1, "spec"]).endswith("2x deepspeed_zero3 offload optimizer")


def test_report_tables_take_multi_gpu_rows():
    from analysis import tables

    rows = [dist_row("oom", **FULL), dist_row(**FULL, gpus=4, dist="deepspeed_zero3", nvml_gib=66.0)]
    df = rows_to_frame(rows, source="constructed")
    cells = tables.cells_table(df)
    assert list(cells["GPUs"]) == [1, 4]
    vs = tables.measured_vs_predicted(df, pr.predict)
    assert set(vs["measure"]) == {"allocated", "NVML process"} and abs(vs["error_pct"]).max() < 50
    guide = C.load_guide()
    results = C.evaluate_claims(df, guide)
    scenario = tables.guide_table(df, guide, results, "method", pr.predict).set_index("claim")
    assert scenario.loc["C7", "verdict"] == "supported in part"  # 80-120 GB not measured


def test_zero3_pure_bf16_keeps_bf16_masters_and_moments():
    mixed = predict(**Q14, method="full", precision="bf16_mixed", gpus=4, dist="deepspeed_zero3")
    pure = predict(**Q14, method="full", precision="bf16", gpus=4, dist="deepspeed_zero3")
    p = 14_768_307_200  # Qwen3-14B parameters
    assert pure.components["zero_bf16_master_partition"] == 2 * p // 4
    assert pure.components["zero_adam_partition"] == 4 * p // 4
    assert pure.peak_allocated_bytes < mixed.peak_allocated_bytes


def test_accuracy_takes_no_fit_verdict_from_a_host_oom():
    """ZeRO-Offload that ran out of host memory says nothing of the GPU budget the predictor judges."""
    from analysis.accuracy import evaluate

    gpu_oom = dist_row("oom", **FULL, gpus=2, dist="deepspeed_zero3")
    host_oom = dist_row("oom", **FULL, gpus=2, dist="deepspeed_zero3", zero_offload="optimizer")
    host_oom["host_oom"] = True
    assert evaluate(gpu_oom)["measured_fit"] is False
    assert evaluate(host_oom) is None
