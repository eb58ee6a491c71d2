"""The mixture-of-experts block of a decoder layer, op by op (transformers 5's grouped-matmul experts).

With T tokens, top-k routing, E experts of intermediate width I and hidden width h, transformers 5 runs
(integrations/moe.py, grouped_mm_experts_forward): a router (linear, softmax in fp32, top-k), then on the
S = T x k token-expert pairs sorted by expert: a gather of the inputs (S x h), one grouped matmul for all
experts' gate and up (S x 2I), the gated activation, one grouped matmul down (S x h), the routing weights'
product, an un-permuting gather and a sum over k. Every tensor there is S rows whatever the routing, so
uneven routing moves no memory: only the grouped matmul's split of the rows between experts changes.

The experts are 3-D parameters, not linear layers: bitsandbytes never quantizes them (QLoRA keeps them in
16 bits, and prepare_model_for_kbit_training upcasts them to fp32 with every other non-4-bit parameter),
and peft adapts them only through `target_parameters` (ParamWrapper), which materialises each adapted
stack W + B A (E x out x in) in every forward, saved by the grouped matmul for its backward.
"""

from __future__ import annotations

from analysis.predict.graph import Graph, T
from analysis.predict.ops import dense_matmul, linear, mlp_block
from analysis.predict.resolve import BYTES, Setup, promote


def expert_dtype(st: Setup) -> str:
    """Storage dtype of the experts and the router: never quantized, so that of the unquantized weights."""
    return st.other


def expert_numels(st: Setup) -> dict[str, int]:
    """Elements of one MoE layer's expert stacks and router weight."""
    m, h = st.desc.moe, st.dims["h"]
    stacks = {name: e * fan_in * fan_out for name, (e, fan_in, fan_out) in m.stacks(h).items()}
    return {**stacks, "router": m.experts * h}


def _router(g: Graph, x: T) -> T:
    """Router: logits = x W_r^T (autocast), softmax in fp32 (Qwen: dtype=float; Mixtral: logits.float()
    first) saving its output, top-k saving its indices, top-k renormalisation (Qwen3 with norm_topk_prob,
    Mixtral always: small T x k tensors). Returns the routing weights (T x k): the logits' dtype for
    Qwen, fp32 for Mixtral."""
    st, m, tokens = g.st, g.st.desc.moe, g.st.tokens
    logits = _matmul(g, x, st.dims["h"], m.experts, "router")
    g.save(g.new(tokens * m.experts, "fp32", True))  # softmax output
    g.save(g.new(tokens * m.top_k, "int64", False))  # top-k indices
    if m.norm_topk:  # the in-place division saves the top-k sum and the divided values
        g.save(g.new(tokens, "fp32", True))
        g.save(g.new(tokens * m.top_k, "fp32", True))
    weights_dtype = "fp32" if m.style == "mixtral" else logits.dtype
    return g.new(tokens * m.top_k, weights_dtype, True)


def _matmul(g: Graph, x: T, fan_in: int, fan_out: int, name: str) -> T:
    return dense_matmul(g, x, fan_in, fan_out, expert_dtype(g.st), g.st.full, name)


def _effective_weight(g: Graph, name: str, numel: int) -> T | None:
    """peft's ParamWrapper on an expert stack: baddbmm(W, B, A) in W's dtype (autocast off) each forward,
    from the adapters cast to that dtype (small copies that bmm saves). None when the stack is not adapted."""
    st = g.st
    if name not in (st.spec.lora_targets or ()):
        return None
    e, fan_in, fan_out = st.desc.moe.stacks(st.dims["h"])[name]
    r, wd = st.spec.lora_r, expert_dtype(st)
    if st.adapter != wd:
        g.save(g.new(e * r * fan_out, wd, True))
        g.save(g.new(e * r * fan_in, wd, True))
    return g.new(numel, wd, True)


