"""A cell's training step run on the meta device: the sequence of allocations and frees it makes.

The model is the cell's own (bench.model.build: transformers' modelling, peft's adapters, bitsandbytes'
layers) with meta tensors, so no memory is touched and any size runs on a CPU. Every new storage an op
makes is an allocation and its death a free, in the order the real step makes them. What the meta
device does not do as CUDA does is done here:
- autocast (absent on meta) is emulated above autograd, as torch does it: matmuls and attention in the
  autocast dtype, the fp32 list in fp32, casts of trainable leaves cached until the forward ends, a
  kernel's arguments cast last to first, transformers' maybe_autocast regions opened on meta too;
- SDPA runs the kernel CUDA would pick (FlashAttention without a mask, memory-efficient with one);
- kernels' own workspaces are allocated around them: cuBLAS's (32 MiB per thread, kept, after the output
  of the thread's first gemm) and FlashAttention's fp32 dq accumulator in backward;
- bitsandbytes' 4-bit weights are packed as they are on the GPU (the meta device cannot quantize);
- the optimizer runs foreach, as it does on CUDA by default.
The events feed analysis.predict.allocator, which replays them through the caching allocator's rules.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

MIB = 2**20
CUBLAS_WORKSPACE_BYTES = 32 * MIB


@dataclass
class Events:
    """('alloc', id, bytes) and ('free', id, 0) in order; ('mark', name, 0) at the step's boundaries."""

    items: list[tuple[str, object, int]] = field(default_factory=list)
    _ids: int = 0

    def alloc(self, nbytes: int) -> int:
        self._ids += 1
        self.items.append(("alloc", self._ids, nbytes))
        return self._ids

    def free(self, ident: int) -> None:
        self.items.append(("free", ident, 0))

    def mark(self, name: str) -> None:
        self.items.append(("mark", name, 0))


def _scalar_answer(t: torch.Tensor):
    """A meta tensor read as a Python scalar (it holds no value): the answer the real step's data gives
    where the code branches on one: transformers asks whether every sequence is unpacked (yes), Adam reads
    its step count (1 at the first step: any count >= 1 makes the same tensors)."""
    if t.dtype == torch.bool:
        return True
    return 1 if not t.is_floating_point() else 1.0


