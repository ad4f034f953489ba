"""The dense SwiGLU feed-forward network (Shazeer 2020), the FFN every other FFN kind is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .auxiliary import Aux
from .linear import Linear


class SwiGLUActivation(torch.autograd.Function):
    """silu(gate) * up [* scale] from the fused projection gu = [gate | up].

    One autograd node that saves only gu and writes the gradient of gu into one buffer (no cat of the
    chunk's two halves); silu is recomputed in the backward. `scale` (one per row: the MoE gate) is
    folded in here, so the routed experts pay no extra pass for it."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, scale: torch.Tensor | None = None):
        f = gu.shape[-1] // 2
        ctx.save_for_backward(gu, scale)
        out = F.silu(gu[..., :f]).mul_(gu[..., f:])
        return out if scale is None else out.mul_(scale[..., None].to(out.dtype))

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        gu, scale = ctx.saved_tensors
        f = gu.shape[-1] // 2
        gate, up = gu[..., :f], gu[..., f:]
        silu_gate = F.silu(gate)
        d_scale = None
        if scale is not None:
            if ctx.needs_input_grad[1]:
                # summed over the hidden size in float32 at least: this is the router's gradient
                wide = torch.promote_types(gu.dtype, torch.float32)
                d_scale = (d_out.to(wide) * silu_gate.to(wide) * up.to(wide)).sum(-1).to(scale.dtype)
            d_out = d_out * scale[..., None].to(d_out.dtype)
        if torch.compiler.is_compiling():  # out= into a strided view is a graph break; compile fuses this
            return torch.cat([torch.ops.aten.silu_backward(d_out * up, gate), silu_gate * d_out], -1), d_scale
        d_gu = torch.empty_like(gu)
        torch.ops.aten.silu_backward.grad_input(d_out * up, gate, grad_input=d_gu[..., :f])
        torch.mul(silu_gate, d_out, out=d_gu[..., f:])
        return d_gu, d_scale


def swiglu_activation(gu: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    if scale is None and gu.shape[-1] % 2 == 0 and kernels.inference_ready(gu):  # inference: one call, no autograd node
        return kernels.swiglu(gu)
    return SwiGLUActivation.apply(gu, scale)


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) * W3 x), with W1 and W3 fused into one matmul. Returns (y, Aux()) like every
    layer of a block's FFN slot: a dense FFN has no losses and no statistics."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.d_hidden = d_hidden
        self.gate_up = Linear(d_model, 2 * d_hidden, bias=False)
        self.down = Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        return self.down(swiglu_activation(self.gate_up(x))), Aux()
