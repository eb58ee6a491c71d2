"""The op-by-op walk of one decoder layer, read from the architecture description (bench.arch).

Each op records what autograd keeps, tracking dtypes and requires_grad the way torch decides them:
autocast casts the inputs of matmul/linear/SDPA to the half dtype (and caches the casts of trainable
fp32 weights until the autocast region ends); each derivative formula saves only what its backward needs
(mm saves the input only when the weight needs a grad and the weight only when the input does); a tensor
saved by two ops counts once. The layer is norms, attention (q/k/v, QK-norm, RoPE, a kernel), a residual
add, the gated MLP, a residual add, in the order and placement the family's modeling file uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.predict.graph import Graph, T
from analysis.predict.resolve import BYTES, Setup, promote


@dataclass(frozen=True)
class Linear:
    """One projection: storage kind (dense / nf4 / fp4 / int8), weight dtype, trainable, LoRA or not."""

    name: str
    fan_in: int
    fan_out: int
    kind: str
    dtype: str
    trainable: bool
    lora: bool
    role: str  # q, k, v, qkv, o, gate, up, gate_up, down (bench.arch.Proj)


def _weight_cast(g: Graph, name: str, numel: int, dtype: str, trainable: bool, saved: bool) -> None:
    """Autocast's copy of a weight into the half dtype. Trainable fp32 leaves are cached for the whole
    autocast region; a frozen weight's copy lives only as long as a matmul saves it."""
    g.casts[name] = (numel * BYTES[dtype], trainable, saved)


