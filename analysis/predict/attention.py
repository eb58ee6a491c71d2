"""Attention kernels: what eager attention, SDPA's kernels (flash, memory-efficient with a mask, the
math fallback) and flash-attn keep for backward, and their working sets."""

from __future__ import annotations

from analysis.predict.graph import Graph, T
from analysis.predict.resolve import BYTES, Setup, promote


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


