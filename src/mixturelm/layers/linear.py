"""nn.Linear with a faster path for decoding: the product of a few rows with a weight no gradient needs.

Decoding multiplies each weight by a handful of rows per step (the batch, or the few rows a Mixture-of-Depths
block let in): its cost is reading the weight once. On CPU, torch's matmul at 2-32 rows reads the weight at a
third to a half of the memory's rate; `kernels.few_row_linear` streams it once (benchmarks/mod/few_row_linear.py
measures both side by side). The layer takes the kernel only where it computes the same product up to summation
order: CPU float32, FEW_ROWS rows, no autograd, no torch.compile trace, no dispatch mode (the FLOP counter must
see F.linear), kernels built. Everything else is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# Where the kernel beat torch's F.linear on every weight of a block (benchmarks/mod/few_row_linear.py): at one
# row torch's matrix-vector product is as fast, and from about 48 rows its blocked matmul is.
FEW_ROWS = range(2, 33)
_PLAIN = (torch.Tensor, nn.Parameter)  # not a tensor subclass (DTensor, fake tensors): those have their own dispatch


def _few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel computes exactly what F.linear would here (up to summation order); anything else,
    including shapes F.linear would refuse or broadcast, goes to F.linear."""
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return False
    return (x.numel() // x.shape[-1] in FEW_ROWS and all(type(t) in _PLAIN for t in (x, weight, bias) if t is not None)
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and weight.is_contiguous() and not torch.compiler.is_compiling() and kernels.plain_dispatch()
            and not torch.is_autocast_enabled(x.device.type)  # F.linear would compute in autocast's dtype
            and kernels.usable(x, weight, *(() if bias is None else (bias,))))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the few-row kernel where that is the same computation."""
    if not _few_rows(x, weight, bias):
        return F.linear(x, weight, bias)
    y = kernels.few_row_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight,
                               None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict, same initialisation) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
