"""nn.Linear with a faster path for decoding: the product of a few rows with a weight no gradient needs.

Decoding multiplies each weight by a handful of rows per step (the batch, or the few rows a Mixture-of-Depths
block let in): its cost is reading the weight once. On CPU, torch's matmul at 2-32 rows reads the weight at a
third to a half of the memory's rate; `kernels.few_row_linear` streams it once (benchmarks/mod/few_row_linear.py
measures both side by side). The layer takes the kernel only where it computes the same product up to summation
order: CPU float32, few_rows() rows, no autograd, no torch.compile trace, no dispatch mode (the FLOP counter must
see F.linear), kernels built. Everything else is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# The most rows at which the kernel beat torch's F.linear on a block's weights, by the kernel's vector width
# (benchmarks/mod/few_row_linear*.txt: the AVX-512 build up to 32 rows, the AVX2 build up to 16; the 4-lane
# build was no faster than torch at any row count, so it is not used). At one row torch's matrix-vector
# product is as fast as the kernel.
MOST_ROWS_BY_LANES = {16: 32, 8: 16}
_few_row_range: range | None = None
_PLAIN = (torch.Tensor, nn.Parameter)  # not a tensor subclass (DTensor, fake tensors): those have their own dispatch


def few_rows() -> range:
    """The row counts the layer sends to the kernel here: 2 to MOST_ROWS_BY_LANES of the built kernel's width."""
    global _few_row_range
    if _few_row_range is None:
        _few_row_range = range(2, MOST_ROWS_BY_LANES.get(kernels.few_row_lanes(), 1) + 1)
    return _few_row_range


def _few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel computes exactly what F.linear would here (up to summation order); anything else,
    including shapes F.linear would refuse or broadcast, goes to F.linear."""
    if (torch.compiler.is_compiling() or x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or x.shape[-1] == 0):
        return False
    return (x.numel() // x.shape[-1] in few_rows() and all(type(t) in _PLAIN for t in (x, weight, bias) if t is not None)
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and weight.is_contiguous() and kernels.plain_dispatch()
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
