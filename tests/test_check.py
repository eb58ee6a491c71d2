"""Tests of `ftmem check` (analysis/check/, ftmem/commands/check.py): reading each tool's config with its
defaults, the spec it maps to, the prediction, verdicts, suggestions, unmodelled keys, bad input. No GPU.

Fixtures (tests/fixtures/check/) are written from the tools' documented keys, one per method across the
formats: LLaMA-Factory QLoRA and full fine-tuning beside a DeepSpeed ZeRO-3 JSON, axolotl LoRA and QLoRA,
TRL LoRA and QLoRA, HF TrainingArguments full fine-tuning beside an accelerate FSDP config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import bench.model.registry
import ftmem.commands.check as check_cli
from analysis.check import ConfigError, check
from analysis.check.advice import Card, verdict
from analysis.check.mapping import _resolve_model
from analysis.check.source import Unmodelled
from analysis.predict import fits_allocated, predict
from bench.cards import CARD_MIB, MIB
from bench.model.registry import LINEAR_PROJECTIONS
from bench.spec import CellSpec
from ftmem.args import spec_from_args
from ftmem.cli import build_parser, main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "check"
ALL = list(LINEAR_PROJECTIONS)
LF_QLORA = dict(
    model="qwen3-8b",
    method="qlora",
    seq_len=2048,
    batch_size=1,
    grad_accum=8,
    precision="bf16_mixed",
    lora_r=8,
    lora_alpha=16,
    lora_targets=ALL,
    lora_dropout=0.0,
    quant_type="nf4",
    double_quant=True,
    quant_compute_dtype="bf16",
    kbit_fp32_upcast=False,
    optimizer="adamw_fused",
    gradient_checkpointing=True,
    gc_reentrant=True,
    attn_impl="sdpa",
    fused_ce=False,
    gpus=1,
    dist="none",
    zero_offload="none",
)
LF_FULL_DS3 = dict(
    model="qwen3-14b",
    method="full",
    seq_len=4096,
    batch_size=1,
    grad_accum=2,
    precision="bf16_mixed",
    optimizer="adamw_fused",
    gradient_checkpointing=True,
    gc_reentrant=True,
    attn_impl="sdpa",
    fused_ce=False,
    gpus=4,
    dist="deepspeed_zero3",
    zero_offload="none",
)
AXOLOTL_LORA = dict(
    model="qwen3-14b",
    method="lora",
    seq_len=2048,
    batch_size=2,
    grad_accum=4,
    precision="bf16_mixed",
    lora_r=16,
    lora_alpha=32,
    lora_targets=ALL,
    lora_dropout=0.05,
    optimizer="adamw_8bit",
    gradient_checkpointing=True,
    gc_reentrant=False,
    attn_impl="flash_attention_2",
    fused_ce=False,
    gpus=1,
    dist="none",
    zero_offload="none",
)
AXOLOTL_QLORA = dict(
    model="qwen3-32b",
    method="qlora",
    seq_len=4096,
    batch_size=1,
    grad_accum=4,
    precision="bf16_mixed",
    lora_r=32,
    lora_alpha=16,
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
    lora_dropout=0.05,
    quant_type="nf4",
    double_quant=True,
    quant_compute_dtype="bf16",
    kbit_fp32_upcast=False,
    optimizer="paged_adamw_8bit",
    gradient_checkpointing=True,
    gc_reentrant=False,
    attn_impl="sdpa",
    fused_ce=False,
    gpus=1,
    dist="none",
)
TRL_LORA = dict(
    model="qwen3-4b",
    method="lora",
    seq_len=2048,
    batch_size=2,
    grad_accum=8,
    precision="bf16_mixed",
    lora_r=32,
    lora_alpha=16,
    lora_targets=ALL,
    lora_dropout=0.05,
    optimizer="adamw_fused",
    gradient_checkpointing=True,
    gc_reentrant=False,
    attn_impl="sdpa",
    fused_ce=False,
    gpus=1,
    dist="none",
)
TRL_QLORA = dict(
    model="qwen3-8b",
    method="qlora",
    seq_len=1024,
    batch_size=4,
    grad_accum=4,
    precision="bf16_mixed",
    lora_r=16,
    lora_alpha=32,
    lora_targets=["q_proj", "v_proj"],
    lora_dropout=0.05,
    quant_type="nf4",
    double_quant=True,
    quant_compute_dtype="bf16",
    kbit_fp32_upcast=True,
    optimizer="paged_adamw_8bit",
    gradient_checkpointing=True,
    gc_reentrant=False,
    attn_impl="sdpa",
    fused_ce=False,
    gpus=1,
    dist="none",
)
HF_FULL_FSDP = dict(
    model="qwen3-1.7b",
    method="full",
    seq_len=2048,
    batch_size=4,
    grad_accum=2,
    precision="bf16_mixed",
    optimizer="adamw_fused",
    gradient_checkpointing=True,
    gc_reentrant=False,
    attn_impl="sdpa",
    gpus=2,
    dist="fsdp2",
    zero_offload="none",
)
CASES = [
    ("llamafactory_qlora.yaml", {}, "LLaMA-Factory", LF_QLORA),
    ("llamafactory_full_ds3.yaml", {"gpus": 4}, "LLaMA-Factory", LF_FULL_DS3),
    ("axolotl_lora.yaml", {}, "axolotl", AXOLOTL_LORA),
    ("axolotl_qlora.yaml", {}, "axolotl", AXOLOTL_QLORA),
    ("trl_lora.yaml", {}, "TRL", TRL_LORA),
    ("trl_qlora.yaml", {}, "TRL", TRL_QLORA),
    ("hf_full.json", {"accelerate": FIXTURES / "accelerate_fsdp.yaml"}, "HF TrainingArguments", HF_FULL_FSDP),
]


def run(path, **kw):
    return check(path, nearest=False, **kw)


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def lf(tmp_path: Path, **keys) -> Path:
    """A minimal LLaMA-Factory LoRA config of Qwen3-8B with bf16, plus `keys`."""
    base = {
        "model_name_or_path": "Qwen/Qwen3-8B",
        "stage": "sft",
        "finetuning_type": "lora",
        "cutoff_len": 1024,
        "per_device_train_batch_size": 1,
        "bf16": True,
    }
    return write(tmp_path, "lf.yaml", {**base, **keys})


def trl(tmp_path: Path, **keys) -> Path:
    base = {
        "model_name_or_path": "Qwen/Qwen3-4B",
        "use_peft": True,
        "max_length": 1024,
        "loss_type": "nll",
        "per_device_train_batch_size": 1,
    }
    return write(tmp_path, "trl.yaml", {**base, **keys})


def keys_of(result) -> dict[str, Unmodelled]:
    return {u.key: u for u in result.unmodelled}


# -- each format, each method: the spec field by field, the prediction ------------------------------
@pytest.mark.parametrize("name,kw,tool,expected", CASES, ids=[c[0] for c in CASES])
def test_fixture_spec_and_prediction(name, kw, tool, expected):
    result = run(FIXTURES / name, **kw)
    assert result.tool == tool
    spec = result.spec.to_dict()
    for field, value in expected.items():
        assert spec[field] == value, field
    assert result.spec == CellSpec.create(**{**expected, "lora_targets": expected.get("lora_targets")})
    assert result.prediction == predict(result.spec, simulate=True)  # check simulates the allocator where it can


@pytest.mark.parametrize("name,kw,tool,expected", CASES, ids=[c[0] for c in CASES])
def test_every_spec_field_has_a_source(name, kw, tool, expected):
    result = run(FIXTURES / name, **kw)
    for field in expected:
        assert field in result.sources, field


def test_defaults_cite_their_tool(tmp_path):
    result = run(lf(tmp_path))  # no disable_gradient_checkpointing, no lora_rank, no lora_target
    assert result.spec.gradient_checkpointing and result.spec.gc_reentrant
    assert result.sources["gradient_checkpointing"].startswith("LLaMA-Factory default (model_args.py")
    assert result.spec.lora_r == 8 and result.spec.lora_alpha == 16  # lora_alpha = 2 x lora_rank
    assert result.spec.optimizer == "adamw_fused" and "training_args.py" in result.sources["optimizer"]


def test_trl_defaults(tmp_path):
    path = write(
        tmp_path, "trl.yaml", {"model_name_or_path": "Qwen/Qwen3-4B", "use_peft": True, "loss_type": "nll"}
    )
    spec = run(path).spec
    # sft_config.py max_length 1024; base_config.py gradient_checkpointing True and bf16 unless fp16; ModelConfig
    # lora_r 16 / alpha 32 / dropout 0.05, targets peft's qwen3 default; transformers batch 8.
    assert (spec.seq_len, spec.gradient_checkpointing, spec.precision) == (1024, True, "bf16_mixed")
    assert (spec.lora_r, spec.lora_alpha, spec.lora_dropout) == (16, 32, 0.05)
    assert spec.lora_targets == ("q_proj", "v_proj") and spec.batch_size == 8


def test_axolotl_requires_lora_rank(tmp_path):
    path = write(
        tmp_path,
        "ax.yaml",
        {
            "base_model": "Qwen/Qwen3-4B",
            "adapter": "lora",
            "lora_alpha": 16,
            "lora_target_linear": True,
            "micro_batch_size": 1,
        },
    )
    with pytest.raises(ConfigError, match=r"ax.yaml: lora_r: is required"):
        run(path)


def test_full_finetuning_of_bf16_weights_is_pure_bf16(tmp_path):
    """transformers 5 loads dtype "auto" (bf16 for Qwen3): full fine-tuning under bf16 autocast keeps bf16
    weights and AdamW moments, predicted as pure bf16 and said so."""
    path = trl(tmp_path, use_peft=False)
    result = run(path)
    assert result.spec.precision == "bf16"
    assert any("pure bf16" in a for a in result.assumptions)


def test_lora_on_an_fp32_base_under_autocast_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not an ftmem precision"):
        run(trl(tmp_path, dtype="float32"))


# -- multi-GPU: DeepSpeed, accelerate, FSDP --------------------------------------------------------
def test_deepspeed_auto_sizes_are_flagged_by_direction():
    result = run(FIXTURES / "llamafactory_full_ds3.yaml", gpus=4)
    flagged = keys_of(result)
    # HF fills "auto" from hidden_size 5120: all smaller than ftmem's DeepSpeed defaults.
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert flagged[f"zero_optimization.{key}"].effect == "lower"
    assert flagged["zero_optimization.overlap_comm"].effect == "lower"  # ftmem's ZeRO-3 cell overlaps
    assert "zero_optimization.sub_group_size" not in flagged  # 1e9 is DeepSpeed's default, as ftmem runs


def test_cli_deepspeed_zero2_offload(tmp_path):
    ds = write(
        tmp_path,
        "ds.json",
        {
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
        },
    )
    spec = run(trl(tmp_path, use_peft=False, dtype="float32"), deepspeed=ds, gpus=2).spec
    assert (spec.dist, spec.zero_offload, spec.gpus, spec.precision) == (
        "deepspeed_zero2",
        "optimizer",
        2,
        "bf16_mixed",
    )


def test_zero1_is_a_lower_bound_and_zero0_refused(tmp_path):
    ds = write(tmp_path, "ds.json", {"zero_optimization": {"stage": 1}})
    result = run(trl(tmp_path, use_peft=False), deepspeed=ds, gpus=2)
    assert result.spec.dist == "deepspeed_zero2"
    assert keys_of(result)["zero_optimization.stage"].effect == "higher"
    write(tmp_path, "ds.json", {"zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match=r"ds.json: zero_optimization.stage: 0"):
        run(tmp_path / "trl.yaml", deepspeed=ds, gpus=2)


def test_deepspeed_values_that_disagree_are_refused(tmp_path):
    ds = write(tmp_path, "ds.json", {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4})
    with pytest.raises(ConfigError, match=r"ds.json: train_micro_batch_size_per_gpu: 4 disagrees"):
        run(trl(tmp_path), deepspeed=ds, gpus=2)


def test_accelerate_deepspeed_inline(tmp_path):
    acc = write(
        tmp_path,
        "acc.yaml",
        {
            "compute_environment": "LOCAL_MACHINE",
            "distributed_type": "DEEPSPEED",
            "num_processes": 4,
            "mixed_precision": "bf16",
            "deepspeed_config": {
                "zero_stage": 3,
                "offload_optimizer_device": "cpu",
                "offload_param_device": "cpu",
            },
        },
    )
    spec = run(trl(tmp_path, use_peft=False), accelerate=acc).spec
    assert (spec.gpus, spec.dist, spec.zero_offload) == (4, "deepspeed_zero3", "optimizer_and_params")


def test_fsdp1_and_shard_grad_op_are_flagged(tmp_path):
    acc = write(
        tmp_path,
        "acc.yaml",
        {
            "distributed_type": "FSDP",
            "num_processes": 2,
            "fsdp_config": {"fsdp_reshard_after_forward": False},
        },
    )
    result = run(FIXTURES / "hf_full.json", accelerate=acc)
    flagged = keys_of(result)
    assert (
        flagged["fsdp_config (fsdp_version)"].effect == "unknown"
    )  # accelerate's FSDP_VERSION defaults to 1
    assert flagged["fsdp_config (reshard_after_forward / sharding_strategy)"].effect == "higher"


def test_gpus_without_a_strategy_is_ddp(tmp_path):
    result = run(trl(tmp_path), gpus=2)
    assert (result.spec.gpus, result.spec.dist) == (2, "ddp")


# -- unmodelled keys: named, never dropped ---------------------------------------------------------
def test_packing_with_padding_free_is_flagged(tmp_path):
    result = run(trl(tmp_path, packing=True, padding_free=True))
    assert keys_of(result)["padding_free"].effect == "lower"


def test_trl_default_loss_is_flagged(tmp_path):
    path = write(tmp_path, "t.yaml", {"model_name_or_path": "Qwen/Qwen3-4B", "use_peft": True})
    assert keys_of(run(path))["loss_type"].value == "(unset)"


@pytest.mark.parametrize(
    "keys,flag,effect",
    [
        ({"neftune_noise_alpha": 5}, "neftune_noise_alpha", "higher"),
        ({"use_unsloth": True}, "use_unsloth", "unknown"),
        ({"use_dora": True}, "use_dora", "higher"),
        ({"additional_target": "embed_tokens,lm_head"}, "additional_target", "higher"),
        ({"lora_target": "q_proj,v_proj,lm_head"}, "lora_target", "higher"),
        ({"optim": "adafactor"}, "optim", "lower"),
        ({"use_galore": True}, "use_galore", "lower"),
        ({"upcast_lmhead_output": True}, "upcast_lmhead_output", "higher"),
        (
            {"eval_strategy": "steps", "per_device_eval_batch_size": 16},
            "per_device_eval_batch_size",
            "unknown",
        ),
    ],
)
def test_llamafactory_unmodelled(tmp_path, keys, flag, effect):
    result = run(lf(tmp_path, **keys))
    assert keys_of(result)[flag].effect == effect
    assert keys_of(result)[flag].file.endswith("lf.yaml")


def test_adafactor_is_predicted_as_adamw(tmp_path):
    assert run(lf(tmp_path, optim="adafactor")).spec.optimizer == "adamw"


def test_lora_on_lm_head_keeps_the_projections(tmp_path):
    assert run(lf(tmp_path, lora_target="q_proj,v_proj,lm_head")).spec.lora_targets == ("q_proj", "v_proj")


def test_trl_modules_to_save_and_dora(tmp_path):
    result = run(trl(tmp_path, lora_modules_to_save=["embed_tokens", "lm_head"], use_dora=True))
    assert {"lora_modules_to_save", "use_dora"} <= set(keys_of(result))


def test_rope_scaling_beyond_max_positions_is_refused(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"cutoff_len: 65536 is past the model's max_position_embeddings 40960: "
        r"rope scaling",
    ):
        run(lf(tmp_path, cutoff_len=65536, rope_scaling="yarn"))


def test_liger_on_qwen3_fuses_the_loss_and_flags_the_rest(tmp_path):
    result = run(lf(tmp_path, enable_liger_kernel=True))
    assert result.spec.fused_ce
    assert keys_of(result)["enable_liger_kernel"].effect == "lower"  # rms_norm, swiglu, rope kernels


def test_liger_on_a_model_without_support(tmp_path):
    # liger-kernel has no Qwen2-MoE patch; ftmem's predictor describes the family
    config = {**bench.model.registry.ARCHITECTURES["qwen2moe-tiny"], "torch_dtype": "bfloat16"}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    result = run(lf(tmp_path, model_name_or_path=str(folder), enable_liger_kernel=True, cutoff_len=64))
    assert not result.spec.fused_ce
    assert keys_of(result)["enable_liger_kernel"].effect == "unknown"


def test_unknown_keys_are_listed(tmp_path):
    result = run(lf(tmp_path, my_custom_switch=True))
    assert "lf.yaml: my_custom_switch" in result.unrecognised


def test_fixtures_have_no_unrecognised_keys():
    for name, kw, _, _ in CASES:
        assert run(FIXTURES / name, **kw).unrecognised == [], name


# -- verdicts and suggestions -----------------------------------------------------------------------
def _pred(nvml: int):
    return predict(CellSpec.create(model="qwen3-tiny", method="lora", seq_len=32, batch_size=1)).__class__(
        nvml, nvml, nvml, {}
    )


@pytest.mark.parametrize(
    "effects,fits,word",
    [
        ((), True, "fits"),
        ((), False, "OOM"),
        (("lower",), True, "fits"),
        (("lower",), False, "unknown"),
        (("higher",), False, "OOM"),
        (("higher",), True, "unknown"),
        (("unknown",), True, "unknown"),
        (("lower", "higher"), False, "unknown"),
    ],
)
def test_verdict_follows_the_unmodelled_direction(effects, fits, word):
    card = Card("c", 10 * 2**30)
    pred = _pred(9 * 2**30 if fits else 11 * 2**30)
    unmodelled = [Unmodelled("f", f"k{i}", 1, "why", e) for i, e in enumerate(effects)]
    assert verdict(pred, card, unmodelled).verdict == word


def test_a_card_only_the_allocators_slack_misses_is_marginal_and_expandable_segments_are_suggested():
    card = Card("c", 10 * 2**30)
    pred = _pred(11 * 2**30)  # NVML over the card
    pred = dataclasses.replace(pred, peak_allocated_bytes=8 * 2**30, uncapped_reserved_bytes=11 * 2**30)
    v = verdict(pred, card, [])
    assert v.verdict == "marginal" and "expandable segments" in v.note


def test_verdict_on_nvml_against_nvidia_smi_total():
    result = run(FIXTURES / "axolotl_lora.yaml")
    for v in result.verdicts:
        assert v.total_bytes == CARD_MIB[v.card] * MIB
        assert v.predicted_bytes == result.prediction.nvml_process_bytes
        assert v.headroom_bytes == v.total_bytes - v.predicted_bytes
        # short of the card: marginal where the allocated peak (with context and memory outside torch) fits
        floor_fits = fits_allocated(result.prediction, v.total_bytes)
        assert v.verdict == ("fits" if v.headroom_bytes >= 0 else "marginal" if floor_fits else "OOM")


@pytest.mark.parametrize("name,kw", [(c[0], c[1]) for c in CASES])
def test_suggestions_really_fit(name, kw):
    result = run(FIXTURES / name, **kw)
    totals = {v.card: v.total_bytes for v in result.verdicts}
    for s in result.suggestions:
        pred = predict(CellSpec.from_dict(s.spec))
        assert pred.nvml_process_bytes == s.predicted_bytes <= totals[s.card]
        assert s.changes and all(s.spec[k] == new for k, (_, new) in s.changes.items())
    for card in totals:
        ranks = [s.rank for s in result.suggestions if s.card == card]
        assert ranks == sorted(ranks)


def test_suggestions_keep_the_effective_batch():
    result = run(FIXTURES / "axolotl_lora.yaml", cards=[Card("a100-40gb", CARD_MIB["a100-40gb"] * MIB)])
    first = result.suggestions[0]
    assert first.change.startswith("micro-batch 1")
    assert first.spec["batch_size"] * first.spec["grad_accum"] == 2 * 4


def test_nothing_suggested_where_it_fits():
    result = run(FIXTURES / "llamafactory_qlora.yaml")
    assert all(v.verdict == "fits" for v in result.verdicts) and result.suggestions == []


def test_closest_measured_rows():
    result = check(FIXTURES / "axolotl_lora.yaml")
    assert result.nearest and result.nearest[0]["model"] == "qwen3-14b"
    assert result.nearest[0]["method"] == "lora" and ":" in result.nearest[0]["row"]
    distances = [r["distance"] for r in result.nearest]
    assert distances == sorted(distances)


# -- models -----------------------------------------------------------------------------------------
def test_resolve_model_fallback_and_hook(monkeypatch):
    assert _resolve_model("Qwen/Qwen3-0.6B") == "qwen3-0.6b"
    assert _resolve_model("qwen3-14b") == "qwen3-14b"
    monkeypatch.setattr(bench.model.registry, "resolve", lambda name: "qwen3-4b", raising=False)
    assert _resolve_model("meta-llama/Llama-3.1-8B") == "qwen3-4b"


def test_unknown_model_names_file_key_value():
    with pytest.raises(ConfigError) as err:
        run(FIXTURES / "unknown_model.yaml")
    assert str(err.value).startswith(
        f"{FIXTURES / 'unknown_model.yaml'}: model_name_or_path: 'acme/NotAModel-7B' "
    )


# -- the command line -------------------------------------------------------------------------------
def cli(capsys, *argv):
    code = main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "name,pattern",
    [
        ("not_yaml.yaml", r"not_yaml.yaml: \(file\): is not YAML or JSON at line 2"),
        ("unknown_format.yaml", r"unknown_format.yaml: \(format\): holds no key of any training format"),
        ("bad_value.yaml", r"bad_value.yaml: lora_rank: 'eight' must be an integer >= 1"),
        ("unknown_model.yaml", r"unknown_model.yaml: model_name_or_path: 'acme/NotAModel-7B' is not"),
        ("nosuch.yaml", r"nosuch.yaml: \(file\): no such file"),
        (
            "ds_z3_config.json",
            r"ds_z3_config.json: \(format\): is a DeepSpeed config: pass it .* --deepspeed",
        ),
    ],
)
def test_bad_files_exit_2_without_traceback(capsys, name, pattern):
    import re

    code, out, err = cli(capsys, FIXTURES / name, "--no-measured")
    assert code == 2 and out == ""
    assert re.search(pattern, err) and err.startswith("ftmem check: error: ") and "Traceback" not in err


def test_bad_card_exits_2(capsys):
    code, _, err = cli(
        capsys, FIXTURES / "trl_lora.yaml", "--card", "rtx4090-24gb", "tpu-v5", "--no-measured"
    )
    assert code == 2 and "--card: 'tpu-v5' is not a card; allowed:" in err


def test_json_shape(capsys):
    code, out, _ = cli(capsys, FIXTURES / "trl_qlora.yaml", "--json", "--card", "rtx4090-24gb", "16")
    assert code == 0
    data = json.loads(out)
    assert {"spec", "prediction", "verdicts", "suggestions", "unmodelled_keys"} <= set(data)
    assert CellSpec.from_dict(data["spec"]).to_dict() == data["spec"]  # the spec as `ftmem run` takes it
    assert {"peak_allocated_bytes", "nvml_process_bytes", "components"} <= set(data["prediction"])
    assert sum(data["prediction"]["components"].values()) == data["prediction"]["peak_allocated_bytes"]
    assert [v["card"] for v in data["verdicts"]] == ["rtx4090-24gb", "16"]
    assert data["verdicts"][1]["total_bytes"] == 16 * 10**9
    assert data["unmodelled_keys"][0]["key"] == "load_in_4bit" and data["nearest_measured"]


def test_text_output_names_everything(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli(capsys, FIXTURES / "trl_lora.yaml", "--no-measured")
    assert code == 0
    for text in (
        "read as TRL",
        "Assumed spec",
        "ftmem run --model qwen3-4b",
        "GiB = 2^30 bytes",
        "padding_free",
        "loss_type",
        "To fit, cheapest change first",
    ):
        assert text in out, text


def test_run_flags_give_the_same_cell():
    spec = run(FIXTURES / "axolotl_qlora.yaml").spec
    args = build_parser().parse_args(check_cli.run_flags(spec).split()[1:])
    assert spec_from_args(args).cell_id == spec.cell_id


def test_verify_without_cuda_refuses(capsys, monkeypatch):
    monkeypatch.setattr(check_cli, "_cuda_devices", lambda: 0)
    code, out, err = cli(capsys, FIXTURES / "trl_lora.yaml", "--verify", "--no-measured")
    assert code == 2 and "torch sees no CUDA device" in err and out == ""


def test_verify_runs_the_cell_and_appends_the_row(capsys, monkeypatch, tmp_path):
    """On a GPU --verify runs bench.cell.runner.run_cell; here a fake runner stands in for it."""
    import bench.cell.runner

    seen = {}

    def fake_run_cell(spec, timeout_s, artifacts_dir=None):
        seen["spec"] = spec
        pred = predict(spec, simulate=True)  # the prediction check makes
        return {
            "cell_id": spec.cell_id,
            "status": "ok",
            "spec": spec.to_dict(),
            "peak_allocated_bytes": pred.peak_allocated_bytes,
            "peak_reserved_bytes": pred.peak_reserved_bytes,
            "nvml_peak_process_bytes": int(pred.nvml_process_bytes * 1.01),
        }

    monkeypatch.setattr(check_cli, "_cuda_devices", lambda: 1)
    monkeypatch.setattr(bench.cell.runner, "run_cell", fake_run_cell)
    out_file = tmp_path / "verify.jsonl"
    code, out, _ = cli(
        capsys, FIXTURES / "trl_lora.yaml", "--verify", "--out", out_file, "--json", "--no-measured"
    )
    assert code == 0
    data = json.loads(out)
    assert data["verify"]["status"] == "ok" and seen["spec"].cell_id == data["verify"]["cell_id"]
    errors = {c["figure"]: c["error"] for c in data["verify"]["comparison"]}
    assert errors["peak allocated"] == 0 and errors["NVML process peak"] == pytest.approx(-0.0099, abs=1e-3)
    assert json.loads(out_file.read_text().splitlines()[0])["cell_id"] == seen["spec"].cell_id


def test_verify_needs_enough_gpus(capsys, monkeypatch):
    monkeypatch.setattr(check_cli, "_cuda_devices", lambda: 1)
    code, _, err = cli(
        capsys, FIXTURES / "llamafactory_full_ds3.yaml", "--gpus", "4", "--verify", "--no-measured"
    )
    assert code == 2 and "needs 4 GPUs and torch sees 1" in err


def test_check_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, analysis.check, ftmem.commands.check; "
        "assert 'torch' not in sys.modules and 'bench.cell.runner' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_hf_arguments_need_a_model(tmp_path):
    path = write(tmp_path, "args.json", {"output_dir": "out", "per_device_train_batch_size": 2, "bf16": True})
    with pytest.raises(
        ConfigError, match=r"args.json: model_name_or_path: names no model; add it or pass --model"
    ):
        run(path)
    result = run(path, model="Qwen/Qwen3-0.6B", seq_len=512)
    assert (result.spec.model, result.spec.seq_len, result.spec.method) == ("qwen3-0.6b", 512, "full")
    assert (
        result.sources["model"] == "command line: --model"
        and result.sources["seq_len"] == "command line: --seq-len"
    )
    assert any("--format trl" in a for a in result.assumptions)


def test_axolotl_global_batch_size_sets_accumulation(tmp_path):
    path = write(
        tmp_path, "ax.yaml", {"base_model": "Qwen/Qwen3-0.6B", "micro_batch_size": 2, "batch_size": 32}
    )
    assert run(path, gpus=2).spec.grad_accum == 8  # 32 // 2 // 2 GPUs


def test_spec_errors_quote_the_config(tmp_path):
    ds = write(tmp_path, "ds.json", {"zero_optimization": {"stage": 2}})
    path = write(
        tmp_path,
        "ax.yaml",
        {
            "base_model": "Qwen/Qwen3-0.6B",
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "optimizer": "adamw_bnb_8bit",
            "deepspeed": str(ds),
        },
    )
    with pytest.raises(
        ConfigError, match=r"ax.yaml: optimizer: 'adamw_bnb_8bit' DeepSpeed cells use its AdamW"
    ):
        run(path, gpus=2)


def test_llamafactory_checkpointing_switches(tmp_path):
    off = run(lf(tmp_path, disable_gradient_checkpointing=True)).spec
    assert not off.gradient_checkpointing
    plain = run(lf(tmp_path, use_reentrant_gc=False)).spec
    assert plain.gradient_checkpointing and not plain.gc_reentrant


def test_lora_targets_are_the_models_own_module_names():
    """all is every linear layer of that model (Phi-4's are fused), named targets are checked against the
    model's own modules, and an MoE model's expert stacks may be named."""
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    phi_all = run(trl(tmp, model_name_or_path="microsoft/phi-4", lora_target_modules="all-linear"))
    assert phi_all.spec.lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    phi = run(trl(tmp, model_name_or_path="microsoft/phi-4", lora_target_modules=["qkv_proj", "o_proj"]))
    assert phi.spec.lora_targets == ("qkv_proj", "o_proj")
    moe = run(trl(tmp, model_name_or_path="Qwen/Qwen3-30B-A3B",
                  lora_target_modules=["q_proj", "experts.gate_up_proj"]))
    assert moe.spec.lora_targets == ("q_proj", "experts.gate_up_proj")
    with pytest.raises(ConfigError, match="qkv_proj"):
        run(trl(tmp, model_name_or_path="microsoft/phi-4", lora_target_modules=["q_proj"]))
