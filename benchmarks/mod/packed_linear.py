"""A block's four weight products (qkv, out, gate-and-up, down of `bench mod`'s model: d_model 512, d_ffn 1408) by
the number of rows multiplied: torch's F.linear against the same products on weights oneDNN packed once
(torch.ops.mkldnn._reorder_linear_weight, then torch.ops.mkldnn._linear_pointwise per call, as Inductor's CPU
freezing does), and the few-row kernel where it serves. Each block's products are timed right after a sum over 200
MB (the weights come from memory, as in a forward pass); the contenders alternate block by block, five rounds,
the median round. Microseconds per block, GFLOP/s, and F.linear's time over each contender's. Last, what the
packed products cost the first time they meet a row count: oneDNN builds a kernel for each shape it is given.

    python benchmarks/mod/packed_linear.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from mixturelm.layers import kernels, linear

SHAPES = {"qkv": (1536, 512), "out": (512, 512), "gate_up": (2816, 512), "down": (512, 1408)}
ROWS = (2, 8, 16, 32, 33, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def main() -> None:
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch has no oneDNN")
    torch.manual_seed(0)
    weights = {name: torch.randn(*shape) for name, shape in SHAPES.items()}
    packed = {name: torch.ops.mkldnn._reorder_linear_weight(w, None) for name, w in weights.items()}
    big = torch.randn(50_000_000)
    few = linear.few_rows()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; a block's four products, fp32, us per block "
          f"(GFLOP/s); the few-row kernel serves {few.start}-{few.stop - 1} rows")
    for rows in ROWS:
        xs = {name: torch.randn(rows, w.shape[1]) for name, w in weights.items()}
        contenders = {"F.linear": lambda n: F.linear(xs[n], weights[n]),
                      "packed": lambda n: torch.ops.mkldnn._linear_pointwise(xs[n], packed[n], None, "none", [], "")}
        if rows in few:
            contenders["few-row"] = lambda n: kernels.few_row_linear(xs[n], weights[n])
        for name in SHAPES:  # the same products, whichever computes them
            want = F.linear(xs[name], weights[name])
            for c, fn in contenders.items():
                torch.testing.assert_close(fn(name), want, rtol=1e-4, atol=1e-3, msg=f"{c}, {rows} rows, {name}")
        calls = 8 if rows <= 256 else 3
        rounds: dict[str, list[float]] = {c: [] for c in contenders}
        for _ in range(5):
            spent = dict.fromkeys(contenders, 0.0)
            for _ in range(calls):
                for c, fn in contenders.items():
                    big.sum()
                    t0 = time.perf_counter()
                    for name in SHAPES:
                        fn(name)
                    spent[c] += time.perf_counter() - t0
            for c in contenders:
                rounds[c].append(spent[c] / calls * 1e6)
        us = {c: statistics.median(r) for c, r in rounds.items()}
        flops = sum(2 * rows * w.numel() for w in weights.values())
        cells = [f"{c} {t:7.0f} ({flops / t / 1e3:4.0f})" for c, t in us.items()]
        ratios = [f"F.linear / {c} {us['F.linear'] / t:.2f}x" for c, t in us.items() if c != "F.linear"]
        print(f"{rows:5d} rows: " + "   ".join(cells) + "   " + ", ".join(ratios))
    first_call(weights, packed, big)


def first_call(weights: dict[str, torch.Tensor], packed: dict[str, torch.Tensor], big: torch.Tensor) -> None:
    """A block's packed products at row counts never seen before (as each new prompt routes its own number of tokens
    into a routed block), then again at the same counts."""
    print("packed products at a row count met for the first time, and again (us per block, median of 8 counts):")
    for start in (100, 200):
        times: dict[str, list[float]] = {"first": [], "again": []}
        for rows in range(start + 1, start + 9):
            xs = {name: torch.randn(rows, w.shape[1]) for name, w in weights.items()}
            for when in times:
                big.sum()
                t0 = time.perf_counter()
                for name in SHAPES:
                    torch.ops.mkldnn._linear_pointwise(xs[name], packed[name], None, "none", [], "")
                times[when].append((time.perf_counter() - t0) * 1e6)
        first, again = statistics.median(times["first"]), statistics.median(times["again"])
        print(f"  {start + 1}-{start + 8} rows: first {first:7.0f}   again {again:7.0f}   first - again {first - again:6.0f}")


if __name__ == "__main__":
    main()