class StorageRecorder(TorchDispatchMode):
    """Below autograd: every storage an op creates is an allocation, freed when its last tensor dies.

    One thing a dispatch mode changes it puts back: with any mode active, autograd treats every tensor
    as a subclass and sums the gradients of a tensor used twice out of place (InputBuffer::accumulate);
    without one, as on the GPU, it adds into the gradient it holds. Such a sum (an `add` in backward that
    is no recomputation) takes over its first operand's allocation instead of making one."""

    def __init__(self, events: Events):
        super().__init__()
        self.events = events
        self._owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> its finalizer
        self._cublas_threads: set[bool] = set()
        self._from_python: weakref.WeakSet = weakref.WeakSet()  # storages a Python Function's backward made
        self.recomputing = 0  # > 0 while checkpointing recomputes a layer (bench.model.dryrun._recompute_under)

    def adopt(self, tensor: torch.Tensor, ident: int | None = None) -> None:
        """A storage made outside the recorder: with `ident`, an allocation already in the events whose
        free is recorded when it dies; without, one that is not the step's (never freed)."""
        storage = tensor.untyped_storage()
        if storage not in self._owners:
            self._owners[storage] = None if ident is None else weakref.finalize(storage, self.events.free, ident)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return _scalar_answer(args[0])
        name = func.__name__
        in_backward = torch._C._current_autograd_node() is not None
        # cuBLAS's workspace of this thread's handle, made at its first gemm once the output exists; kept
        cublas = name.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm") and in_backward not in self._cublas_threads
        before = func is not torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default
        workspace = self._workspace(func, args) if before else None
        out = func(*args, **kwargs)
        if func is torch.ops.aten.add.Tensor and in_backward and not self.recomputing:
            if self._take_over(args, out):
                return out
        tree_map(self._record, out)
        if cublas:
            self._cublas_threads.add(in_backward)
            self.events.alloc(CUBLAS_WORKSPACE_BYTES)
        if in_backward and isinstance(torch._C._current_autograd_node(), torch.autograd.function.BackwardCFunction):
            tree_map(lambda t: self._from_python.add(t.untyped_storage()) if isinstance(t, torch.Tensor) else t, out)
        if not before:  # cuDNN's backward takes its workspace once dq, dk and dv exist
            workspace = self._workspace(func, args)
        if workspace is not None:
            self.events.free(workspace)
        return out

    def _take_over(self, args, out) -> bool:
        """Gradient accumulation done in place: `out` inherits an operand's allocation. Not where an
        operand came out of a Python autograd Function's backward (bitsandbytes' matmuls): Python still
        holds a reference to it when autograd sums, so autograd adds out of place (the H200's traces)."""
        tensors = [t for t in args[:2] if isinstance(t, torch.Tensor)]
        if len(tensors) < 2 or any(t.untyped_storage() in self._from_python for t in tensors):
            return False
        for old in tensors:
            finalizer = self._owners.get(old.untyped_storage())
            if old.is_contiguous() and old.shape == out.shape and finalizer is not None and finalizer.alive:
                _, _, (ident,), _ = finalizer.detach()
                self._owners[out.untyped_storage()] = weakref.finalize(out.untyped_storage(), self.events.free, ident)
                return True
        return False

    def _workspace(self, func, args) -> int | None:
        """Memory a CUDA kernel takes from the allocator for itself and gives back before it returns."""
        if func is torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default:
            # cuDNN's backward (measured on the H200, four traces): an fp32 dq accumulator, a second one
            # with grouped KV heads (dk, dv over every query head), fp32 softmax statistics, 256 bytes.
            q, k = args[1], args[2]
            b, h, s, d = q.shape
            return self.events.alloc((1 + (k.shape[1] != h)) * b * h * s * d * 4 + b * h * s * 4 + 256)
        if func is torch.ops.aten._scaled_dot_product_flash_attention_backward.default:
            # FlashAttention-2: an fp32 dq accumulator (seq rounded to 128) and, with grouped KV heads,
            # dk and dv over every query head before they are summed per group.
            q, k = args[1], args[2]
            b, h, s, d = q.shape
            expanded = 2 * q.numel() * q.element_size() if k.shape[1] != h else 0
            return self.events.alloc(b * h * (128 * math.ceil(s / 128)) * d * 4 + expanded)
        if func is torch.ops.aten._softmax_backward_data.default:
            # CUDA's softmax_backward_cuda_out computes `tmp = grad * output` before its kernel
            grad = args[0]
            return self.events.alloc(grad.numel() * grad.element_size())
        if getattr(func, "name", lambda: "")() == "bitsandbytes::gemm_4bit":
            # bitsandbytes' CUDA gemm dequantizes the weight into a temporary in the input's dtype first
            a, shape = args[0], args[2]
            return self.events.alloc(math.prod(shape) * a.element_size())
        return None

    def _record(self, t):
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            storage = t.untyped_storage()
            if storage not in self._owners:
                ident = self.events.alloc(storage.nbytes())
                self._owners[storage] = weakref.finalize(storage, self.events.free, ident)
        return t


LOWER = {
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
    torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, F.scaled_dot_product_attention,
}
FP32 = {
    torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt, torch.exp, torch.Tensor.exp, torch.log,
    torch.Tensor.log, F.cross_entropy, F.nll_loss, F.layer_norm, F.softplus,
}
FP32_OUT = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
            torch.Tensor.log_softmax, torch.cumsum, torch.Tensor.cumsum, torch.sum, torch.Tensor.sum}


GROUPED_MM = {getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)} - {None}