def _grouped_matmul(g: Graph, x: T, rows: int, fan_out: int, name: str, numel: int) -> T:
    """torch's grouped_mm (not autocast-enabled: transformers casts the input to the weights' dtype). Saves
    its input when the weight needs a grad, and the weight when the input does: the parameter itself,
    or the adapted stack W + B A, which is then kept until this layer's backward."""
    st, wd = g.st, expert_dtype(g.st)
    xc = g.cast(x, wd)
    effective = _effective_weight(g, name, numel)
    trainable = st.full or effective is not None
    if trainable:
        g.save(xc)
    if effective is not None and x.grad:
        g.save(effective)
        g.bump(numel * BYTES[wd])  # the stack's grad in backward, before baddbmm's backward reduces it
    return g.new(rows * fan_out, wd, x.grad or trainable)


def experts(g: Graph, x: T, weights: T) -> T:
    """grouped_mm_experts_forward on the S = T x k token-expert pairs (see the module docstring)."""
    st, m, h, tokens = g.st, g.st.desc.moe, g.st.dims["h"], g.st.tokens
    s, numels = tokens * m.top_k, expert_numels(st)
    g.save(g.new(s, "int64", False))  # perm // k: the gather's index
    g.save(g.new(s, "int64", False))  # perm: the routing weights' gather index
    g.save(g.new(s, "bool", False))  # the sentinel mask of every masked_fill (one tensor)
    g.save(g.new(m.experts, "int32", False))  # the groups' offsets, which both grouped matmuls keep
    selected = g.new(s * h, x.dtype, x.grad)
    up = _grouped_matmul(g, selected, s, 2 * m.intermediate, "experts.gate_up_proj", numels["experts.gate_up_proj"])
    up = g.new(up.numel, up.dtype, up.grad)  # masked_fill out of place
    gate, upper = g.view(up, s * m.intermediate), g.view(up, s * m.intermediate)
    if gate.grad:
        g.save(gate)
    act = g.new(gate.numel, gate.dtype, gate.grad)
    g.save(act)
    product = g.new(act.numel, promote(act.dtype, upper.dtype), act.grad)
    down = _grouped_matmul(g, product, s, h, "experts.down_proj", numels["experts.down_proj"])
    down = g.new(down.numel, down.dtype, down.grad)  # masked_fill out of place
    g.save(down)  # the routing weights' product saves it for their grad
    g.save(g.new(s, weights.dtype, True))  # the gathered routing weights, saved for down's grad
    weighted = g.new(s * h, promote(down.dtype, weights.dtype), True)
    g.save(g.new(s, "int64", False))  # inv_perm: the un-permuting gather's index
    g.bump(3 * product.nbytes + weighted.nbytes)
    g.forward_at(x, selected, up, act, product)
    return g.new(tokens * h, weighted.dtype, True)


def moe_block(g: Graph, x: T, lins: dict) -> T:
    """The MoE MLP: router, experts and, for Qwen2-MoE, the shared expert (a gated MLP) scaled by
    sigmoid(shared_expert_gate(x)), which saves the sigmoid (T x 1) and the shared output."""
    out = experts(g, x, _router(g, x))
    shared = {lin.role: lin for lin in lins.values() if lin.role.startswith("shared")}
    if not shared:
        return out
    roles = {"gate": shared["shared_gate_proj"], "up": shared["shared_up"], "down": shared["shared_down"]}
    shared_out = mlp_block(g, x, {lin.name: lin for lin in roles.values()}, roles)
    gate = linear(g, x, shared["shared_router"])
    g.save(g.new(gate.numel, gate.dtype, True))  # sigmoid output
    g.save(shared_out)
    return g.new(out.numel, promote(out.dtype, shared_out.dtype), True)


def router_aux_loss_bytes(st: Setup) -> int:
    """output_router_logits: the load-balancing loss softmaxes each MoE layer's router logits again (in
    their dtype) and saves the result until the loss's backward."""
    m = st.desc.moe
    if m is None or not st.spec.router_aux_loss:
        return 0
    return sum(m.sparse) * st.tokens * m.experts * BYTES[st.autocast or expert_dtype(st)]
