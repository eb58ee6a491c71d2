"""An architecture described as data: what memory depends on in a decoder-only model, read off its config.

`describe(config)` turns a config dict (a shipped one or a user's config.json, the text config of a
multimodal one) into an `Arch`: widths, the projections of one decoder layer (fused or not, with or
without bias), the norms and where they sit, QK-norm, the MLP's activation, embedding scaling, tied
embeddings, which layers attend within a sliding window. The predictor walks a layer from this
description and the parameter counts come from it, so adding a family means adding its entry to
FAMILIES: the defaults of its transformers config class (a test checks them against transformers) and
the structure of its decoder layer, read from its modeling file. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


class UnsupportedArchitecture(ValueError):
    """A model_type whose layer ftmem's predictor cannot describe (building and measuring still work)."""


@dataclass(frozen=True)
class Family:
    """The decoder layer of one transformers model_type, as its modeling file writes it.

    norm: "rms" (weight * y.to(dtype)), "rms_fp32_weight" (OLMo 2: (weight * y).to(dtype)) or "gemma"
    ((1 + weight) * y in fp32, then cast). placement: "pre" (norm before attention and MLP), "sandwich"
    (Gemma 3: before and after each) or "post" (OLMo 2: after each). qk_norm: None, "head" (per head,
    width head_dim) or "full" (over all heads of q / k). fused: "qkv" and/or "gate_up" projections.
    qkv_bias: q, k, v have a bias whatever the config says (Qwen2).
    """

    defaults: MappingProxyType
    norm: str = "rms"
    placement: str = "pre"
    qk_norm: str | None = None
    fused: tuple[str, ...] = ()
    qkv_bias: bool = False
    act_key: str = "hidden_act"
    embed_scale: bool = False
    sliding: str = "none"  # how layer types are derived: none | all | qwen | gemma
    moe: str | None = None  # mixture-of-experts block: None | "qwen" (softmax in fp32) | "mixtral" (logits.float())
    rope_cat: bool = False  # RoPE ends in torch.cat (Phi-3's partial rotary): q comes out (batch, heads, seq, dim)


def _defaults(**kw: Any) -> MappingProxyType:
    return MappingProxyType(kw)


#: model_type -> its layer. `defaults` are the transformers 5 config classes' defaults of the fields
#: memory depends on (tests/test_arch.py holds them against transformers).
FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {
        "llama": Family(
            _defaults(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                      max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False,
                      mlp_bias=False, hidden_act="silu"),
        ),
        "mistral": Family(
            _defaults(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=None,
                      max_position_embeddings=131072, tie_word_embeddings=False, sliding_window=4096,
                      hidden_act="silu"),
            sliding="all",
        ),
        "qwen2": Family(
            _defaults(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=None,
                      max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=None,
                      use_sliding_window=False, max_window_layers=28, hidden_act="silu"),
            qkv_bias=True,
            sliding="qwen",
        ),
        "qwen3": Family(
            _defaults(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                      max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=False,
                      sliding_window=None, use_sliding_window=False, max_window_layers=28, hidden_act="silu"),
            qk_norm="head",
            sliding="qwen",
        ),
        "gemma3_text": Family(
            _defaults(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      max_position_embeddings=131072, tie_word_embeddings=True, attention_bias=False,
                      sliding_window=4096, hidden_activation="gelu_pytorch_tanh",
                      final_logit_softcapping=None, attn_logit_softcapping=None),
            norm="gemma",
            placement="sandwich",
            qk_norm="head",
            act_key="hidden_activation",
            embed_scale=True,
            sliding="gemma",
        ),
        "phi3": Family(
            _defaults(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                      max_position_embeddings=4096, tie_word_embeddings=False, sliding_window=None,
                      hidden_act="silu", partial_rotary_factor=1.0),
            fused=("qkv", "gate_up"),
            sliding="all",
            rope_cat=True,
        ),
        "olmo2": Family(
            _defaults(vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                      max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False,
                      hidden_act="silu"),
            norm="rms_fp32_weight",
            placement="post",
            qk_norm="full",
        ),
        "qwen3_moe": Family(
            _defaults(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=None,
                      max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=False,
                      sliding_window=None, use_sliding_window=False, hidden_act="silu", num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                      mlp_only_layers=(), norm_topk_prob=False, output_router_logits=False),
            qk_norm="head",
            sliding="qwen",
            moe="qwen",
        ),
        "qwen2_moe": Family(
            _defaults(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, head_dim=None,
                      max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=0,
                      use_sliding_window=False, max_window_layers=28, hidden_act="silu", num_experts=60,
                      num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      decoder_sparse_step=1, mlp_only_layers=(), norm_topk_prob=False,
                      output_router_logits=False),
            qkv_bias=True,
            sliding="qwen",
            moe="qwen",
        ),
        "mixtral": Family(
            _defaults(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=None,
                      max_position_embeddings=131072, tie_word_embeddings=False, sliding_window=None,
                      hidden_act="silu", num_local_experts=8, num_experts_per_tok=2, output_router_logits=False),
            sliding="all",
            moe="mixtral",
        ),
    }
)

