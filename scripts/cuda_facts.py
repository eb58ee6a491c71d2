"""Small facts of the CUDA stack the predictor relies on, measured on the GPU in seconds (a JSON line each).

    python3 scripts/cuda_facts.py > facts.jsonl

- linear_bias_workspace: allocated bytes that stay after the first bf16 F.linear with a bias (cublasLt's
  workspace?) and after the first one without, in the forward thread and in autograd's backward thread;
- sdpa_output_layout: whether SDPA's output, transposed back to (batch, seq, heads, dim), is contiguous
  without a copy, for q laid out as a view of a (batch, seq, heads, dim) tensor and as a contiguous
  (batch, heads, seq, dim) one (Phi-3's concatenating RoPE), per kernel.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _held(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


def linear_bias_workspace() -> dict:
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    out = {"plain_forward": _held(lambda: F.linear(x, w).sum())}
    out["bias_forward"] = _held(lambda: F.linear(x, w, b).sum())

    class InBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            F.linear(grad.detach(), w, b)
            return grad

    out["bias_backward_thread"] = _held(lambda: InBackward.apply(x).sum().backward())
    return out


def sdpa_output_layout() -> dict:
    b, s, h, d = 2, 1024, 32, 128
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for layout in ("bshd_view", "bhsd_contiguous"):
            base = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
            q = base.transpose(1, 2) if layout == "bshd_view" else base.transpose(1, 2).contiguous()
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            t = o.transpose(1, 2)
            out[f"{name}/{layout}"] = {"contiguous_after_transpose": t.is_contiguous()}
    return out


def main() -> None:
    torch.cuda.init()
    for name, fn in (("linear_bias_workspace", linear_bias_workspace), ("sdpa_output_layout", sdpa_output_layout)):
        try:
            print(json.dumps({"fact": name, "value": fn()}), flush=True)
        except Exception as exc:  # a fact that cannot be measured here says why
            print(json.dumps({"fact": name, "error": f"{type(exc).__name__}: {exc}"}), flush=True)


if __name__ == "__main__":
    main()
