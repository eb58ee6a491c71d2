"""Every shipped family, held against transformers itself on CPU: the architecture description
(bench.model.arch) against the models transformers builds, and the predictor's layer walk against what
autograd really saves in each decoder layer (bench.model.probe)."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.predict import predict, setup
from analysis.predict.step import layer_parts
from bench.cell.runner import run_cell
from bench.model.arch import FAMILIES, UnsupportedArchitecture, describe
from bench.model.build import autocast_dtype, build_model, hf_config
from bench.model.probe import saved_per_layer
from bench.model.registry import ARCHITECTURES, HUB_IDS, architecture, parameter_counts, resolve
from bench.spec import CellSpec, SpecError

TINY_FAMILIES = ("qwen3-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny", "phi3-tiny", "olmo2-tiny", "gemma3-tiny")
TINY_MOE = ("qwen3moe-tiny", "qwen2moe-tiny", "mixtral-tiny")
FULL_SIZE = tuple(name for name in ARCHITECTURES if "tiny" not in name)


def _meta_model(name: str):
    from transformers import AutoModelForCausalLM

    spec = CellSpec.create(model=name, method="full", seq_len=16, batch_size=1, device="cpu")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(spec))


@pytest.mark.parametrize("name", FULL_SIZE + TINY_FAMILIES + TINY_MOE)
def test_description_counts_the_parameters_transformers_builds(name):
    model = _meta_model(name)
    assert parameter_counts(architecture(name))["total"] == sum(p.numel() for p in model.parameters())
    # a layer's linear modules, named below self_attn / mlp (the shared expert's keep their prefix)
    prefix = "model.layers.0."
    linear = {n[len(prefix):].split(".", 1)[1] for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}
    assert set(describe(architecture(name)).projection_names) == linear


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_defaults_are_transformers_defaults(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    defaults = dict(FAMILIES[model_type].defaults)
    # None means "derived" (as many KV heads as query heads, head_dim = hidden / heads); transformers'
    # config shows either None or the derived value.
    derived = {
        "num_key_value_heads": defaults["num_attention_heads"],
        "head_dim": defaults["hidden_size"] // defaults["num_attention_heads"],
    }
    for key, value in defaults.items():
        if key in config:
            got = tuple(config[key]) if isinstance(config[key], list) else config[key]
            assert got == value or (value is None and got == derived.get(key)), key


def test_hub_ids_and_short_names_name_one_cell():
    assert resolve("meta-llama/Llama-3.1-8B") == "llama-3.1-8b" == resolve("META-LLAMA/llama-3.1-8b")
    a = CellSpec.create(model="Qwen/Qwen3-14B", method="lora", seq_len=2048, batch_size=1)
    assert a.model == "qwen3-14b"
    assert a.cell_id == "526a5bd9fc1004a6"  # the calibration row's id: ids of shipped rows are unchanged
    assert len(HUB_IDS) == len(FULL_SIZE)


def test_all_linear_and_the_default_targets_resolve_per_family():
    phi = CellSpec.create(model="phi-4", method="lora", seq_len=128, batch_size=1)
    assert phi.lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    qwen = CellSpec.create(model="qwen3-8b", method="lora", seq_len=128, batch_size=1, lora_targets=["all-linear"])
    assert qwen.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(SpecError, match="qkv_proj"):
        CellSpec.create(model="phi-4", method="lora", seq_len=128, batch_size=1, lora_targets=["q_proj"])


def test_multimodal_config_trains_its_language_model():
    arch = architecture("gemma-3-4b")
    assert arch["_multimodal"] and arch["model_type"] == "gemma3_text"
    prediction = predict(CellSpec.create(model="gemma-3-4b", method="lora", seq_len=512, batch_size=1))
    assert any("language model" in note for note in prediction.notes)


def test_unknown_model_type_is_refused_by_the_predictor_not_guessed(tmp_path):
    config = dict(architecture("llama-tiny"), model_type="granite")
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = CellSpec.create(model=str(tmp_path), method="lora", seq_len=16, batch_size=1, device="cpu",
                           lora_targets=["q_proj"])
    with pytest.raises(UnsupportedArchitecture, match="granite"):
        predict(spec)


@pytest.mark.parametrize(
    "bad, key",
    [("{not json", "(file)"), ("[1, 2]", "(file)"), ('{"model_type": "llama", "hidden_size": "4096"}', "hidden_size"),
     ('{"hidden_size": 64}', "model_type")],
)
def test_a_broken_config_is_named_with_its_file_and_key(tmp_path, bad, key):
    (tmp_path / "config.json").write_text(bad)
    with pytest.raises(SpecError) as err:
        CellSpec.create(model=str(tmp_path), method="lora", seq_len=16, batch_size=1, device="cpu")
    assert "config.json" in str(err.value) and key in str(err.value)


WALKED = (
    [(m, method, "eager", "bf16_mixed") for m in TINY_FAMILIES for method in ("full", "lora", "qlora")]
    + [(m, "lora", "sdpa", "bf16_mixed") for m in TINY_FAMILIES]
    + [("gemma3-tiny", method, "sdpa", precision) for method in ("full", "lora") for precision in ("bf16_mixed", "bf16")]
    + [(m, "full", "sdpa", "bf16") for m in ("llama-tiny", "olmo2-tiny", "qwen3-tiny", "phi3-tiny")]
    + [("phi3-tiny", method, "sdpa", "bf16_mixed") for method in ("full", "qlora")]
)


@pytest.mark.parametrize("model, method, attn, precision", WALKED)
def test_walk_saves_what_autograd_saves(model, method, attn, precision):
    """Per decoder layer, to the byte. SDPA's flash kernel (CPU and CUDA alike) writes its output in q's
    layout: after Phi-3's concatenating RoPE that is (batch, heads, seq, dim), and o_proj reads a copy."""
    spec = CellSpec.create(model=model, method=method, device="cpu", seq_len=32, batch_size=2,
                           attn_impl=attn, precision=precision)
    built = build_model(spec, torch.device("cpu"))
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    measured = saved_per_layer(built, ids, autocast_dtype(spec))
    walked = [layer.saved + layer.kept + layer.casts_saved for layer in layer_parts(setup(spec))]
    assert measured == walked


