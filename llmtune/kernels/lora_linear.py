"""A LoRA linear layer that computes `x W^T + s (x A^T) B^T` and its gradients in fewer passes than peft's.

peft's layer runs the frozen linear and the adapter as separate modules: a full-size `* scaling`, a full-size
add, and, in the backward pass, a second full-size gradient for `x` that autograd then adds to the first. On a
CPU those memory-bound passes over (tokens x features) tensors cost about a quarter of each adapted linear's time.
`FusedLoraLinear` does the same arithmetic with the scaling folded into `addmm`: one output tensor, one input
gradient. Everything else - parameters, names, saving, merging, DoRA and the other variants, dropout, several
active adapters, mixed-adapter batches - is peft's `lora.Linear`, which this subclasses and falls back to whenever
the fused path does not apply. Saved adapters are ordinary peft adapters.

It is plugged in through peft's custom-module hook (llmtune/patches/peft_custom_module.py).
"""

from __future__ import annotations

import weakref

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch.distributed.tensor import DTensor

from llmtune.kernels.frozen_linear import FrozenLinear


class _LoraMatmul(torch.autograd.Function):
    """out = x W^T + bias + s (x A^T) B^T with frozen W/bias; gradients for x, A and B. `packed`: W and bias packed
    for oneDNN (kept by the module), or None to use `weight` and `bias` as they are."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, packed):
        base = packed if packed is not None else FrozenLinear(weight, bias, packed=False)
        ctx.input_dtype, ctx.scaling, ctx.packed = x.dtype, scaling, packed
        rows = _cast_once(x, base.dtype).reshape(-1, x.shape[-1])
        hidden = rows @ lora_a.T
        out = base.forward(rows)
        out.addmm_(hidden, lora_b.T, alpha=scaling)
        # a plain weight is saved like any tensor (checkpointing drops it, autograd checks its version)
        ctx.save_for_backward(rows, lora_a, lora_b, hidden, None if packed is not None else weight)
        return out.view(*x.shape[:-1], base.out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the packed matmuls have no autograd of their own
    def backward(ctx, grad_out):
        rows, lora_a, lora_b, hidden, weight = ctx.saved_tensors
        base = ctx.packed if ctx.packed is not None else FrozenLinear(weight, packed=False)
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = (grad @ lora_b).mul_(ctx.scaling)
        grad_b = (grad.T @ hidden).mul_(ctx.scaling)
        grad_a = grad_hidden.T @ rows
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = base.input_grad(grad).addmm_(grad_hidden, lora_a).view(*grad_out.shape[:-1], -1)
            grad_x = grad_x.to(ctx.input_dtype)  # what the backward of a cast outside would do
        return grad_x, None, None, grad_a, grad_b, None, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA linear with a fused single-adapter training path (see the module docstring)."""

    # Whether the frozen bf16 copy is also packed for oneDNN on a CPU; `keep_frozen_weights_unpacked` turns it off.
    pack_frozen_weights = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_alone_under_autocast(x, args, kwargs):  # e.g. DPO's reference: the policy, adapters off
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return self._frozen_base_in(dtype).forward(_cast_once(x, dtype))
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # What autocast would do to each matmul, done once up front; the adapter casts are differentiable, so
            # the float32 adapter weights still receive their gradients. The input is cast inside (shared).
            dtype = torch.get_autocast_dtype(device)
            lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
            base = self._frozen_base_in(dtype)
            with torch.autocast(device, enabled=False):
                return _LoraMatmul.apply(x, base.weight, base.bias, lora_a, lora_b, self.scaling[adapter],
                                         base if base.packed else None)
        return _LoraMatmul.apply(x, self.base_layer.weight, self.base_layer.bias, lora_a, lora_b, self.scaling[adapter],
                                 None)

    def _frozen_base_in(self, dtype: torch.dtype) -> FrozenLinear:
        """The frozen base weight and bias in the autocast dtype; on a CPU cast once, packed for oneDNN where it
        can be (kernels/frozen_linear.py), and kept until they change.

        Autocast would cast them again in every forward pass, a read and write of every frozen weight per step.
        Without activation checkpointing a plain copy is the very tensor autocast would have made and saved for the
        backward pass, so it adds nothing at the step's peak: on a CPU with native bf16 (an interleaved A/B of
        llmtune's SFT LoRA worker) peak RSS was 2.57 vs 2.84 GB with it, and a short DPO run's 2.75-2.93 vs
        3.10-3.17 GB. The packed pair is one bf16 copy more (of float32 weights), and bought 5-7% of an SFT LoRA
        step for 0.11-0.28 GB of peak RSS (SmolLM2-135M, 3 interleaved pairs of `speed.py`'s worker). With
        checkpointing the copies are extra. Only on a CPU, where it was measured, and never while compiling or under
        inference mode (its tensors could not be saved for a later backward pass). A weight changed in place (loading
        a checkpoint) or replaced has a new version or address and is cast again; moving the module, merging or
        unmerging drops the copy."""
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if weight.device.type != "cpu" or not _copies_may_be_kept():
            return FrozenLinear.cast(weight, bias, dtype, pack=False)
        # kept as a plain attribute: not a parameter or buffer, never in a state dict
        return FrozenLinear.kept(self.__dict__, "_cast_base", weight, bias, dtype, self.pack_frozen_weights)

    def _drop_cast(self) -> None:
        self.__dict__.pop("_cast_base", None)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cpu(), .half() ...
        self._drop_cast()
        return super()._apply(fn, *args, **kwargs)

    def merge(self, *args, **kwargs) -> None:  # peft edits the weight through .data, which keeps its version
        self._drop_cast()
        super().merge(*args, **kwargs)

    def unmerge(self) -> None:
        self._drop_cast()
        super().unmerge()

    def __getstate__(self) -> dict:  # deepcopy and pickling leave the copy behind
        state = dict(super().__getstate__())  # a copy: the module's own __dict__ keeps its copy
        state.pop("_cast_base", None)
        return state

    def _base_alone_under_autocast(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether peft would run the frozen base layer alone (adapters disabled), under autocast, for an input that
        needs no gradient (the packed matmuls have no autograd; such a rare pass goes through peft)."""
        return (self.disable_adapters and not self.merged and not args and not kwargs
                and torch.is_autocast_enabled(x.device.type) and self._frozen_whole_linear_base()
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _frozen_whole_linear_base(self) -> bool:
        """Whether the base layer is a plain nn.Linear, frozen, and whole on this process."""
        base = self.base_layer
        return (type(base) is torch.nn.Linear and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad) and _local(base.weight))

    def _fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active plain-LoRA adapter when the fused path computes exactly what peft would, else None."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        adapter = active[0]
        if not self._frozen_whole_linear_base():
            return None
        plain_lora = (
            adapter not in self.lora_variant
            and isinstance(self.lora_dropout[adapter], torch.nn.Identity)
            and self.lora_B[adapter].bias is None
        )
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        same_dtype = x.dtype == self.base_layer.weight.dtype == lora_a.dtype
        if plain_lora and _local(lora_a) and _local(lora_b) and (
            same_dtype or torch.is_autocast_enabled(x.device.type)
        ):
            return adapter
        return None


_last_cast: tuple | None = None  # (weak reference to the input, (its version, dtype), the cast copy)


def _cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, one copy for consecutive projections of the same input.

    q, k and v read one hidden state, gate and up another. Cast apart (as autocast does), each projection makes and
    saves for the backward pass its own copy: on SmolLM2 three extra (tokens x hidden) bf16 tensors per layer, and
    their cast passes. Shared, a DPO step on a 4 x 363-token batch saves 1,351 rather than 1,495 MB for backward.
    Only for casts that autograd does not follow (inside `_LoraMatmul`, or with gradients off): a shared
    differentiable cast would sum its consumers' gradients in bf16 rather than float32. Never under inference mode
    (a later training step could not save its copy) or while compiling. The copy lives as long as the input does;
    like autocast's own weight cache, it does not see a write through `.data`, which keeps the version."""
    global _last_cast
    if (x.dtype == dtype or (torch.is_grad_enabled() and x.requires_grad) or not _copies_may_be_kept()
            or x.is_inference()):  # inference tensors have no version
        return x.to(dtype)
    last = _last_cast
    if last is not None and last[0]() is x and last[1] == (x._version, dtype):
        return last[2]
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x, _forget_cast), (x._version, dtype), cast)
    return cast


