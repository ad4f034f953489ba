"""Decoding's weight products on CPU: mixturelm's few-row kernel (kernels.few_row_linear) against torch's
F.linear, side by side, at 1 to 64 rows, for the four weights of a `dense-medium` block (512 wide, FFN 1408,
fp32). Each product cycles through 256 MB of copies of its weight, more than the processor's caches hold, so
that every call reads its weight from memory, as a decoding step does (a whole model's weights pass between two
uses of one); torch's default threads; the least of five alternating passes. Microseconds per call, the weight
bytes per second they make, and torch / ours. layers/linear.py uses the kernel at the rows where it wins here.

    python benchmarks/mod/few_row_linear.py
    MIXTURELM_KERNEL_CFLAGS=-mno-avx512f python benchmarks/mod/few_row_linear.py   # the AVX2 build
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from mixturelm.layers import kernels

SHAPES = {"qkv 1536 x 512": (1536, 512), "out 512 x 512": (512, 512), "gate-and-up 2816 x 512": (2816, 512),
          "down 512 x 1408": (512, 1408)}
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def seconds_per_call(fn, weights) -> float:
    t0 = time.perf_counter()
    for w in weights:
        fn(w)
    return (time.perf_counter() - t0) / len(weights)


def main() -> None:
    if kernels.library() is None:
        raise SystemExit("mixturelm's CPU kernels are not built here (no C compiler, or MIXTURELM_KERNELS=0)")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32; us per call (GB/s of weight); kernels "
          f"built with {' '.join(kernels.build_flags())}")
    for label, shape in SHAPES.items():
        mb = shape[0] * shape[1] * 4 / 1e6
        weights = [torch.randn(*shape) for _ in range(math.ceil(256 * 2**20 / 1e6 / mb))]
        print(label)
        for rows in ROWS:
            x = torch.randn(rows, shape[1])
            torch.testing.assert_close(kernels.few_row_linear(x, weights[0]), F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
            contenders = {"torch": lambda w: F.linear(x, w), "ours": lambda w: kernels.few_row_linear(x, w)}
            best = {name: float("inf") for name in contenders}
            for _ in range(5):  # alternating passes; the least of each
                for name, fn in contenders.items():
                    best[name] = min(best[name], seconds_per_call(fn, weights))
            cells = "  ".join(f"{n} {s * 1e6:5.0f} ({mb / 1e3 / s:4.1f})" for n, s in best.items())
            print(f"  {rows:>3} rows: {cells}  torch/ours {best['torch'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()