@pytest.mark.parametrize("model", TINY_FAMILIES + TINY_MOE)
def test_config_only_folder_runs_a_real_cell_and_is_predicted(tmp_path, model):
    config = {k: v for k, v in architecture(model).items() if not k.startswith("_")}
    if model == "gemma3-tiny":  # as a multimodal config: the language model is trained
        config = {"model_type": "gemma3", "text_config": config}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = CellSpec.create(model=str(tmp_path), method="lora", device="cpu", seq_len=32, batch_size=2,
                           steps=1, warmup_steps=1)
    row = run_cell(spec, timeout_s=300)
    assert row["status"] == "ok", row.get("error")
    assert predict(spec).peak_allocated_bytes > row["param_bytes"]


MOE_WALKED = [(m, method, False) for m in TINY_MOE for method in ("full", "lora", "qlora")] + [
    (m, method, True) for m in TINY_MOE for method in ("lora", "qlora")
]


@pytest.mark.parametrize("model, method, experts", MOE_WALKED)
def test_moe_walk_saves_what_autograd_saves(model, method, experts):
    """The mixture-of-experts block (router, grouped-matmul experts, shared expert; peft's ParamWrapper on
    the expert stacks when `experts`) against autograd, per layer, to the byte."""
    targets = list(describe(architecture(model)).projection_names)
    if experts:
        targets += ["experts.gate_up_proj", "experts.down_proj"]
    spec = CellSpec.create(model=model, method=method, device="cpu", seq_len=32, batch_size=2, attn_impl="eager",
                           **({"lora_targets": targets} if method != "full" else {}))
    built = build_model(spec, torch.device("cpu"))
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    measured = saved_per_layer(built, ids, autocast_dtype(spec))
    assert measured == [layer.saved + layer.kept + layer.casts_saved for layer in layer_parts(setup(spec))]


