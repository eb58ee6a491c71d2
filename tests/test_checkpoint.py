"""A local checkpoint folder (config.json + safetensors) as the model: real weights, loaded by from_pretrained."""

import pytest

from bench.cell.runner import run_cell
from bench.model.registry import ARCHITECTURES
from bench.spec import CellSpec


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = {k: v for k, v in ARCHITECTURES["qwen3-tiny"].items() if k != "architectures"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch), dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp("qwen3-tiny-checkpoint")
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    return str(folder)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_checkpoint_folder_trains_like_the_shipped_config(checkpoint, method):
    common = dict(method=method, device="cpu", seq_len=32, batch_size=2, steps=1)
    row = run_cell(CellSpec.create(model=checkpoint, **common), timeout_s=120)
    shipped = run_cell(CellSpec.create(model="qwen3-tiny", **common), timeout_s=120)
    assert row["status"] == "ok", row["error"]
    assert row["spec"]["model"] == checkpoint
    # Same architecture, same storage formats: the same bytes of parameters and trainable adapters.
    assert row["param_bytes"] == shipped["param_bytes"]
    assert row["n_trainable_params"] == shipped["n_trainable_params"]


def test_a_folder_without_config_is_refused(tmp_path):
    from bench.spec import SpecError

    with pytest.raises(SpecError, match="model"):
        CellSpec.create(model=str(tmp_path), method="lora", seq_len=32, batch_size=1, device="cpu")
