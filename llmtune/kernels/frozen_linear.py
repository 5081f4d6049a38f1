"""PRIVATE API: torch's oneDNN linear with a pre-packed weight, for frozen weights in bf16 on a CPU.

A bf16 matmul on a CPU goes through oneDNN, which first reorders a plain weight into its blocked layout, in every
call. A frozen weight (LoRA's base layers, a frozen output head) never changes, so llmtune lays it out once, as W
for `x W^T` and as W^T for the input gradient `g W`, with the ops torch's own compiler uses for frozen CPU weights
(`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`; underscored, with no public equivalent).
Results are bit-identical to the plain matmuls. On the native-bf16 EPYC, SmolLM2's frozen matmuls at a step's
~500 rows ran at 390-400 GFLOP/s packed against 300-370 plain (its 49k-row output head at 170 rows: 404 / 396
forward / backward against 348 / 315). The two packed copies together are the size of the float32 weight: one
bf16 copy more than a plain cast of it; a weight already in bf16 is not packed (its cast is free, the pair would
be two copies more). bf16 only (measured on a CPU with avx512_bf16), only where oneDNN is enabled and supports
bf16 on this CPU and this torch has the ops; otherwise the plain matmuls run. Canary:
tests/test_patches.py::test_torch_still_has_onednn_packed_linear_giving_the_plain_matmuls_results.
"""

from __future__ import annotations

import functools

import torch


class FrozenLinear:
    """A frozen weight (out x in) and bias in one dtype, with the two matmuls training needs from it: `x W^T + b`
    and the input gradient `g W`, packed for oneDNN or plain (`cast` decides where it packs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: bool = False):
        self.dtype, self.device, self.out_features, self.bias = weight.dtype, weight.device, weight.shape[0], bias
        self.packed = packed
        if self.packed:
            reorder = torch.ops.mkldnn._reorder_linear_weight
            self.weight, self.transposed = reorder(weight), reorder(weight.t().contiguous())
        else:
            self.weight = weight

    @classmethod
    def cast(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, pack: bool = True) -> FrozenLinear:
        """`weight` and `bias` cast to `dtype`; with `pack`, packed where `packs(dtype)` on a CPU unless already in
        `dtype`."""
        cast = weight.detach().to(dtype)
        packed = pack and weight.dtype != dtype and cast.device.type == "cpu" and packs(dtype)
        return cls(cast, None if bias is None else bias.detach().to(dtype), packed)

    @classmethod
    def kept(cls, store: dict, slot: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
             pack: bool = True) -> FrozenLinear:
        """`cast`, kept in `store[slot]` and made again only when the weight or bias changes: a new device, storage
        (replaced) or version (changed in place, as by loading a checkpoint). The old copies go before the new ones
        are made, so a change never holds two."""
        key = (dtype, pack, weight.device, weight.data_ptr(), weight._version,
               None if bias is None else (bias.data_ptr(), bias._version))
        kept = store.get(slot)
        if kept is None or kept[0] != key:
            store.pop(slot, None)
            kept = store[slot] = (key, cls.cast(weight, bias, dtype, pack))
        return kept[1]

    def forward(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows (... x in) W^T + bias. `out`: a 2-D buffer a plain matmul writes into (a packed one makes its own);
        use the result either way."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        if out is None:
            return torch.nn.functional.linear(rows, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(rows, self.weight.T, out=out)
        return torch.addmm(self.bias, rows, self.weight.T, out=out)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad (n x out) W: the gradient for the rows."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(grad, self.transposed, None, "none", [], "")
        return grad @ self.weight


def packs(dtype: torch.dtype) -> bool:
    """Whether frozen weights in `dtype` are packed: bf16, where oneDNN is enabled, supports bf16 on this CPU and
    torch has the ops."""
    return torch.backends.mkldnn.enabled and _packs_here(dtype)


@functools.cache
def _packs_here(dtype: torch.dtype) -> bool:
    ops = torch.ops.mkldnn
    return (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
            and ops._is_mkldnn_bf16_supported())