def test_moe_cell_records_its_routing_and_experts_code():
    spec = CellSpec.create(model="qwen3moe-tiny", method="lora", device="cpu", seq_len=32, batch_size=2,
                           steps=1, warmup_steps=1, router_aux_loss=True)
    row = run_cell(spec, timeout_s=300)
    assert row["status"] == "ok", row.get("error")
    assert row["experts_implementation"] in ("grouped_mm", "batched_mm", "eager")
    counts = row["moe_expert_tokens"]
    assert len(counts) == 2 and all(sum(layer) == 32 * 2 * 2 for layer in counts)  # tokens x top_k per layer
    assert row["moe_imbalance"] >= 1.0
    assert predict(spec).components.get("router_aux_loss_saved", 0) > 0


def test_router_aux_loss_is_refused_for_dense_models():
    with pytest.raises(SpecError, match="router_aux_loss"):
        CellSpec.create(model="llama-tiny", method="lora", seq_len=16, batch_size=1, router_aux_loss=True)


def test_moe_experts_are_never_quantized_and_upcast_with_kbit_training():
    qlora = predict(CellSpec.create(model="qwen3-30b-a3b", method="qlora", seq_len=512, batch_size=1,
                                    gradient_checkpointing=True))
    kept = predict(CellSpec.create(model="qwen3-30b-a3b", method="qlora", seq_len=512, batch_size=1,
                                   gradient_checkpointing=True, kbit_fp32_upcast=False))
    experts = 48 * 3 * 128 * 768 * 2048 + 48 * 128 * 2048  # stacks and routers of 48 layers
    assert qlora.components["experts_fp32"] == 4 * experts
    assert kept.components["experts_bf16"] == 2 * experts


@pytest.mark.parametrize("dist, term", [("fsdp2", "fsdp_sharded_params"), ("deepspeed_zero3", "zero3_param_partition")])
def test_moe_experts_are_sharded_across_ranks_like_every_weight(dist, term):
    from analysis.predict.state import weight_bytes

    spec = CellSpec.create(model="qwen3-30b-a3b", method="lora", seq_len=2048, batch_size=1,
                           gradient_checkpointing=True, gpus=4, dist=dist)
    components = predict(spec).components
    assert not any(k.startswith("experts_") for k in components)  # no rank holds the whole stacks
    total = weight_bytes(setup(spec))
    assert total / 4 * 0.99 <= components[term] <= total / 4 + 1


def test_cli_refuses_an_undescribed_family_with_the_reason_and_notes_a_multimodal_one(tmp_path, capsys):
    from ftmem.cli import main

    config = dict(architecture("llama-tiny"), model_type="granite")
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["predict", "--model", str(tmp_path), "--method", "lora", "--seq-len", "32", "--batch-size", "1",
                 "--lora-targets", "q_proj"])
    assert code == 2 and "granite" in capsys.readouterr().err
    assert main(["predict", "--model", "gemma-3-4b", "--method", "lora", "--seq-len", "64", "--batch-size", "1"]) == 0
    assert "language model" in capsys.readouterr().out


def test_a_sweep_over_a_broken_config_writes_an_invalid_row_naming_the_file_and_key(tmp_path):
    from bench.store import read_rows
    from ftmem.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: b\nbase: {{method: lora, device: cpu, seq_len: 16, batch_size: 1}}\n"
                     f"axes:\n  model: [{folder}]\n")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "r.jsonl")]) == 0
    (row,) = read_rows(tmp_path / "r.jsonl")
    assert row["status"] == "invalid" and "config.json: hidden_size: 'big'" in row["error"]


def test_capacity_refuses_an_undescribed_family_instead_of_answering_none_fits(tmp_path, capsys):
    from ftmem.cli import main

    (tmp_path / "config.json").write_text(json.dumps(dict(architecture("llama-tiny"), model_type="granite")))
    code = main(["capacity", "--model", str(tmp_path), "--method", "lora", "--lora-targets", "q_proj",
                 "--budget-gb", "24"])
    assert code == 2 and "granite" in capsys.readouterr().err
