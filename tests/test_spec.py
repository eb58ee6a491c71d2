import pytest

from bench.cards import CARD_MIB, budget_bytes
from bench.model.registry import ARCHITECTURES, architecture, lora_parameter_count, parameter_counts
from bench.spec import CellSpec, SpecError

BASE = {"model": "qwen3-14b", "method": "lora", "seq_len": 2048, "batch_size": 1}


def test_cell_id_is_stable_and_depends_on_every_knob():
    a = CellSpec.create(**BASE)
    assert a.cell_id == CellSpec.create(**BASE).cell_id
    assert a.cell_id != CellSpec.create(**BASE, gradient_checkpointing=True).cell_id
    assert len(a.cell_id) == 16


def test_spec_round_trips_through_its_dict():
    spec = CellSpec.create(**BASE, lora_targets=["q_proj", "v_proj"], budget_gb="rtx4090-24gb")
    again = CellSpec.from_dict(spec.to_dict())
    assert again == spec and again.cell_id == spec.cell_id


def test_irrelevant_fields_are_normalised():
    full = CellSpec.create(**{**BASE, "method": "full"}, lora_r=64)
    assert full.lora_r is None and full.quant_type is None and full.kbit_fp32_upcast is None
    assert full.cell_id == CellSpec.create(**{**BASE, "method": "full"}).cell_id
    assert CellSpec.create(**BASE, budget_gb=24).budget_gb == 24.0


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"method": "lorra"}, "method"),
        ({"precision": "fp8"}, "precision"),
        ({"seq_len": 0}, "seq_len"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"seq_len": "2048"}, "seq_len"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
        ({"model": "llama-7b"}, "model"),
        ({"lora_targets": ["q_proj", "qkv"]}, "lora_targets"),
        ({"budget_gb": "rtx9090"}, "budget_gb"),
        ({"budget_gb": -1}, "budget_gb"),
        ({"attn_impl": "flash_attention_2", "precision": "fp32"}, "attn_impl"),
        ({"device": "cpu", "optimizer": "paged_adamw_8bit"}, "optimizer"),
        ({"device": "cpu", "attn_impl": "flash_attention_2"}, "attn_impl"),
        ({"attn_impl": "sdpa_flash", "precision": "fp32"}, "attn_impl"),
        ({"device": "cpu", "attn_impl": "sdpa_flash"}, "attn_impl"),
        ({"device": "cpu", "budget_gb": 24}, "budget_gb"),
        ({"seq_len": 10**6}, "seq_len"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_specs_name_key_value_and_what_is_allowed(changes, key):
    with pytest.raises(SpecError) as err:
        CellSpec.create(**{**BASE, **changes})
    assert err.value.key == key
    shown = "qkv" if key == "lora_targets" else changes[key]  # the offending element of a list
    assert key in str(err.value) and repr(shown) in str(err.value)


def test_required_keys():
    with pytest.raises(SpecError, match="seq_len"):
        CellSpec.create(model="qwen3-14b", method="lora", batch_size=1)


def test_named_card_budget_is_nvidia_smi_total():
    assert budget_bytes("rtx4090-24gb") == 24564 * 2**20
    assert budget_bytes(24) == 24 * 10**9
    assert budget_bytes("rtx4090-24gb") - budget_bytes(24) > 1.5 * 2**30
    assert CARD_MIB["h100-80gb"] == 81559


def test_shipped_architectures_match_published_sizes():
    # Published totals: 0.6B, 1.7B, 4.0B, 8.2B, 14.8B, 32.8B parameters.
    expected = {
        "qwen3-0.6b": 0.596,
        "qwen3-1.7b": 1.721,
        "qwen3-4b": 4.022,
        "qwen3-8b": 8.191,
        "qwen3-14b": 14.768,
        "qwen3-32b": 32.762,
    }
    for name, billions in expected.items():
        assert round(parameter_counts(ARCHITECTURES[name])["total"] / 1e9, 3) == billions
    assert architecture("qwen3-14b")["vocab_size"] == 151936


def test_lora_parameter_count_qwen3_14b_r8():
    arch = ARCHITECTURES["qwen3-14b"]
    # r * (in + out) per projection, 40 layers.
    per_layer = 8 * ((5120 + 5120) * 2 + (5120 + 1024) * 2 + (5120 + 17408) * 2 + (17408 + 5120))
    assert (
        lora_parameter_count(
            arch, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        )
        == 40 * per_layer
    )


def test_cell_ids_of_published_results_never_change():
    """Resuming a sweep matches rows by cell_id: a new spec field must not change old ids."""
    lora_gc_off = CellSpec.create(**BASE, precision="bf16_mixed", gradient_checkpointing=False)
    assert lora_gc_off.cell_id == "526a5bd9fc1004a6"  # results/nvidia-h200-x1/foundation.jsonl, line 1


def test_every_shipped_row_spec_rebuilds_to_its_cell_id():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "results"
    for path in root.glob("**/*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["status"] != "invalid":
                assert CellSpec.from_dict(row["spec"]).cell_id == row["cell_id"], (path, row["cell_id"])


def test_expandable_segments_defaults_off_keeps_cell_ids_and_needs_cuda():
    base = {"model": "qwen3-14b", "method": "lora", "seq_len": 2048, "batch_size": 1}
    plain = CellSpec.create(**base, precision="bf16_mixed", gradient_checkpointing=False)
    assert plain.expandable_segments is False and plain.cell_id == "526a5bd9fc1004a6"  # a published id
    assert CellSpec.create(**base, expandable_segments=False).cell_id == CellSpec.create(**base).cell_id
    assert CellSpec.create(**base, expandable_segments=True).cell_id != CellSpec.create(**base).cell_id
    with pytest.raises(SpecError) as err:
        CellSpec.create(**{**base, "device": "cpu", "seq_len": 32}, expandable_segments=True)
    assert err.value.key == "expandable_segments" and "CUDA" in str(err.value)
    with pytest.raises(SpecError) as err:
        CellSpec.create(**base, expandable_segments="yes")
    assert err.value.key == "expandable_segments"


# -- issue 14 item 7: budgets past any number refused with the allowed range -----------------------
@pytest.mark.parametrize("budget", [float("inf"), float("1e400"), float("nan"), 1e6, 0])
def test_budgets_out_of_range_are_refused_with_the_range(budget):
    with pytest.raises(SpecError) as err:
        CellSpec.create(**{**BASE, "budget_gb": budget})
    assert err.value.key == "budget_gb" and "> 0 and <= 1000" in str(err.value)
    with pytest.raises(ValueError, match="<= 1000"):
        budget_bytes(budget)


# -- issue 14 item 10: counts have a sane upper bound ---------------------------------------------
@pytest.mark.parametrize(
    "key, value", [("batch_size", 1_000_000_000), ("seq_len", 2**21), ("grad_accum", 10**6), ("steps", 10**5)]
)
def test_counts_past_any_real_cell_are_refused(key, value):
    from bench.spec import COUNT_LIMITS

    with pytest.raises(SpecError) as err:
        CellSpec.create(**{**BASE, "model": "qwen3-tiny", key: value})
    assert err.value.key == key and f"<= {COUNT_LIMITS[key]}" in str(err.value)
    assert CellSpec.create(**{**BASE, "model": "qwen3-tiny", "batch_size": COUNT_LIMITS["batch_size"]})


# -- issue 15: `ftmem run --help` lists the values validation accepts, from the same tuples --------
def test_help_of_every_choice_flag_lists_exactly_the_allowed_values():
    import re

    from bench.spec import _CHOICES
    from ftmem.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    helps = {a.dest: a.help for a in run._actions}
    for key, allowed in _CHOICES.items():
        text = helps[key]
        # every value is followed by " |" (after its note, if any), but the last, which follows the last "| "
        listed = re.findall(r"(\w+)(?: \([^)]*\))? \|", text) + re.findall(r"\| (\w+)[^|]*$", text)
        assert listed == list(allowed), (key, text)
    assert "bitsandbytes |" not in helps["optimizer"]  # the old help offered a value never accepted
