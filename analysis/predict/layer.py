"""The op-by-op walk of one decoder layer, read from the architecture description (bench.model.arch): norms,
attention (q/k/v or a fused qkv, QK-norm, RoPE, a kernel), a residual add, the MLP (gated, or the
mixture-of-experts block), a residual add, in the order and placement the family's modeling file uses.
"""

from __future__ import annotations

from analysis.predict.attention import attention_flash, attention_kernel
from analysis.predict.graph import Graph, T
from analysis.predict.moe import moe_block
from analysis.predict.ops import Linear, linear, mlp_block, rmsnorm
from analysis.predict.resolve import BYTES, Setup, promote


# --------------------------------------------------------------------------------------------------
def attention_block(g: Graph, x: T, lins: dict[str, Linear], windowed: bool) -> T:
    """q/k/v projections (or one fused qkv whose slices are views), QK-norm per head or over all heads,
    RoPE (saves only the shared cos/sin tables), the attention kernel, o_proj."""
    st, dm, roles = g.st, g.st.dims, {lin.role: lin for lin in lins.values()}
    if "qkv" in roles:
        qkv = linear(g, x, roles["qkv"])
        tokens = st.tokens
        q, k, v = g.view(qkv, tokens * dm["q"]), g.view(qkv, tokens * dm["kv"]), g.view(qkv, tokens * dm["kv"])
    else:
        q, k, v = (linear(g, x, roles[r]) for r in ("q", "k", "v"))
    qk = st.desc.family.qk_norm
    if qk is not None:
        q = rmsnorm(g, q, dm["d"] if qk == "head" else dm["q"])
        k = rmsnorm(g, k, dm["d"] if qk == "head" else dm["kv"])
    q = g.new(q.numel, promote(q.dtype, st.other), q.grad)  # RoPE: q * cos + rotate_half(q) * sin
    k = g.new(k.numel, promote(k.dtype, st.other), k.grad)
    kernel = attention_kernel(st, q, windowed)
    out = kernel(g, q, k, v)
    if kernel is attention_flash and st.spec.attn_impl == "sdpa" and st.desc.family.rope_cat:
        # SDPA's flash kernel writes its output in q's layout; a concatenating RoPE leaves q (batch, heads,
        # seq, dim), so transformers' transpose(1, 2).contiguous() copies it for o_proj (measured on an
        # H200: scripts/cuda_facts.py); after RoPE's elementwise ops q keeps the projection's layout.
        out = g.new(out.numel, out.dtype, out.grad)
    return linear(g, out, roles["o"])


def projections(st: Setup) -> dict[str, Linear]:
    kind = st.quant or "dense"
    targets = st.spec.lora_targets or ()
    return {
        p.name: Linear(p.name, p.fan_in, p.fan_out, kind, st.base, st.full, p.name in targets, p.role)
        for p in st.desc.projections
    }


def layer_input_requires_grad(st: Setup, first: bool) -> bool:
    """Layer 0's input is the embedding output: it needs a grad only if the embedding is trained, or
    under reentrant checkpointing, where bench calls enable_input_require_grads for LoRA."""
    if not first:
        return True
    return st.full or bool(st.spec.gradient_checkpointing and st.spec.gc_reentrant)


def layer_graph(st: Setup, first: bool = False, windowed: bool = False) -> tuple[Graph, T]:
    """Walk one decoder layer: [norm], attention, [norm], residual add, [norm], MLP, [norm], residual add,
    with the norms where the family places them (before each block, before and after, or after).

    The decoder layer's frame holds a pre-norm's output while the block it feeds runs, and the residual
    (x + attn) while the MLP runs (`Graph.frame`; the layer input is the checkpoint's, counted apart).
    A checkpointed layer recomputes when its backward first unpacks a saved tensor: the grad of its
    output is alive then and, when down_proj has an adapter whose output is the residual branch itself
    (no norm after the MLP), the grad of LoRA's scaled output (the scaling's backward saves no tensor and
    runs first): `recompute_grads`. `windowed`: a sliding-window layer that needs its attention mask."""
    g, h = Graph(st), st.dims["h"]
    placement, lins = st.desc.family.placement, projections(st)
    x = g.new(st.tokens * h, st.other, layer_input_requires_grad(st, first))
    g.residual_grad = x.nbytes  # the grad of x + attn, held for x while the attention branch runs
    pre, post = placement in ("pre", "sandwich"), placement in ("sandwich", "post")
    a_in = rmsnorm(g, x, h) if pre else x
    g.frame = {"attention_input": a_in} if pre else {}
    attn = attention_block(g, a_in, lins, windowed)
    if post:
        attn = rmsnorm(g, attn, h)
    mid = g.new(x.numel, promote(x.dtype, attn.dtype), True)
    g.frame = {"residual": mid}
    m_in = rmsnorm(g, mid, h) if pre else mid
    if pre:
        g.frame["mlp_input"] = m_in
    out = moe_block(g, m_in, lins) if st.desc.moe is not None else mlp_block(g, m_in, lins)
    if post:
        out = rmsnorm(g, out, h)
    g.frame = {}
    g.input_saved = g.saved.get(x.id, 0)  # an fp32 input is saved by the norm as is, not as a copy
    y = g.new(x.numel, promote(mid.dtype, out.dtype), True)
    lora_down = any(lin.lora and lin.role == "down" for lin in lins.values()) and not post
    g.recompute_grads = y.nbytes + (x.numel * BYTES[st.autocast or st.adapter] if lora_down else 0)
    return g, y


def stream_dtype(st: Setup) -> str:
    """dtype of the residual stream between layers (bf16 for a bf16 base, fp32 with fp32 embeddings)."""
    return layer_graph(st, first=True)[1].dtype