#: Roles of the attention projections (the rest are the MLP's, or the shared expert's).
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")

#: The activations of a gated MLP whose memory ftmem models (each saves its input, as silu does).
GATED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class Proj:
    """One linear projection of a decoder layer: its name in the model, widths, bias, and what it computes
    (q, k, v, qkv, o, gate, up, gate_up, down)."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool
    role: str

    @property
    def numel(self) -> int:
        return self.fan_in * self.fan_out


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts MLP (transformers 5: every expert's gate/up and down stacked in two 3-D
    parameters, run with grouped matmuls), a router, and for Qwen2-MoE a shared expert with its gate."""

    style: str  # "qwen" (softmax(logits, dtype=float)) or "mixtral" (softmax(logits.float()))
    experts: int
    top_k: int
    intermediate: int  # of one expert
    shared_intermediate: int  # of the shared expert; 0 when there is none
    sparse: tuple[bool, ...]  # per layer: an MoE block (True) or the dense MLP (False)
    norm_topk: bool = True  # the top-k weights renormalised to sum to 1 (Mixtral always; Qwen: norm_topk_prob)

    @property
    def expert_params(self) -> int:
        """gate_up_proj (E x 2I x h) and down_proj (E x h x I) of one layer, in elements over h."""
        return 3 * self.experts * self.intermediate

    @property
    def expert_parameter_names(self) -> tuple[str, ...]:
        """LoRA targets of the experts' 3-D parameters (peft's target_parameters)."""
        return ("experts.gate_up_proj", "experts.down_proj")

    def stacks(self, hidden: int) -> dict[str, tuple[int, int, int]]:
        """(experts, in, out) of each expert stack of a layer, by parameter name: gate_up_proj (E x 2I x h)
        reads the hidden width, down_proj (E x h x I) the expert's."""
        return {
            "experts.gate_up_proj": (self.experts, hidden, 2 * self.intermediate),
            "experts.down_proj": (self.experts, self.intermediate, hidden),
        }


@dataclass(frozen=True)
class Arch:
    """What memory depends on in one decoder-only model (see the module docstring)."""

    model_type: str
    family: Family
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int
    act: str
    projections: tuple[Proj, ...]
    sliding_window: int | None
    layer_types: tuple[str, ...]  # "full" or "sliding", one per layer
    multimodal: bool = False
    moe: MoE | None = None
    output_router_logits: bool = False  # the config computes the router's load-balancing loss

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def projection_names(self) -> tuple[str, ...]:
        """The linear layers of a decoder layer: what LoRA's `all-linear` targets."""
        return tuple(p.name for p in self.projections)

    def projection(self, name: str) -> Proj:
        return next(p for p in self.projections if p.name == name)

    @property
    def layer_norm_widths(self) -> tuple[int, ...]:
        """Widths of the norm weights of one decoder layer (block norms, then QK-norms)."""
        blocks = {"pre": 2, "post": 2, "sandwich": 4}[self.family.placement]
        qk = {None: (), "head": (self.head_dim, self.head_dim), "full": (self.q, self.kv)}[self.family.qk_norm]
        return (self.hidden,) * blocks + qk

    @property
    def layer_bias_widths(self) -> tuple[int, ...]:
        return tuple(p.fan_out for p in self.projections if p.bias)

    def windowed_layers(self, seq_len: int) -> int:
        """Layers whose attention needs an explicit mask at this length: sliding-window layers attend
        within the window only, and transformers builds their mask once the sequence reaches it."""
        if self.sliding_window is None or seq_len < self.sliding_window:
            return 0
        return sum(t == "sliding" for t in self.layer_types)

    # -- parameter counts ------------------------------------------------------------------------
    @property
    def layer_linear_params(self) -> int:
        return sum(p.numel for p in self.projections)

    def layer_params_at(self, i: int) -> int:
        """Parameters of decoder layer i: its linear layers, their biases and its norms; an MoE layer's
        experts and router (E x h) besides, a dense layer of an MoE model its own MLP instead."""
        small = sum(self.layer_bias_widths) + sum(self.layer_norm_widths)
        if self.moe is None:
            return self.layer_linear_params + small
        if self.moe.sparse[i]:
            return self.layer_linear_params + small + self.moe_layer_params
        attention = sum(p.numel for p in self.projections if p.role in ATTENTION_ROLES)
        return attention + small + 3 * self.hidden * self.intermediate

    @property
    def layer_params(self) -> int:
        """One (the last) decoder layer's parameters."""
        return self.layer_params_at(self.layers - 1)

    @property
    def moe_layer_params(self) -> int:
        """What an MoE layer has besides attention and the shared expert: experts and router (E x h)."""
        m = self.moe
        return 0 if m is None else m.expert_params * self.hidden + m.experts * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        layers = sum(self.layer_params_at(i) for i in range(self.layers))
        return self.embedding_params + self.lm_head_params + layers + self.hidden