class _GroupedMM(torch.autograd.Function):
    """A grouped matmul of fp32 experts (k-bit training upcasts them; autocast leaves grouped_mm alone),
    which CUDA runs and the meta kernel refuses: the same output, saved inputs and grads, made directly."""

    @staticmethod
    def forward(ctx, x, w):
        # as autograd's formula: each operand kept only for the other's gradient
        ctx.save_for_backward(x if w.requires_grad else None, w if x.requires_grad else None)
        ctx.shapes = (x.shape, x.dtype), (w.shape, w.dtype)
        return x.new_empty((x.shape[0], w.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        (xs, xd), (ws, wd) = ctx.shapes
        return (grad.new_empty(xs, dtype=xd) if ctx.needs_input_grad[0] else None,
                grad.new_empty(ws, dtype=wd) if ctx.needs_input_grad[1] else None)


class MetaAutocast(TorchFunctionMode):
    """torch.autocast's casting rules above autograd, for meta tensors (which autocast skips), and SDPA's
    kernel choice as CUDA makes it. Casts of trainable leaves are cached while the forward runs."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype, self.enabled = dtype, dtype is not None
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def __enter__(self):
        # Code that asks whether autocast is on (peft's LoRA layers, transformers' RoPE) must hear yes.
        self._saved = torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast, torch.amp.autocast
        if self.enabled:  # and inside a region that switches it off, no, as torch answers there
            torch.is_autocast_enabled = lambda *args: self.enabled
            torch.get_autocast_dtype = lambda *args: self.dtype
        torch.autocast = torch.amp.autocast = self._region
        # transformers' maybe_autocast opens no region for meta tensors, which would leave RoPE's fp32
        # region (cos / sin of float32 frequencies) in the autocast dtype: every module's copy opens ours
        # (a recomputation's MetaAutocast takes them over from the outer one, and gives them back).
        self._patched = [(m, f) for m in list(sys.modules.values()) if _is_maybe_autocast(f := _module_attr(m))]
        for module, _ in self._patched:
            module.maybe_autocast = self._region
        return super().__enter__()

    def _region(self, device_type=None, dtype=None, enabled=True, cache_enabled=None):
        """torch.autocast(...) or transformers' maybe_autocast(...) in the modelling code (peft's expert
        adapters, RoPE's fp32 frequencies): a region with autocast switched on or off for meta tensors."""
        outer = self

        class Region:
            def __enter__(self):
                self.was, outer.enabled = outer.enabled, bool(enabled) and outer.dtype is not None
                return self

            def __exit__(self, *exc):
                outer.enabled = self.was
                return False

        return Region()

    def __exit__(self, *exc):
        torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast, torch.amp.autocast = self._saved
        for module, previous in self._patched:
            module.maybe_autocast = previous
        self._cache.clear()
        return super().__exit__(*exc)

    def _cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype):
            return t
        cacheable = t.is_leaf and t.requires_grad and torch._C._current_autograd_node() is None
        if cacheable and id(t) in self._cache:
            return self._cache[id(t)][1]
        out = t.to(dtype)
        if cacheable:
            self._cache[id(t)] = (t, out)
        return out

    def _cast_all(self, args, kwargs, dtype):
        """The arguments cast last to first, as torch's autocast wrappers do on CUDA (a pack of casts that
        the compiler evaluates right to left: a linear's weight is cast before its input, on an H200 trace),
        which orders the casts' allocations and, in backward, their gradients."""
        leaves, layout = tree_flatten((args, kwargs))
        leaves = [self._cast(t, dtype) for t in reversed(leaves)][::-1]
        return tree_unflatten(leaves, layout)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and func in LOWER:
            args, kwargs = self._cast_all(args, kwargs, self.dtype)
        elif self.enabled and func in FP32:
            if any(isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) for t in args):
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
        elif self.enabled and func in FP32_OUT and "dtype" not in kwargs:
            if isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.float16, torch.bfloat16):
                kwargs = {**kwargs, "dtype": torch.float32}
        if func is F.scaled_dot_product_attention:
            out = sdpa(*args, **kwargs)
        elif func in GROUPED_MM and args[0].dtype == torch.float32:
            out = _GroupedMM.apply(args[0], args[1])
        else:
            out = func(*args, **kwargs)
        # The casts die first to last (C++ destroys the wrapper's temporaries in the reverse of their making).
        leaves, _ = tree_flatten((args, kwargs))
        args = kwargs = None
        while leaves:
            leaves.pop(0)
        return out


