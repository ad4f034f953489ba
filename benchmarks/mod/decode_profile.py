"""Where a Mixture-of-Depths decoding step at batch 16 spends its time: the torch profiler over 20 steps of
`bench mod`'s MoD model (calibrated on decoding), the matrix products and attention calls grouped by shape.

    python benchmarks/mod/decode_profile.py [BATCH]
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import profile

from mixturelm.bench.mod import _mod_models
from mixturelm.bench.mod_decode import cache_rows, prefilled_pool
from mixturelm.mechanisms.mod import calibrate_on_decoding

OPS = ("aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    torch.manual_seed(0)
    model = _mod_models(1024, 0.125)["MoD"].eval()
    g = torch.Generator().manual_seed(5)
    calibrate_on_decoding(model, torch.randint(0, 257, (32, 512), generator=g),
                          torch.randint(0, 257, (32, 32), generator=g))
    pool = prefilled_pool({"MoD": model}, batch, 512, 32, 257)
    with torch.no_grad():
        cache = cache_rows(pool.caches["MoD"], slice(0, batch))
        for t in range(4):
            model(pool.feed_BT[:, t:t + 1], cache=cache, last_only=True)
        with profile(record_shapes=True) as prof:
            for t in range(4, 24):
                model(pool.feed_BT[:, t:t + 1], cache=cache, last_only=True)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in OPS]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"batch {batch}, 20 decoding steps, {total / 1e3:.0f} ms of operator time; by shape:")
    print(f"{'op':<12}{'calls':>6}{'us/call':>9}{'GB/s':>7}  shapes")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        shapes = [s for s in e.input_shapes if s]
        read = sum(torch.Size(s).numel() for s in shapes) * 4  # fp32 operands read once
        us = e.self_cpu_time_total / e.count
        name = "mm" if e.key == "aten::mm" else "attention"
        print(f"{name:<12}{e.count:>6}{us:>9.0f}{read / us / 1e3:>7.1f}  {shapes}")


if __name__ == "__main__":
    main()
