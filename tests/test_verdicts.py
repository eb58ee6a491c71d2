"""Issue 15's verdict rules: one rule for every saving claim, claims judged on the configuration they
name, alternatives (ZeRO stage 2 or 3) judged apart, the deciding row named by its cell_id, one unit.

Every row here is constructed (tests/test_report.make_row); none of it is a measurement.
"""

from __future__ import annotations

import pytest

from analysis import claims as C
from analysis.tables import claims_table
from tests.test_report import frame, make_row


def judge_claim(claim_id: str, *rows: dict) -> C.ClaimResult:
    guide = C.load_guide()
    return C.evaluate_claim(frame(*rows), guide, guide.claim(claim_id))


@pytest.mark.parametrize(
    "saved, low, high, verdict",
    [
        (0.0, 0, None, "marginal"),  # C9's "saves 0.0%" and C10's "-0.3%" read alike
        (-0.3, 0, None, "marginal"),
        (1.9, 0, None, "marginal"),
        (4.3, 0, None, "supported"),
        (-4.0, 0, None, "refuted"),
        (40.4, 30, 40, "marginal"),
        (38.5, 30, 40, "marginal"),  # near the edge from inside too: the same rule both sides
        (35.0, 30, 40, "supported"),
        (25.0, 30, 40, "refuted"),
        (45.0, 30, 40, "refuted"),
    ],
)
def test_one_saving_rule_either_side_of_an_edge(saved, low, high, verdict):
    assert C.saving_verdict(saved, low, high) == verdict


def test_c9_and_c10_judge_a_saving_near_zero_alike():
    compile_off = make_row(alloc=30, nvml=34.26)
    compile_on = make_row(alloc=30, nvml=34.37, compile=True)  # -0.3%
    sdpa = make_row(alloc=30, nvml=34.25, seq_len=1024)
    flash = make_row(alloc=30, nvml=34.25, seq_len=1024, attn_impl="sdpa_flash")  # 0.0%
    assert judge_claim("C10", compile_off, compile_on).verdict == "marginal"
    c9 = judge_claim("C9", sdpa, flash)
    assert c9.verdict == "marginal" and "saves 0.0%" in c9.headline


def test_a_claim_is_judged_on_the_knobs_it_names_not_on_the_best_of_others():
    """C4 (room for batch 2+ at 2048 on a 40 GB card) and C2 (every batch 1-4 fits 40 GB) name no
    attention or fused cross-entropy: rows at ftmem's defaults decide both, never a fused-CE row."""
    default = make_row(alloc=45, nvml=50, batch_size=4)
    fused = make_row(alloc=32, nvml=36, batch_size=4, fused_ce=True)
    eager = make_row(alloc=50, nvml=57, batch_size=4, attn_impl="eager")
    c4 = judge_claim("C4", default, fused, eager)
    assert c4.checks[0].verdict == "refuted" and c4.checks[0].decided_by == (default["cell_id"],)
    assert judge_claim("C4", fused).checks[0].verdict == "not measured"  # fused CE is not C4's setup


def test_a_knob_not_applying_to_a_method_matches_its_default():
    qlora = make_row(alloc=15, nvml=17, method="qlora", lora_r=64)  # kbit_fp32_upcast true
    lora = make_row(alloc=28, nvml=30)  # kbit_fp32_upcast null: not a k-bit model
    no_upcast = make_row(alloc=12, nvml=13, method="qlora", lora_r=64, kbit_fp32_upcast=False)
    assert judge_claim("C18", qlora, no_upcast).decided_by == (qlora["cell_id"],)
    assert judge_claim("C1", lora).verdict == "refuted"  # the LoRA row is not filtered away
    column = frame(lora, qlora)["kbit_fp32_upcast"]
    assert list(C.condition_mask(column, [True, None])) == [True, True]


def test_c13_judges_each_stage_and_reports_both():
    lora = dict(seq_len=2048, batch_size=1)
    base = make_row(alloc=30, nvml=34.26, **lora)
    zero2 = make_row(alloc=30, nvml=34.94, gpus=2, dist="deepspeed_zero2", **lora)
    zero3 = make_row(alloc=22, nvml=26.47, gpus=2, dist="deepspeed_zero3", **lora)
    result = judge_claim("C13", base, zero2, zero3)
    assert [c.label for c in result.checks] == ["ZeRO-2", "ZeRO-3"]
    assert [c.verdict for c in result.checks] == ["marginal", "supported"]  # -2.0% is within the margin
    assert result.verdict == "mixed"
    assert (
        "ZeRO-2: 34.26 -> 34.94 per card" in result.headline and "ZeRO-3: 34.26 -> 26.47" in result.headline
    )
    assert set(result.decided_by) == {base["cell_id"], zero2["cell_id"], zero3["cell_id"]}
    agreeing = make_row(alloc=22, nvml=26.0, gpus=2, dist="deepspeed_zero2", **lora)
    assert judge_claim("C13", base, agreeing, zero3).verdict == "supported"


def test_headlines_use_gib_only_and_convert_the_guides_gb():
    lora_b2 = make_row(alloc=30, nvml=31.58, batch_size=2, seq_len=512)
    c16 = judge_claim("C16", lora_b2)
    assert c16.headline == "31.6 vs guide 20.5-21.4"  # 22-23 GB = 20.5-21.4 GiB
    table = claims_table([c16, judge_claim("C1", make_row(alloc=28, nvml=30.3))])
    assert not table["measured"].str.contains("GB|GiB").any()
    assert list(table["decided by"]) == [lora_b2["cell_id"], make_row(alloc=28, nvml=30.3)["cell_id"]]


def test_saving_names_the_pair_nearest_the_median():
    base = make_row(alloc=60, nvml=60, gradient_checkpointing=False)
    on = make_row(alloc=39, nvml=39)  # 35%
    check = {
        "kind": "saving_percent",
        "flag": "gradient_checkpointing",
        "from": False,
        "to": True,
        "min_pct": 30,
    }
    result = C.check_saving(frame(base, on), check)
    assert result.decided_by == (base["cell_id"], on["cell_id"]) and "nearest the median" in result.summary
