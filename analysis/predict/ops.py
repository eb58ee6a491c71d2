"""The ops of the layer walk: linear layers by storage kind, LoRA, RMSNorm kinds, the gated MLP.

Each op records what autograd keeps, tracking dtypes and requires_grad the way torch decides them:
autocast casts the inputs of matmul/linear/SDPA to the half dtype (and caches the casts of trainable
fp32 weights until the autocast region ends); each derivative formula saves only what its backward needs
(mm saves the input only when the weight needs a grad and the weight only when the input does); a tensor
saved by two ops counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.predict.graph import Graph, T
from analysis.predict.int8 import outlier_columns
from analysis.predict.resolve import BYTES, promote


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
    role: str  # q, k, v, qkv, o, gate, up, gate_up, down (bench.model.arch.Proj)


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
    every layer's inputs and their outlier columns (subA, analysis.predict.int8) stay until the graph is
    freed (`Graph.keep`); its backward dequantizes the weight into the input's dtype (a temporary as
    large as the weight).
    """
    tokens = x.numel // lin.fan_in
    if lin.kind in ("nf4", "fp4"):
        cd = g.st.spec.quant_compute_dtype
        return g.cast(g.new(tokens * lin.fan_out, cd, x.grad), x.dtype)
    if lin.kind == "int8":
        if x.grad:
            g.keep(x)
            desc = g.st.desc
            cols = outlier_columns(lin.role, lin.fan_in, desc.hidden, desc.act, tokens)
            if cols:
                g.keep(g.new(tokens * cols, x.dtype, False))
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


def mlp_block(g: Graph, x: T, lins: dict[str, Linear], roles: dict[str, Linear] | None = None) -> T:
    """Gated MLP: down(act(gate(x)) * up(x)), gate and up fused in one projection (whose halves are
    views) for Phi-3. The activation (silu, gelu-tanh) saves its input; the product saves both factors.
    Backward holds about three intermediate-size grads at once."""
    roles = roles or {lin.role: lin for lin in lins.values()}
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
