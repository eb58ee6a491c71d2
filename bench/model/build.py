"""Building the model of a cell: random weights from a shipped config, on the target device.

The skeleton is made on the meta device, so no memory is spent until each tensor is created on
the device, in its final dtype. For qlora / lora8bit the linear layers are replaced by real
bitsandbytes modules through transformers' own quantizer (as `from_pretrained(...,
quantization_config=...)` does), and each weight is quantized as soon as it is made: only one
layer's full-precision weight is on the GPU at a time, so a 14B QLoRA model builds on a 24 GB card.
LoRA adapters come from peft, as users get them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.model.registry import INIT_STD, architecture, is_checkpoint_dir
from bench.spec import KBIT_METHODS, LORA_METHODS, CellSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(spec: CellSpec) -> torch.dtype | None:
    """The autocast dtype of mixed precision, None where no autocast runs."""
    return {"bf16_mixed": torch.bfloat16, "fp16_mixed": torch.float16}.get(spec.precision)


def base_dtype(spec: CellSpec) -> torch.dtype:
    """Storage dtype of the model's (unquantized) weights.

    Trainable weights of mixed precision stay fp32 (the master copy): full fine-tuning under
    *_mixed keeps the whole model in fp32. A frozen LoRA base is stored in the half dtype, as
    users load it (`dtype=torch.bfloat16`), with fp32 adapters.
    """
    if spec.precision == "fp32":
        return torch.float32
    if spec.precision == "bf16":
        return torch.bfloat16
    if spec.method == "full":
        return torch.float32
    return autocast_dtype(spec)


def unavailable_features(spec: CellSpec) -> list[str]:
    """Features the spec asks for that this machine cannot provide."""
    missing = []
    if spec.attn_impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        missing.append("flash_attention_2")
    if spec.fused_ce and importlib.util.find_spec("liger_kernel") is None:
        missing.append("liger_kernel")
    needs_bnb = spec.method in KBIT_METHODS or spec.optimizer.startswith(("adamw_8bit", "paged"))
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes")
    return missing


def hf_attn_impl(spec: CellSpec) -> str:
    """transformers' attn_implementation of a cell: sdpa_flash is SDPA (held to its flash backend by
    bench.model.train.Stepper)."""
    return "sdpa" if spec.attn_impl == "sdpa_flash" else spec.attn_impl


def hf_config(spec: CellSpec):
    """The transformers config of the cell's (text) model; ftmem's own keys (`_...`) left out."""
    from transformers import AutoConfig

    arch = architecture(spec.model)
    config = AutoConfig.for_model(
        **{k: v for k, v in arch.items() if k != "architectures" and not k.startswith("_")}
    )
    config.use_cache = False
    config._attn_implementation = hf_attn_impl(spec)
    if spec.router_aux_loss:
        config.output_router_logits = True
    return config


def bnb_config(spec: CellSpec):
    from transformers import BitsAndBytesConfig

    if spec.method == "qlora":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quant_type,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=DTYPES[spec.quant_compute_dtype],
        )
    return BitsAndBytesConfig(load_in_8bit=True)


class BuildStages:
    """Wall time of each build stage (synchronized on CUDA): where a cell's start-up time goes."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._last = device, {}, time.perf_counter()

    def done(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def build_model(
    spec: CellSpec,
    device: torch.device,
    stages: BuildStages | None = None,
    init_device: torch.device | None = None,
) -> nn.Module:
    """The trainable model of a cell, on `device`, ready for its optimizer.

    `init_device` draws the random weights there, one tensor at a time, before they move to
    `device`: a ZeRO-3 cell builds its model in host memory with the GPU's random numbers (seconds,
    where the CPU's take minutes for 14B parameters) and DeepSpeed then partitions it."""
    stages = stages or BuildStages(device)
    _import_libraries(spec)
    stages.done("imports")
    if is_checkpoint_dir(spec.model) and has_weights(spec.model):
        model = _load_checkpoint(spec, device)
    else:
        model = _build_random(spec, device, init_device or device)
    stages.done("weights")
    _prepare_for_training(model, spec)
    stages.done("prepare")
    if spec.method in LORA_METHODS:
        model = _add_lora(model, spec, device)
        stages.done("lora")
    if spec.fused_ce:
        _apply_fused_ce(model)
    if spec.compile:
        _compile_layers(model)
    model.train()
    stages.done("wrap")
    return model


def has_weights(folder: str) -> bool:
    """A checkpoint folder with saved weights (safetensors or PyTorch files); without, random weights."""
    patterns = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
    return any(any(Path(folder).glob(p)) for p in patterns)


def _import_libraries(spec: CellSpec) -> None:
    """Import what the build uses up front (seconds on a cold start), so the stages time the work."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(architecture(spec.model)["model_type"])
    with contextlib.suppress(ModuleNotFoundError):
        importlib.import_module(f"transformers.models.{module}.modeling_{module}")

    if spec.method in LORA_METHODS:
        import peft  # noqa: F401
    if spec.method in KBIT_METHODS:
        import bitsandbytes  # noqa: F401


def _build_random(spec: CellSpec, device: torch.device, init_device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = hf_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=base_dtype(spec), attn_implementation=hf_attn_impl(spec)
        )
    quantizer = None
    if spec.method in KBIT_METHODS:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(bnb_config(spec), pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": device}, dtype=base_dtype(spec))
    generator = torch.Generator(device=init_device).manual_seed(spec.seed)
    materialize(model, device, base_dtype(spec), generator)
    if quantizer is not None:
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
    return model


def _load_checkpoint(spec: CellSpec, device: torch.device) -> nn.Module:
    """A local checkpoint folder: real weights through from_pretrained (random where none are saved)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": base_dtype(spec), "attn_implementation": hf_attn_impl(spec)}
    if spec.method in KBIT_METHODS:
        kwargs["quantization_config"] = bnb_config(spec)
    model = AutoModelForCausalLM.from_pretrained(spec.model, device_map={"": str(device)}, **kwargs)
    model.config.use_cache = False
    return model


def materialize(
    model: nn.Module, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> None:
    """Replace every meta tensor by a random one on `device` (drawn on the generator's device),
    quantizing bitsandbytes weights at once.

    A parameter shared by two modules (tied embeddings) is made once and shared again.
    """
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                if id(param) not in made:
                    made[id(param)] = _random_parameter(module_name, param, device, dtype, generator)
                module._parameters[name] = made[id(param)]
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            _rebuild_buffers(model, module, device)


def _random_parameter(module_name, param, device, dtype, generator) -> nn.Parameter:
    kind = type(param).__name__
    if "norm" in module_name.rsplit(".", 1)[-1]:
        return nn.Parameter(
            torch.ones(param.shape, dtype=param.dtype, device=device), requires_grad=param.requires_grad
        )
    value_dtype = dtype if kind in ("Params4bit", "Int8Params") else param.dtype
    value = (
        torch.empty(param.shape, dtype=value_dtype, device=generator.device)
        .normal_(0.0, INIT_STD, generator=generator)
        .to(device)
    )
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(device)
    if kind == "Int8Params":
        import bitsandbytes as bnb

        kwargs = {k: v for k, v in param.__dict__.items() if k not in ("SCB", "CB")}
        int8 = bnb.nn.Int8Params(value, requires_grad=False, **kwargs)
        return int8._quantize(device) if device.type != "cpu" else int8.to(device)
    return nn.Parameter(value, requires_grad=param.requires_grad)


def _rebuild_buffers(model: nn.Module, module: nn.Module, device: torch.device) -> None:
    """Meta buffers are derived values (rotary inv_freq, Gemma's embedding scale): make them on the device
    and let the model's own `_init_weights` fill them, as transformers does when it loads a checkpoint."""
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.device.type == "meta":
            module._buffers[name] = torch.empty_like(buffer, device=device)
    with torch.no_grad():
        model._init_weights(module)


def _prepare_for_training(model: nn.Module, spec: CellSpec) -> None:
    """Freeze or unfreeze, upcast for k-bit training where asked, and enable checkpointing."""
    if spec.method in KBIT_METHODS and spec.kbit_fp32_upcast:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(spec.method == "full")
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": spec.gc_reentrant}
        )
        if spec.gc_reentrant and spec.method in LORA_METHODS:
            # Reentrant checkpointing needs an input that requires grad when the base is frozen.
            model.enable_input_require_grads()


def _add_lora(model: nn.Module, spec: CellSpec, device: torch.device) -> nn.Module:
    """peft's adapters on every target. On CUDA they are made on the GPU at once (torch's default
    device): peft would make each on the CPU and copy it over, 560 tensors for 14B, seconds a cell."""
    from peft import LoraConfig, get_peft_model

    # Experts are 3-D parameters, not linear layers: peft adapts them through target_parameters.
    params = [t for t in spec.lora_targets if t.startswith("experts.")]
    modules = [t for t in spec.lora_targets if t not in params]
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=modules or None,
        target_parameters=params or None,
        task_type="CAUSAL_LM",
    )
    # Mixed precision keeps adapters in fp32 (peft's default); pure bf16 keeps them in bf16.
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return get_peft_model(model, config, autocast_adapter_dtype=spec.precision != "bf16")