def _field(config: dict, family: Family, key: str) -> Any:
    """A config field, or its family's default where the config leaves it out (None if neither has it)."""
    return config[key] if config.get(key) is not None else family.defaults.get(key)


def _projections(config: dict, family: Family, widths: dict[str, int]) -> tuple[Proj, ...]:
    """The linear layers of a decoder layer. An MoE family's MLP linears are its shared expert's (and the
    shared expert's gate), if any: the experts are 3-D parameters, not linear layers."""
    h, i, q, kv = widths["h"], widths["i"], widths["q"], widths["kv"]
    attn_bias = bool(config.get("attention_bias", False)) or family.qkv_bias
    o_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    if "qkv" in family.fused:
        attention = [Proj("qkv_proj", h, q + 2 * kv, attn_bias, "qkv")]
    else:
        attention = [Proj(n, h, w, attn_bias, r) for n, w, r in (("q_proj", q, "q"), ("k_proj", kv, "k"), ("v_proj", kv, "v"))]
    attention.append(Proj("o_proj", q, h, o_bias, "o"))
    if family.moe is not None:
        shared = int(_field(config, family, "shared_expert_intermediate_size") or 0)
        if not shared:
            return tuple(attention)
        names = (("shared_expert.gate_proj", h, shared, "shared_gate_proj"),
                 ("shared_expert.up_proj", h, shared, "shared_up"),
                 ("shared_expert.down_proj", shared, h, "shared_down"),
                 ("shared_expert_gate", h, 1, "shared_router"))
        return tuple(attention) + tuple(Proj(n, a, b, False, r) for n, a, b, r in names)
    if "gate_up" in family.fused:
        mlp = [Proj("gate_up_proj", h, 2 * i, mlp_bias, "gate_up")]
    else:
        mlp = [Proj("gate_proj", h, i, mlp_bias, "gate"), Proj("up_proj", h, i, mlp_bias, "up")]
    mlp.append(Proj("down_proj", i, h, mlp_bias, "down"))
    return tuple(attention + mlp)


def _layer_types(config: dict, family: Family, layers: int) -> tuple[str, ...]:
    """Full or sliding attention per layer, the way each family's config class decides it."""
    given = config.get("layer_types")
    if given:
        return tuple("sliding" if t == "sliding_attention" else "full" for t in given)
    if family.sliding == "all" and _field(config, family, "sliding_window") is not None:
        return ("sliding",) * layers
    if family.sliding == "qwen" and config.get("use_sliding_window"):
        start = config.get("max_window_layers", family.defaults.get("max_window_layers", layers))
        return tuple("sliding" if i >= start else "full" for i in range(layers))
    if family.sliding == "gemma":
        pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers))
    return ("full",) * layers


def _moe(config: dict, family: Family, layers: int) -> MoE | None:
    """The MoE block of a family that has one, read the way its config class and modeling file do."""
    if family.moe is None:
        return None
    experts = config.get("num_experts", config.get("num_local_experts"))
    experts = int(experts if experts is not None else family.defaults.get("num_experts", family.defaults.get("num_local_experts")))
    only = set(_field(config, family, "mlp_only_layers") or ())
    step = int(_field(config, family, "decoder_sparse_step") or 1)
    sparse = tuple(i not in only and experts > 0 and (i + 1) % step == 0 for i in range(layers))
    intermediate = _field(config, family, "moe_intermediate_size") or _field(config, family, "intermediate_size")
    return MoE(
        style=family.moe,
        experts=experts,
        top_k=int(_field(config, family, "num_experts_per_tok")),
        intermediate=int(intermediate),
        shared_intermediate=int(_field(config, family, "shared_expert_intermediate_size") or 0),
        sparse=sparse,
        norm_topk=family.moe == "mixtral" or bool(_field(config, family, "norm_topk_prob")),
    )


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def describe(config: dict) -> Arch:
    """The Arch of a (text) config dict; UnsupportedArchitecture for a model_type not in FAMILIES."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r}: ftmem's predictor describes {', '.join(FAMILIES)}; "
            "the model can still be built and measured (ftmem run), but not predicted"
        )
    get = lambda key: _field(config, family, key)  # noqa: E731
    h, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or h // heads)
    layers = int(get("num_hidden_layers"))
    widths = {"h": h, "i": int(get("intermediate_size")), "q": heads * head_dim, "kv": kv_heads * head_dim}
    return Arch(
        model_type=model_type,
        family=family,
        hidden=h,
        intermediate=widths["i"],
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=int(get("vocab_size")),
        tied=bool(get("tie_word_embeddings")),
        max_positions=int(get("max_position_embeddings")),
        act=str(get(family.act_key)),
        projections=_projections(config, family, widths),
        sliding_window=get("sliding_window") if family.sliding != "none" else None,
        layer_types=_layer_types(config, family, layers),
        multimodal=bool(config.get("_multimodal", False)),
        moe=_moe(config, family, layers),
        output_router_logits=bool(config.get("output_router_logits", False)),
    )
