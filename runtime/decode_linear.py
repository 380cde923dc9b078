"""The decode step's dense projections by the matvec kernel instead of cuBLAS.

At batch 1 a projection is a matrix-vector product: its time is the weight's bytes over
the bandwidth the kernel reaches. cuBLAS reached 1.3 TB/s on Qwen3-30B-A3B's attention
projections on an H200 (29 us per layer for 38 MB); the Triton kernel that multiplies
the experts reads [out, in] weights at 3.6-3.9 TB/s. `use_matvec_projections(model)`
switches the attention modules' linear layers to it for one-row inputs on CUDA (every
other input keeps F.linear). The kernel is a custom op, so torch.compile treats it as
one opaque call and CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.library.custom_op("specmoe::matvec", mutates_args=())
def matvec_op(x: Tensor, weight: Tensor) -> Tensor:
    from specmoe.indexed_matvec import matvec

    return matvec(x.reshape(1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])


@matvec_op.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)


class MatvecLinear(nn.Linear):
    """An nn.Linear whose one-row CUDA inputs (in its weight's dtype) go to the matvec kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.numel() == x.shape[-1] and x.dtype == self.weight.dtype and self.weight.stride(1) == 1:
            y = matvec_op(x, self.weight)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def use_matvec_projections(layers, enable: bool = True) -> int:
    """Switch the plain linear layers of each decoder layer's attention (`layer.self_attn`) to
    MatvecLinear, or back; how many run it now. Needs CUDA and Triton."""
    from specmoe.indexed_matvec import available

    switched = 0
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            continue
        for module in attn.modules():
            if enable and type(module) is nn.Linear and module.weight.is_cuda and available():
                module.__class__ = MatvecLinear
            elif not enable and type(module) is MatvecLinear:
                module.__class__ = nn.Linear
            switched += type(module) is MatvecLinear
    return switched
