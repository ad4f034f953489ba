"""A decode step's weight products on this machine's torch: one 512 x 2816 fp32 weight (a block's
gate-and-up projection) times 1, 3 and 16 rows, at 1 and 2 threads, in three layouts; microseconds per call
and the weight bytes per second it amounts to (the weight stays in cache between calls here, so these are
the kernels' own rates, not the memory's).

    python benchmarks/mod/skinny_matmul.py
"""

from __future__ import annotations

import time

import torch


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    w = torch.randn(2816, 512)  # nn.Linear's layout
    w_t = w.t().contiguous()
    kb = w.numel() * 4 / 1e3
    print("rows x [512 x 2816] fp32: us per call (GB/s of weight)")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, 3, 16):
            x = torch.randn(rows, 512)
            times = {"F.linear(x, W)": per_call_us(lambda: torch.nn.functional.linear(x, w)),
                     "x @ W^T stored": per_call_us(lambda: x @ w_t),
                     "W @ x^T": per_call_us(lambda: w @ x.t())}
            cells = "  ".join(f"{k} {v:5.0f} ({kb / v:4.1f})" for k, v in times.items())
            print(f"threads {threads}, {rows:>2} rows: {cells}")


if __name__ == "__main__":
    main()
