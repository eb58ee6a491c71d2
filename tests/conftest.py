import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where torch sees a CUDA device."""
    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = {"model": "qwen3-tiny", "device": "cpu", "seq_len": 32, "batch_size": 2, "warmup_steps": 1, "steps": 1}


@pytest.fixture(autouse=True)
def _no_new_simulations(monkeypatch):
    """Predictions read the allocator simulations already cached and make no new ones (each runs a cell's
    step on the meta device, seconds to a minute); tests/test_dryrun.py switches them back on."""
    monkeypatch.setenv("FTMEM_SIMULATE", "0")
