"""The optimizer step on PEER's expert tables alone: mixturelm's row-wise Adam against torch.optim.SparseAdam
(the same arithmetic) and torch.optim.AdamW on the dense gradient, at the paper's N = 1024^2 and d 256, one
table, with the rows one step of 2,048 tokens x 8 heads x 16 retrieves (about 218k distinct of 1M).
Alternating, in one plain process; the state is created by an untimed first step.

    python benchmarks/peer/optimizer_step.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from mixturelm.optim import AdamRows

N, D, TABLES, PAIRS = 1024 * 1024, 256, 1, 2048 * 8 * 16  # one table: three contenders of 3 GB each fit in memory


def sparse_gradient(gen: torch.Generator) -> torch.Tensor:
    rows = torch.unique(torch.randint(0, N, (PAIRS,), generator=gen))
    return torch.sparse_coo_tensor(rows[None], torch.randn(rows.numel(), D, generator=gen), (N, D),
                                   is_coalesced=True, check_invariants=False)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    gen = torch.Generator().manual_seed(0)
    grads = [sparse_gradient(gen) for _ in range(TABLES)]
    contenders = {}
    for name in ("row-wise Adam (mixturelm)", "torch.optim.SparseAdam", "torch.optim.AdamW, dense gradient"):
        params = [torch.nn.Parameter(torch.randn(N, D, generator=gen) * 0.02) for _ in range(TABLES)]
        if name.startswith("row"):
            opt = AdamRows([{"params": params, "row_sparse": True}], lr=1e-3)
        elif "Sparse" in name:
            opt = torch.optim.SparseAdam(params, lr=1e-3)
        else:
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

        def step(params=params, opt=opt, dense="AdamW" in name):
            for p, g in zip(params, grads):
                p.grad = g.to_dense() if dense else g.clone()
            t0 = time.perf_counter()
            opt.step()
            return time.perf_counter() - t0

        step()
        contenders[name] = step
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            times[name].append(step())
    rows = sum(g._nnz() for g in grads) / TABLES
    print(f"{TABLES} tables of {N:,} x {D} fp32, {rows:,.0f} rows touched per table; optimizer step only "
          f"(median of {rounds} rounds), {torch.get_num_threads()} threads")
    ours = statistics.median(times["row-wise Adam (mixturelm)"])
    for name, ts in times.items():
        print(f"  {name:<36}{statistics.median(ts):>8.3f} s{statistics.median(ts) / ours:>8.1f}x ours")


if __name__ == "__main__":
    main()