def _apply_fused_ce(model: nn.Module) -> None:
    """Liger's fused linear cross-entropy and nothing else of Liger, through its table of model types."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(base.config.model_type)
    if apply is None:
        raise RuntimeError(f"liger-kernel has no fused cross-entropy for model_type {base.config.model_type!r}")
    off = {"rope", "rms_norm", "swiglu", "geglu", "layer_norm", "cross_entropy"}
    accepted = inspect.signature(apply).parameters
    apply(model=base, fused_linear_cross_entropy=True, **{k: False for k in off if k in accepted})


def _compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer (as torchtune does): identical layers share one graph."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        layer.compile()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_state(model: nn.Module) -> dict[str, int]:
    """Static model-state bytes counted from the tensors (quantization constants included)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    quant_bytes = 0
    for p in params:
        state = getattr(p, "quant_state", None)
        if state is not None:
            quant_bytes += _quant_state_bytes(state)
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            quant_bytes += scb.numel() * scb.element_size()
    return {
        "param_bytes": tensor_bytes(params) + quant_bytes,
        "n_params": sum(_logical_numel(p) for p in params),
        "trainable_param_bytes": tensor_bytes(trainable),
        "n_trainable_params": sum(_logical_numel(p) for p in trainable),
        "grad_bytes": tensor_bytes(trainable),
        "buffer_bytes": tensor_bytes(model.buffers()),
    }


def _quant_state_bytes(state) -> int:
    total = 0
    for value in (state.absmax, getattr(state, "code", None)):
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def _logical_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter: before 4-bit packing, and before ZeRO-3 partitioning."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer.state held by this process (a sharded DTensor state counts its local shard)."""
    return sum(
        _local(v).numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
