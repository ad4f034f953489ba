"""Minor page faults per forward + backward of one MoE layer and of its dense floor, in one plain process
(no allocator setting): how much fresh memory each step touches. Counts, not times: they do not depend on
the machine's load.

    python benchmarks/moe/page_faults.py
"""

from __future__ import annotations

import resource

import torch

from mixturelm.bench.timing import fwd_bwd
from mixturelm.layers.ffn import SwiGLU
from mixturelm.layers.moe import MoE

SHAPES = {"8x top-2": (8, 2, 1408), "64x top-8": (64, 8, 352)}  # experts, k, expert hidden (bench moe's)
D_MODEL, TOKENS, STEPS = 512, 4096, 3


def faulted_mib_per_step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    step = fwd_bwd(module, x, grad)
    step(), step()  # warm: the heap has grown to what a step keeps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(STEPS):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / STEPS
    return faults * resource.getpagesize() / 2**20


def main() -> None:
    print(f"{TOKENS} tokens, d_model {D_MODEL}, fp32, forward + backward; MiB page-faulted per step")
    for shape, (n_experts, top_k, d_hidden) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(1, TOKENS, D_MODEL, requires_grad=True)
        grad = torch.randn(1, TOKENS, D_MODEL)
        moe = faulted_mib_per_step(MoE(D_MODEL, n_experts=n_experts, top_k=top_k, d_expert=d_hidden), x, grad)
        dense = faulted_mib_per_step(SwiGLU(D_MODEL, top_k * d_hidden), x, grad)
        print(f"{shape:<12} MoE {moe:>6.0f}   dense floor {dense:>6.0f}")


if __name__ == "__main__":
    main()