def _module_attr(module) -> object:
    return getattr(module, "__dict__", {}).get("maybe_autocast")  # no getattr: lazy modules would import


def _is_maybe_autocast(f) -> bool:
    from transformers.utils import generic

    return f is generic.maybe_autocast or isinstance(getattr(f, "__self__", None), MetaAutocast)


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The kernel CUDA's SDPA picks for half-precision training on sm90 (torch 2.11): cuDNN's attention
    without a mask up to head_dim 128 (the H200's traces), FlashAttention-2 up to 256, the memory-efficient
    kernel (the mask as an additive bias in q's dtype) with a mask."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if attn_mask is None and half and q.shape[-1] <= 128:
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, dropout_p, is_causal, scale=scale)[0]
    if attn_mask is None and half and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, -math.inf)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, True, dropout_p, is_causal and attn_mask is None, scale=scale
    )[0]


# --------------------------------------------------------------------------------------------------
def _packed_4bit(param, blocksize: int, dtype: torch.dtype):
    """The packed uint8 weight and absmax bitsandbytes makes on the GPU (two 4-bit codes a byte) of a
    weight drawn in `dtype`, which it dequantizes back to."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    n = param.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="meta")
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device="meta")
    code = torch.empty(16, dtype=torch.float32, device="meta")
    state = QuantState(absmax=absmax, shape=param.shape, code=code, blocksize=blocksize,
                       quant_type=param.quant_type, dtype=dtype)
    out = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                            quant_type=param.quant_type, quant_storage=torch.uint8, bnb_quantized=True,
                            module=getattr(param, "module", None))
    return out, (packed, absmax)


def materialize(model, events: Events, recorder: StorageRecorder, dtype: torch.dtype) -> None:
    """bench.model.build.materialize's allocations, in its order: each parameter drawn on the device;
    a 4-bit one drawn in `dtype`, packed, and the drawn copy freed."""
    made = set()
    for _, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in made:
                continue
            made.add(id(param))
            if type(param).__name__ == "Params4bit":
                drawn = events.alloc(param.numel() * torch.empty((), dtype=dtype).element_size())
                new, parts = _packed_4bit(param, 64, dtype)
                for t in parts:
                    recorder.adopt(t, events.alloc(t.untyped_storage().nbytes()))
                events.free(drawn)
                module._parameters[name] = new
                if hasattr(module, "weight") and module.weight is new:
                    new.module = module
            else:
                recorder.adopt(param, events.alloc(param.untyped_storage().nbytes()))
        for buffer in module.buffers(recurse=False):
            recorder.adopt(buffer, events.alloc(buffer.untyped_storage().nbytes()))


class Unsupported(Exception):
    """The cell cannot be run on the meta device (an optimizer or kernel without a meta implementation,
    routing that depends on the data)."""


def _build(spec, events: Events, recorder: StorageRecorder):
    """bench.model.build.build_model on the meta device, its allocations recorded."""
    from transformers import AutoModelForCausalLM

    from bench.model import build

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            build.hf_config(spec), dtype=build.base_dtype(spec), attn_implementation=build.hf_attn_impl(spec)
        )
    quantizer = None
    if spec.method in build.KBIT_METHODS:
        if spec.method != "qlora":
            raise Unsupported("LLM.int8 weights are not packed on the meta device")
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(build.bnb_config(spec), pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": "meta"}, dtype=build.base_dtype(spec))
    materialize(model, events, recorder, build.base_dtype(spec))
    if quantizer is not None:
        quantizer.postprocess_model(model)  # marks the model 4-bit: peft then wraps with its bnb layers
        model.hf_quantizer = quantizer
    with recorder:
        build._prepare_for_training(model, spec)
        if spec.method in build.KBIT_METHODS and spec.kbit_fp32_upcast:
            events.mark("empty_cache")  # peft's prepare_model_for_kbit_training empties it after the upcast
        if spec.method in build.LORA_METHODS:
            model = build._add_lora(model, spec, torch.device("meta"))
    model.train()
    return model


class _FusedAdamW:
    """torch.optim.AdamW(fused=True)'s memory, which the meta device cannot run: at the first step each
    parameter gets its step counter and two moments (in that order), and the fused kernel updates them
    in place, making nothing more."""

    def __init__(self, params):
        self.params, self.state = params, {}

    def step(self):
        for p in self.params:
            if p.grad is not None and p not in self.state:
                self.state[p] = (torch.zeros((), device=p.device), torch.zeros_like(p), torch.zeros_like(p))

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


def _optimizer(spec, model):
    from bench.model import train

    if spec.optimizer == "adamw_fused":
        return _FusedAdamW([p for p in model.parameters() if p.requires_grad])
    if spec.optimizer not in ("adamw", "adamw_foreach", "sgd", "adamw_8bit"):
        raise Unsupported(f"optimizer {spec.optimizer!r} has no meta implementation")
    optimizer = train.make_optimizer(spec, model)
    for group in optimizer.param_groups:
        group["foreach"] = True  # CUDA's default, which the meta device does not pick
    return optimizer


def trace(spec) -> Events:
    """The allocations and frees of the cell's build, warm-up steps and measured steps, as
    bench.cell.measure runs them (an `empty_cache` mark where it empties the cache)."""
    from bench.model import build, train

    if spec.compile or spec.fused_ce or spec.gpus > 1:
        raise Unsupported("compiled, fused cross-entropy and multi-GPU cells are not traced")
    events = Events()
    recorder = StorageRecorder(events)
    model = _build(spec, events, recorder)
    events.mark("build_end")
    optimizer = _optimizer(spec, model)
    batches = train.make_batches(spec, model.config.vocab_size, torch.device("meta"))
    for ids in batches:
        recorder.adopt(ids, events.alloc(ids.untyped_storage().nbytes()))
    autocast = MetaAutocast(build.autocast_dtype(spec))
    _recompute_under(model, autocast, recorder)
    try:
        with recorder, autocast:
            for i in range(spec.warmup_steps + spec.steps):
                if i == spec.warmup_steps:  # bench.cell.measure: gc, empty_cache, reset peaks
                    gc.collect()
                    events.mark("empty_cache")
                    events.mark("measured_start")
                _step(model, optimizer, batches, autocast, events)
                if i == 0:
                    events.mark("first_step_end")
    except (NotImplementedError, RuntimeError) as err:
        raise Unsupported(f"the step does not run on the meta device: {err}") from err
    return events


class _Recompute(contextlib.ExitStack):
    """The context of one checkpointed recomputation: autocast as in the forward, the recorder told."""

    def __init__(self, recorder: StorageRecorder, dtype):
        super().__init__()
        self.recorder, self.dtype = recorder, dtype

    def __enter__(self):
        super().__enter__()
        self.recorder.recomputing += 1
        self.callback(lambda: setattr(self.recorder, "recomputing", self.recorder.recomputing - 1))
        self.enter_context(MetaAutocast(self.dtype))
        return self


def _recompute_under(model, autocast: MetaAutocast, recorder: StorageRecorder) -> None:
    """Checkpointing recomputes in autograd's worker thread, where the step's modes are not active; it
    re-enters autocast there as torch does (its `context_fn`), with a cache of its own."""
    import functools

    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None:
            continue
        keywords = dict(getattr(func, "keywords", {}))
        if keywords.get("use_reentrant"):
            raise Unsupported("reentrant checkpointing is not traced")
        keywords["context_fn"] = lambda: (contextlib.nullcontext(), _Recompute(recorder, autocast.dtype))
        module._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **keywords)


def _step(model, optimizer, batches, autocast: MetaAutocast, events: Events) -> None:
    """bench.model.train.Stepper._step without its loss readback (a meta tensor holds no value)."""
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss / len(batches)
        autocast.clear_cache()  # autocast's cache dies when the forward's autocast region ends
        events.mark("forward_end")
        loss.backward()
        del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    events.mark("step_end")