def _forget_cast(reference: weakref.ref) -> None:
    global _last_cast
    last = _last_cast
    if last is not None and last[0] is reference:
        _last_cast = None


def _copies_may_be_kept() -> bool:
    """Whether a cast copy may outlive the call that made it: not while compiling, nor under inference mode,
    whose tensors a later training step could not save for its backward pass."""
    return not (torch.compiler.is_compiling() or torch.is_inference_mode_enabled())


def _local(param: torch.Tensor) -> bool:
    """Whether the weight is whole on this process. DeepSpeed ZeRO-3 gathers a partitioned weight only when its
    own module is called, which the fused path skips; FSDP2 outside its unit's forward holds a DTensor shard."""
    return not hasattr(param, "ds_id") and not isinstance(param, DTensor)


def keep_frozen_weights_unpacked(model: torch.nn.Module) -> None:
    """Keep the model's fused LoRA layers' frozen weights as plain bf16 copies, not packed for oneDNN. For preference
    training: there packing cost both time and memory (a DPO worker of `speed.py`, SmolLM2-135M, 14,000 tokens,
    batch 2, on a CPU with avx512_bf16: 75.5 and 76.9 s and 3.54 and 3.78 GB peak RSS packed, 71.6 and 72.1 s and
    3.43 and 3.33 GB plain), where SFT gained 5-7%. Why was not profiled: a DPO step differs from an SFT one by its
    reference pass (adapters off) and by padded batches."""
    for module in model.modules():
        if isinstance(module, FusedLoraLinear):
            module.pack_frozen_weights = False
            module._drop_cast()
