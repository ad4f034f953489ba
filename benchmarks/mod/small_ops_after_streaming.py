"""Why a decoding step's small operations cost more than they do in a loop: a few-row weight product streams
megabytes of weight through the processor's caches and evicts what the next small operation needs (its input,
and the interpreter's and dispatcher's own code and data). Each small operation on 8 rows of 512 floats
(what a routed block of `bench mod` gets at batch 64) is timed alone, 200 times: warm (run back to back),
and each time right after one of four things a decoding step does between them. Microseconds per call.

    python benchmarks/mod/small_ops_after_streaming.py
    MIXTURELM_KERNEL_CFLAGS=-DFR_PREFETCH_HINT=0 python benchmarks/mod/small_ops_after_streaming.py  # non-temporal
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mixturelm.layers import kernels


def per_call_us(op, before, n: int = 200) -> float:
    total = 0.0
    for _ in range(n):
        before()
        t0 = time.perf_counter()
        op()
        total += time.perf_counter() - t0
    return total / n * 1e6


def main() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(2816, 512) for _ in range(40)]  # a block's gate-and-up weight, 40 copies: from memory
    big = torch.randn(50_000_000)  # 200 MB
    x, norm_weight, rows8, rows64 = torch.randn(8, 1, 512), torch.ones(512), torch.randn(8, 512), torch.randn(64, 512)
    turn = iter(range(10**9))
    befores = {"warm (back to back)": lambda: None,
               "after a sum over 200 MB": lambda: big.sum(),
               "after torch's 64-row product": lambda: F.linear(rows64, weights[next(turn) % 40])}
    if kernels.library() is not None:
        befores["after the few-row kernel, 8 rows"] = lambda: kernels.few_row_linear(rows8, weights[next(turn) % 40])
    ops = {"x + x": lambda: x + x, "x > 0": lambda: x > 0,
           "rms_norm": lambda: F.rms_norm(x, (512,), norm_weight, 1e-5)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one op on (8, 1, 512) fp32, us per call; "
          f"kernels built with {' '.join(kernels.build_flags())}")
    print(f"{'':<36}" + "".join(f"{name:>10}" for name in ops))
    with torch.no_grad():
        for label, before in befores.items():
            print(f"{label:<36}" + "".join(f"{per_call_us(op, before):>10.1f}" for op in ops.values()))


if __name__ == "__main__":
    main()
