"""A lead for decoding's few-row weight products on CPU: torch's F.linear against MKL's pre-packed weights
(torch.ops.mkl._mkl_reorder_linear_weight once, then torch.ops.mkl._mkl_linear per call, as Inductor does with
freezing), for one 2816 x 512 fp32 weight (a block's gate-and-up projection) at 1 to 64 rows. Forty weights are
cycled (230 MB) so that each call reads its weight from memory, as a decoding step does; torch's default
threads; microseconds per call and the weight bytes per second that makes. Not used by mixturelm.

    python benchmarks/mod/mkl_packed_linear.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def main() -> None:
    if not torch.backends.mkl.is_available():
        raise SystemExit("this torch has no MKL")
    torch.manual_seed(0)
    weights = [torch.randn(2816, 512) for _ in range(40)]
    mb = weights[0].numel() * 4 / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 2816 x 512 fp32 weight ({mb:.1f} MB)")
    for rows in (1, 2, 4, 8, 16, 64):
        x = torch.randn(rows, 512)
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
        torch.testing.assert_close(torch.ops.mkl._mkl_linear(x, packed[0], weights[0], None, rows),
                                   F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
        contenders = {"F.linear": lambda w, p: F.linear(x, w),
                      "MKL packed": lambda w, p: torch.ops.mkl._mkl_linear(x, p, w, None, rows)}
        seconds = {}
        for _ in range(2):  # the first pass warms up; the second is kept
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                for w, p in zip(weights, packed):
                    fn(w, p)
                seconds[name] = (time.perf_counter() - t0) / len(weights)
        cells = "  ".join(f"{n} {s * 1e6:5.0f} us ({mb / 1e3 / s:4.1f} GB/s)" for n, s in seconds.items())
        print(f"{rows:>3} rows: {cells}  F.linear / packed {seconds['F.linear'] / seconds['MKL packed']:.2f}x; "
              f"packed copy {packed[0].numel() * packed[0].element_size() / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
