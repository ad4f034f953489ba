"""What each block of `bench mod`'s MoD model costs in a 1024-token prefill, against the tokens that entered it:
the model calibrated on decoding as `bench mod` calibrates it, each of six prompts (seeds 0-5) prefilled six times
(the first untimed), wall-clock timers around every block. Each routed block's attention is timed two ways in one
process, the prompt's prefills alternating between them: the fused kernel from the projection
(kernels.ragged_attend_qkv, up to attention.FUSED_ATTENTION_MOST_TOKENS tokens), and torch's attention with the
copies around it (the path taken above that). Milliseconds per call, median; a plain block for comparison.

    python benchmarks/mod/routed_prefill_time.py
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from mixturelm.bench.mod import _calibrate_mod, _mod_models
from mixturelm.layers import attention
from mixturelm.layers.mod import MoD

SEQ_LEN, PROMPTS, CALLS = 1024, 6, 6


def main() -> None:
    model = _mod_models(SEQ_LEN, 0.125)["MoD"].eval()
    _calibrate_mod(model, 512, 32)
    spent: dict[tuple, list[float]] = defaultdict(list)
    path = {"now": ""}

    def timed(i, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[(path["now"], i)].append(time.perf_counter() - t0)
            return out
        return wrapper

    for i, block in enumerate(model.blocks):
        block.forward = timed(i, block.forward)
    routed = [i for i, b in enumerate(model.blocks) if isinstance(b, MoD)]
    most = attention.FUSED_ATTENTION_MOST_TOKENS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per block call, median of "
          f"{CALLS - 1} prefills; fused: kernels.ragged_attend_qkv for every routed block, torch: never")
    print(f"{'prompt':>6}  {'block':>5}  {'tokens in':>9}  {'fused':>7}  {'torch':>7}  {'torch - fused':>13}")
    for seed in range(PROMPTS):
        idx = torch.randint(0, 257, (1, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
        spent.clear()
        entered = None
        with torch.no_grad():
            for call in range(2 * CALLS):
                fused = call % 2 == 0
                attention.FUSED_ATTENTION_MOST_TOKENS = SEQ_LEN if fused else 0
                path["now"] = "fused" if fused else "torch"
                cache = model.new_cache(1, SEQ_LEN)
                model(idx, cache=cache, last_only=True)
                entered = [int(cache.layers[i].length_B[0]) for i in routed]
        attention.FUSED_ATTENTION_MOST_TOKENS = most
        median = {key: statistics.median(times[1:]) * 1e3 for key, times in spent.items()}
        for n, i in zip(entered, routed):
            a, b = median[("fused", i)], median[("torch", i)]
            print(f"{seed:>6}  {i:>5}  {n:>9}  {a:>7.2f}  {b:>7.2f}  {b - a:>+13.2f}")
        print(f"{seed:>6}  {routed[0] - 1:>5}  {'all':>9}  {median[('fused', routed[0] - 1)]:>7.2f}  "
              f"{median[('torch', routed[0] - 1)]:>7.2f}  (plain block)")


if __name__ == "__main__":
    main()
