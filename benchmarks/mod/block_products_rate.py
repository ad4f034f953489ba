"""The rate of a block's four weight products (qkv, out, gate-and-up, down of `bench mod`'s model: d_model 512,
d_ffn 1408) by the number of rows multiplied, as a routed block's prefill gets them (a few dozen to a few hundred
tokens) and a plain block's (1024): torch's F.linear in float32, each block's products timed right after a sum
over 200 MB (the weights come from memory, as in a forward pass), with oneDNN on (torch's default) and off.
Microseconds per block and GFLOP/s, the best of two passes of each.

    python benchmarks/mod/block_products_rate.py
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (1536, 512), "out": (512, 512), "gate_up": (2816, 512), "down": (512, 1408)}


def block_us(weights: dict[str, torch.Tensor], rows: int, calls: int, big: torch.Tensor) -> float:
    xs = {name: torch.randn(rows, w.shape[1]) for name, w in weights.items()}
    total = 0.0
    for _ in range(calls):
        big.sum()
        for name, w in weights.items():
            t0 = time.perf_counter()
            F.linear(xs[name], w)
            total += time.perf_counter() - t0
    return total / calls * 1e6


def main() -> None:
    warnings.filterwarnings("ignore", message=".*TF32.*")  # torch's note on Intel GPUs, when oneDNN is toggled
    torch.manual_seed(0)
    weights = {name: torch.randn(*shape) for name, shape in SHAPES.items()}
    big = torch.randn(50_000_000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; a block's four products, fp32, us per block "
          f"(GFLOP/s)")
    for rows in (16, 39, 64, 96, 128, 192, 256, 512, 1024):
        calls = 12 if rows < 512 else 5
        flops = sum(2 * rows * w.numel() for w in weights.values())
        on = min(block_us(weights, rows, calls, big) for _ in range(2))
        with torch.backends.mkldnn.flags(enabled=False):
            off = min(block_us(weights, rows, calls, big) for _ in range(2))
        print(f"{rows:5d} rows: oneDNN on {on:8.0f} ({flops / on / 1e3:4.0f})   "
              f"off {off:8.0f} ({flops / off / 1e3:4.0f})")


if __name__ == "__main__":
    main()
