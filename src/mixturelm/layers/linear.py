"""nn.Linear with a faster path for decoding: a product of a few rows with a weight that no gradient needs.

Decoding multiplies each weight by a handful of rows per step (the batch, or the few rows a Mixture-of-Depths
block let in). That is a matrix-vector product in all but name: its cost is reading the weight once. On CPU,
torch's matmul at 2-16 rows does not stream the weight once; `kernels.skinny_linear` does (four weight rows at
a time, every row of x against them while they sit in L1). The layer takes it only where it is the same
computation up to summation order: CPU, float32 or float64, no autograd, at most `SKINNY_ROWS` rows, no
torch.compile trace and no dispatch mode (the FLOP counter sees F.linear). Everything else is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

SKINNY_ROWS = 8  # above this, torch's blocked matmul is the faster one (benchmarks/mod/skinny_matmul.py)


def _use_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= SKINNY_ROWS and x.device.type == "cpu" and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.float64)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and kernels.usable(x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the few-row kernel where that is the same computation."""
    if not _use_skinny(x, weight):
        return F.linear(x, weight, bias)
    y = kernels.skinny_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                              None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
