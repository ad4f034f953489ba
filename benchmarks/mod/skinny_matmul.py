"""A decode step's weight products on this machine: torch's F.linear against mixturelm's few-row kernel
(`layers.linear.linear`, which nn.Linear layers of mixturelm call), side by side in one process.

Two settings: one 512 x 2816 fp32 weight (a block's gate-and-up projection) called again and again, so that it
stays in cache (the kernels' own rates); and the weights of the MoD benchmark's whole model (8 blocks of
4 projections, 100 MB, more than the caches of most CPUs) taken in turn, as decoding reads them. Microseconds
per call, or milliseconds per pass over the model, GB/s of weight read, and torch / ours.

    python benchmarks/mod/skinny_matmul.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mixturelm.layers.linear import SKINNY_ROWS, linear

ROWS = (1, 2, 3, 4, 8, 16)
SHAPES = [(1536, 512), (512, 512), (2816, 512), (512, 1408)]  # qkv, out, gate_up, down of a d-512 block


def seconds(fn, n: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):  # the best of five rounds of n calls
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    torch.manual_seed(0)
    one = torch.randn(2816, 512)
    model = [torch.randn(s) for _ in range(8) for s in SHAPES]
    model_bytes = sum(w.numel() * 4 for w in model)
    print(f"fp32; ours = layers.linear.linear (the few-row kernel at {SKINNY_ROWS[0]}-{SKINNY_ROWS[1]} rows, F.linear elsewhere); "
          f"torch = F.linear")
    with torch.no_grad():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            print(f"threads {threads}")
            print("  rows   one weight in cache: torch us (GB/s)  ours us (GB/s)  torch/ours"
                  f"   whole model ({model_bytes / 1e6:.0f} MB): torch ms (GB/s)  ours ms (GB/s)  torch/ours")
            for rows in ROWS:
                x = {k: torch.randn(rows, k) for k in (512, 1408)}
                t_torch = seconds(lambda: F.linear(x[512], one), 200)
                t_ours = seconds(lambda: linear(x[512], one), 200)
                m_torch = seconds(lambda: [F.linear(x[w.shape[1]], w) for w in model], 5)
                m_ours = seconds(lambda: [linear(x[w.shape[1]], w) for w in model], 5)
                gb = one.numel() * 4 / 1e9
                print(f"  {rows:>4}   {t_torch * 1e6:9.0f} ({gb / t_torch:5.1f})  {t_ours * 1e6:9.0f} ({gb / t_ours:5.1f})"
                      f"  {t_torch / t_ours:9.2f}x   {m_torch * 1e3:16.2f} ({model_bytes / 1e9 / m_torch:5.1f})"
                      f"  {m_ours * 1e3:8.2f} ({model_bytes / 1e9 / m_ours:5.1f})  {m_torch / m_ours:9.2f}x")


if __name__ == "__main__":
    main()
