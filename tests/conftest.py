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
