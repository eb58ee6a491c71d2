"""The final norm, lm_head and the causal-LM loss."""

from __future__ import annotations

import math

from analysis.predict.graph import Graph
from analysis.predict.layer import stream_dtype
from analysis.predict.ops import dense_matmul, rmsnorm
from analysis.predict.resolve import BYTES, Setup


def head_graph(st: Setup) -> tuple[Graph, str]:
    """Final norm and lm_head (frozen unless full; fp32 after the k-bit upcast, whose bf16 autocast
    copy the lm_head matmul then saves: V x h x 2 bytes). Returns the graph and the logits dtype."""
    g, dm = Graph(st), st.dims
    x = g.new(st.tokens * dm["h"], stream_dtype(st), True)
    y = rmsnorm(g, x, dm["h"])
    if st.spec.fused_ce:
        return g, st.autocast or y.dtype
    logits = dense_matmul(g, y, dm["h"], dm["V"], st.other, st.full, "lm_head")
    return g, logits.dtype


def loss_bytes(st: Setup, logits_dtype: str) -> dict[str, int]:
    """The causal-LM loss at its moments, for b x s x V logits.

    HF's ForCausalLMLoss upcasts the logits (logits.float(): a fp32 copy unless already fp32), then
    cross_entropy = log_softmax (saves its fp32 output) + nll_loss. End of forward: logits + fp32 copy +
    log-probs. Backward of the loss: saved log-probs + nll's fp32 grad + log_softmax's fp32 grad = 3 x 4 B.
    `saved` is what stays between forward and backward.
    """
    tv = st.tokens * st.dims["V"]
    if st.spec.fused_ce:
        return fused_loss_bytes(st, logits_dtype)
    ld = BYTES[logits_dtype]
    upcast = 4 * tv if logits_dtype != "fp32" else 0
    return {
        "forward": ld * tv + upcast + 4 * tv,
        "backward": 12 * tv,
        "saved": 4 * tv,
        "logits_grad": ld * tv,
        "unreusable": ld * tv if ld < 4 else 0,
    }


def fused_loss_bytes(st: Setup, compute_dtype: str) -> dict[str, int]:
    """Liger's fused linear cross-entropy never holds b x s x V: it walks chunks of
    next_pow2(ceil(BT / ceil(V / h))) tokens, computes each chunk's logits (compute dtype), loss and
    gradient in place, and keeps grad_input (BT x h) - plus grad_weight (V x h) when lm_head trains -
    for backward. Under autocast an fp32 lm_head is cast to half for each chunk's matmul."""
    dm, bt = st.dims, st.tokens
    chunk = min(2 ** math.ceil(math.log2(max(1, math.ceil(bt / math.ceil(dm["V"] / dm["h"]))))), bt)
    saved = bt * dm["h"] * BYTES[compute_dtype] + (dm["V"] * dm["h"] * BYTES[st.other] if st.full else 0)
    weight_cast = dm["V"] * dm["h"] * 2 if st.autocast and st.other == "fp32" else 0
    chunk_bytes = chunk * dm["V"] * BYTES[compute_dtype] + weight_cast + 8 * bt
    return {
        "forward": saved + chunk_bytes,
        "backward": saved,
        "saved": saved,
        "logits_grad": 0,
        "unreusable": 0,
    }