def dense_matmul(g: Graph, x: T, fan_in: int, fan_out: int, wdtype: str, trainable: bool, name: str) -> T:
    """y = x W^T (F.linear). Under autocast x and W are cast to the half dtype first. mm saves its input
    when the weight needs a grad, and the (cast) weight when the input needs one."""
    ac = g.st.autocast
    xc = g.cast(x, ac) if ac else x
    if trainable:
        g.save(xc)
    cd = ac or wdtype
    if ac and wdtype != ac:
        _weight_cast(g, name, fan_in * fan_out, ac, trainable, x.grad)
    return g.new(x.numel // fan_in * fan_out, cd, x.grad or trainable)


def _base_linear(g: Graph, x: T, lin: Linear) -> T:
    """The frozen or trainable base projection, by storage kind.

    nf4/fp4 (bnb Linear4bit): x is cast to the compute dtype, MatMul4Bit saves only the packed weight
    and dequantizes it again in backward, the output is cast back to x's dtype. int8 (Linear8bitLt,
    threshold 6): bitsandbytes' MatMul8bitLt stores its input on ctx (`ctx.tensors = (CAt, subA, A)`),
    not through save_for_backward, so checkpointing does not drop it and backward does not release it:
    every layer's inputs stay until the graph is freed (`Graph.keep`); its backward dequantizes the
    weight into the input's dtype (a temporary as large as the weight). Outlier columns (subA) are
    data-dependent and not counted.
    """
    tokens = x.numel // lin.fan_in
    if lin.kind in ("nf4", "fp4"):
        cd = g.st.spec.quant_compute_dtype
        return g.cast(g.new(tokens * lin.fan_out, cd, x.grad), x.dtype)
    if lin.kind == "int8":
        if x.grad:
            g.keep(x)
            g.bump(lin.fan_in * lin.fan_out * BYTES[x.dtype] + x.numel * BYTES[x.dtype])
        return g.new(tokens * lin.fan_out, x.dtype, x.grad)
    return dense_matmul(g, x, lin.fan_in, lin.fan_out, lin.dtype, lin.trainable, lin.name)


def _lora_branch(g: Graph, x: T, lin: Linear, result: T) -> T:
    """peft lora.Linear: result + B(A(dropout(x.to(adapter dtype)))) * scaling, cast back to result's dtype.

    peft's input cast makes a separate copy of x per adapted projection (fp32 under mixed precision,
    then autocast's own bf16 copy that A saves). peft's bnb layers (qlora, lora8bit) skip that cast under
    autocast, so A sees x itself: a half x is saved once however many adapters read it. Dropout p>0
    saves a 1-byte mask per element. While A runs, x, the base output and peft's cast of x (its frame
    holds it until the layer returns: 4 B per element of an fp32 adapter's input) are all alive.
    """
    st, r, tokens = g.st, g.st.spec.lora_r, x.numel // lin.fan_in
    xl = cast = x if (st.quant and st.autocast) else g.cast(x, st.adapter)
    if st.spec.lora_dropout:
        g.save(g.new(xl.numel, "bool", False))
        xl = g.new(xl.numel, xl.dtype, xl.grad)
    a = dense_matmul(g, xl, lin.fan_in, r, st.adapter, True, lin.name + ".lora_A")
    g.forward_at(x, result, cast, xl, a)
    b = dense_matmul(g, a, r, lin.fan_out, st.adapter, True, lin.name + ".lora_B")
    scaled = g.new(b.numel, b.dtype, True)
    return g.cast(g.new(tokens * lin.fan_out, promote(result.dtype, scaled.dtype), True), result.dtype)


def linear(g: Graph, x: T, lin: Linear) -> T:
    out = _base_linear(g, x, lin)
    if lin.lora:
        return _lora_branch(g, x, lin, out)
    g.forward_at(x, out)
    return out


def rmsnorm(g: Graph, x: T, width: int) -> T:
    """An RMSNorm of the family's kind over the last `width` elements; its weight is trainable only in
    full fine-tuning (`Setup.other` dtype).

    All kinds start alike: x32 = x.float(); y = x32 * rsqrt(mean(x32^2) + eps): pow and mul save x32 (x
    itself when x is fp32) and rstd when x needs a grad. Then "rms" (Llama, Qwen, Mistral, Phi-3): weight
    * y.to(x.dtype), which saves y (in x's dtype) when the weight trains; "rms_fp32_weight" (OLMo 2):
    (weight * y).to(x.dtype), saving fp32 y when the weight trains; "gemma": (y * (1 + weight.float()))
    .type_as(x), saving fp32 y when the weight trains and the fp32 (1 + weight) when y needs a grad.
    """
    st, kind = g.st, g.st.desc.family.norm
    if x.grad:
        g.save(g.cast(x, "fp32"))
        g.save(g.new(x.numel // width, "fp32", True))
    if kind == "rms":
        y = g.cast(g.new(x.numel, "fp32", x.grad), x.dtype)
        if st.full:
            g.save(y)
        return g.new(x.numel, promote(st.other, x.dtype), x.grad or st.full)
    if st.full:
        g.save(g.new(x.numel, "fp32", x.grad))
    if kind == "gemma" and x.grad:
        g.save(g.new(width, "fp32", st.full))
    return g.new(x.numel, x.dtype, x.grad or st.full)


# --------------------------------------------------------------------------------------------------
# Attention kernels
# --------------------------------------------------------------------------------------------------
def attention_flash(g: Graph, q: T, k: T, v: T) -> T:
    """SDPA's flash (or cuDNN) kernel - half precision, no mask (is_causal), native GQA - or the
    flash_attention_2 integration, which casts fp32 q/k/v to the half dtype itself (and takes a sliding
    window without a mask).

    Saves q, k, v (after autocast's cast), the output and the fp32 logsumexp (b x heads x s); never the
    s x s scores. Backward: dq plus dk, dv expanded to all heads and flash's fp32 dq accumulator.
    """
    st, dm = g.st, g.st.dims
    ac = st.autocast if st.spec.attn_impl == "sdpa" else (st.autocast or q.dtype)
    qc, kc, vc = (g.cast(t, ac) if ac else t for t in (q, k, v))
    for t in (qc, kc, vc):
        g.save(t)
    g.save(g.new(st.tokens * dm["H"], "fp32", True))
    out = g.new(q.numel, qc.dtype, True)
    g.save(out)
    g.bump(3 * out.nbytes + 4 * q.numel)
    return out


def _repeat_kv(g: Graph, q: T, k: T, v: T) -> tuple[T, T]:
    """transformers' repeat_kv: k and v copied to every query head (expand + reshape) when grouped."""
    if g.st.dims["H"] == g.st.dims["KV"]:
        return k, v
    return g.new(q.numel, k.dtype, k.grad), g.new(q.numel, v.dtype, v.grad)


def attention_masked(g: Graph, q: T, k: T, v: T) -> T:
    """SDPA with an explicit mask: the sliding-window layers once the sequence reaches the window.

    transformers repeats k and v to every head (GQA in SDPA needs mask None), and SDPA turns the boolean
    b x 1 x s x s mask into a float one in q's dtype (`convert_boolean_attn_mask`), which only the
    memory-efficient kernel takes. That kernel saves q, k, v (autocast's copies), the output, the fp32
    logsumexp (b x heads x s, s rounded up to 32) and the float mask; its backward makes dq, dk, dv and
    fp32 accumulators for dk and dv.
    """
    st, spec, dm = g.st, g.st.spec, g.st.dims
    krep, vrep = _repeat_kv(g, q, k, v)
    ac = st.autocast
    qc, kc, vc = (g.cast(t, ac) if ac else t for t in (q, krep, vrep))
    for t in (qc, kc, vc):
        g.save(t)
    padded = -(-spec.seq_len // 32) * 32
    g.save(g.new(spec.batch_size * dm["H"] * padded, "fp32", True))
    g.save(g.new(spec.batch_size * spec.seq_len**2, qc.dtype, False))
    out = g.new(q.numel, qc.dtype, True)
    g.save(out)
    g.bump(3 * out.nbytes + 2 * 4 * q.numel)
    return out


def eager_mask_bytes(st: Setup) -> int:
    """The eager path's float masks, b x 1 x s x s in the embedding output's dtype, one per kind of layer
    (causal; sliding window), alive through the forward (and through backward under checkpointing, whose
    frames hold the layer arguments). SDPA's boolean sliding-window mask (s x s bytes, expanded over the
    batch) is made once the sequence reaches the window."""
    spec, desc = st.spec, st.desc
    if spec.attn_impl == "eager":
        kinds = 1 + ("sliding" in desc.layer_types and desc.sliding_window is not None)
        return kinds * spec.batch_size * spec.seq_len**2 * BYTES[st.other]
    if spec.attn_impl == "sdpa" and desc.windowed_layers(spec.seq_len):
        return spec.seq_len**2
    return 0


def attention_eager(g: Graph, q: T, k: T, v: T) -> T:
    """eager_attention_forward: repeat_kv copies k, v to all heads; scores = q k^T * scale + mask;
    softmax in fp32 (saved), cast to q's dtype (saved by the second matmul, as autocast's copy if any).
    The b x heads x s x s tensors dominate: 4 bytes (fp32 softmax) + 2 (half probs) per score when saved.

    The backward peaks in the softmax's backward, whatever the dtypes: the fp32 grad of the softmax
    output (the backward of `.to(q.dtype)` or of autocast's cast), CUDA's softmax_backward_cuda_out
    with its `tmp = grad * output` and its grad_input (fp32: softmax ran on fp32 scores), 3 x 4 bytes per
    score beside the saved fp32 softmax. By then the second matmul's backward has released the probs
    and v copies and everything saved after them (o_proj, the MLP); still alive are the tensors saved
    before (norm, q/k/v inputs, q, k, the softmax), the grad of the repeated v (waiting for repeat_kv's
    backward, which autograd runs after the score path) and the residual stream's grad.
    """
    st, dm, spec = g.st, g.st.dims, g.st.spec
    scores = spec.batch_size * dm["H"] * spec.seq_len**2
    krep, vrep = _repeat_kv(g, q, k, v)
    ac = st.autocast
    for t in (q, krep):
        g.save(g.cast(t, ac) if ac else t)
    cd = ac or q.dtype
    masked = promote(cd, st.other)
    soft = g.new(scores, "fp32", True)
    g.save(soft)
    g.bump_backward_at(3 * scores * BYTES["fp32"] + vrep.nbytes + g.residual_grad)
    probs = g.cast(soft, q.dtype)
    g.save(g.cast(probs, ac) if ac else probs)
    g.save(g.cast(vrep, ac) if ac else vrep)
    g.bump(backward=0, forward=scores * (BYTES[masked] + (4 if masked != "fp32" else 0)))
    return g.new(q.numel, cd, True)


def attention_math(g: Graph, q: T, k: T, v: T) -> T:
    """SDPA's math fallback, which fp32 q/k/v with grouped KV heads get: flash and cuDNN need half
    precision and the memory-efficient kernel rejects GQA (torch sdp_utils.cpp). It repeat_interleaves
    k and v to all heads, scales q and k by sqrt(scale) and materialises the b x heads x s x s scores; the
    softmax output (saved by softmax and the second matmul) stays until backward."""
    spec, dm = g.st.spec, g.st.dims
    scores = spec.batch_size * dm["H"] * spec.seq_len**2
    for _ in range(3):  # scaled q, scaled k repeated, v repeated
        g.save(g.new(q.numel, q.dtype, True))
    g.save(g.new(scores, q.dtype, True))
    g.bump(
        backward=2 * scores * BYTES[q.dtype],
        forward=scores * BYTES[q.dtype] + spec.seq_len**2 * BYTES[q.dtype],
    )
    return g.new(q.numel, q.dtype, True)


def attention_kernel(st: Setup, q: T, windowed: bool = False):
    """Which attention saves what: eager, SDPA's math fallback (fp32 with GQA), SDPA with a mask
    (sliding-window layers at seq_len >= window), or a flash-style kernel."""
    if st.spec.attn_impl == "eager":
        return attention_eager
    grouped = st.dims["H"] != st.dims["KV"]
    if st.spec.attn_impl == "sdpa" and (st.autocast or q.dtype) == "fp32" and grouped:
        return attention_math
    if st.spec.attn_impl == "sdpa" and windowed:
        return attention_masked
    return attention_flash


# --------------------------------------------------------------------------------------------------
# Blocks and the layer
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
    return linear(g, attention_kernel(st, q, windowed)(g, q, k, v), roles["o"])


def mlp_block(g: Graph, x: T, lins: dict[str, Linear]) -> T:
    """Gated MLP: down(act(gate(x)) * up(x)), gate and up fused in one projection (whose halves are
    views) for Phi-3. The activation (silu, gelu-tanh) saves its input; the product saves both factors.
    Backward holds about three intermediate-size grads at once."""
    roles = {lin.role: lin for lin in lins.values()}
    if "gate_up" in roles:
        both = linear(g, x, roles["gate_up"])
        gate, up = g.view(both, both.numel // 2), g.view(both, both.numel // 2)
    else:
        gate, up = linear(g, x, roles["gate"]), linear(g, x, roles["up"])
    if gate.grad:
        g.save(gate)
    act = g.new(gate.numel, gate.dtype, gate.grad)
    if up.grad:
        g.save(act)
    if act.grad:
        g.save(up)
    product = g.new(gate.numel, promote(act.dtype, up.dtype), True)
    g.bump(3 * product.nbytes)
    return linear(g, product, roles["down"])


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
    out = mlp_block(g, m_in, lins)
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
