"""Where a routed block's decoding call spends its time at a batch size (default 64): `bench mod`'s MoD model,
calibrated on decoding, decodes 32 tokens after 64 prompts of 512 tokens, with wall-clock timers wrapped
around the routed blocks and their parts (no profiler: its own overhead would dwarf the small operations).
Microseconds per routed-block call, median of 3 passes; each part includes the parts listed under it; and
the bytes of keys and values the store-and-attend step reads, with the rate that makes.

    python benchmarks/mod/routed_block_time.py [BATCH]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter

import torch

from mixturelm.bench.mod import _calibrate_mod, _mod_models
from mixturelm.bench.mod_decode import cache_rows, prefilled_pool
from mixturelm.layers import attention
from mixturelm.layers.mod import MoD

PARTS = [("routed block (router, rows in and out, branch)", "routed"), ("  branch (norms, residual add)", "branch"),
         ("    attention", "attn"), ("      qkv projection", "qkv"),
         ("      rotate, store and attend (ragged cache)", "attend"),
         ("      out projection", "out"), ("    FFN", "ffn"), ("      gate-and-up projection", "gate_up"),
         ("      down projection", "down")]


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    models = _mod_models(1024, 0.125)
    model = models["MoD"].eval()
    _calibrate_mod(model, 512, 32)
    pool = prefilled_pool({"MoD": model}, batch, 512, 32, 257)
    spent: Counter = Counter()

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - t0
            return out
        return wrapper

    routed = [b for b in model.blocks if isinstance(b, MoD)]
    for b in routed:
        inner = b.block
        b.forward, inner.branch = timed("routed", b.forward), timed("branch", inner.branch)
        inner.attn.forward, inner.ffn.forward = timed("attn", inner.attn.forward), timed("ffn", inner.ffn.forward)
        inner.attn.qkv.forward, inner.attn.out.forward = timed("qkv", inner.attn.qkv.forward), timed("out", inner.attn.out.forward)
        inner.ffn.gate_up.forward, inner.ffn.down.forward = (timed("gate_up", inner.ffn.gate_up.forward),
                                                             timed("down", inner.ffn.down.forward))
    def counted(fn):  # the keys and values the entering rows attend to, their new token included
        timed_fn = timed("attend", fn)

        def wrapper(rows, *args):
            c = rows.cache
            tokens = int(c.length_B[rows.rows_R].sum()) + rows.rows_R.numel()
            out = timed_fn(rows, *args)
            if out is not None:  # None: the fused step declined, the unfused one follows and counts
                spent["attend_bytes"] += tokens * c.k_BLGK.shape[2] * c.k_BLGK.shape[3] * c.k_BLGK.element_size() * 2
            return out
        return wrapper

    # the fused step from the projection (rotary embedding, store, attend), or the unfused store and attend
    attention.RaggedRows.attend_projection = counted(attention.RaggedRows.attend_projection)
    attention.RaggedRows.attend = counted(attention.RaggedRows.attend)
    steps, passes = pool.feed_BT.shape[1], []
    with torch.no_grad():
        for _ in range(4):  # the first warms up
            spent.clear()
            cache = cache_rows(pool.caches["MoD"], slice(0, batch))
            t0 = time.perf_counter()
            for t in range(steps):
                model(pool.feed_BT[:, t:t + 1], cache=cache)
            passes.append((time.perf_counter() - t0, dict(spent)))
    calls = len(routed) * steps
    print(f"batch {batch}, {steps} decoding steps, {len(routed)} routed blocks; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"step: {statistics.median(p[0] for p in passes[1:]) / steps * 1e3:.1f} ms")
    for label, key in PARTS:
        us = statistics.median(p[1].get(key, 0.0) for p in passes[1:]) / calls * 1e6
        print(f"{label:<52}{us:>8.0f} us")
    read = passes[-1][1]["attend_bytes"] / calls
    attend_s = statistics.median(p[1]["attend"] for p in passes[1:]) / calls
    print(f"store and attend read {read / 1e6:.2f} MB of keys and values per call: {read / attend_s / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
