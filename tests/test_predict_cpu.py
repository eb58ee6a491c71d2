"""The predictor against real tiny-model cells measured on CPU (a worker process imports torch)."""

import pytest

from analysis.predict import predict
from bench.cell.runner import run_cell
from bench.spec import CellSpec


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_model_state_components_match_a_measured_tiny_cpu_cell(method):
    """On CPU there is no allocator peak, but the model-state terms are measured from the tensors."""
    values = dict(
        model="qwen3-tiny",
        method=method,
        seq_len=32,
        batch_size=2,
        device="cpu",
        steps=1,
        precision="fp32" if method == "full" else "bf16_mixed",
    )
    row = run_cell(CellSpec.create(**values), timeout_s=120)
    assert row["status"] == "ok", row["error"]
    parts = predict(values).components
    weights = sum(v for k, v in parts.items() if k.startswith(("weights_", "embed_head_norms_")))
    adapters = parts.get("lora_adapters", 0)
    # 4-bit: the predictor counts each linear's 64-byte code table as the 512-byte block the CUDA
    # allocator gives it; the measured figure counts tensor bytes (7 linears x 2 layers x 448 bytes).
    rounding = 7 * 2 * (512 - 64) if method == "qlora" else 0
    assert weights + adapters - row["param_bytes"] == rounding
    # AdamW: two moments per trainable value; torch adds a 4-byte step counter per tensor.
    assert 0 <= row["optimizer_state_bytes"] - parts["optimizer_state"] <= 4 * 64
