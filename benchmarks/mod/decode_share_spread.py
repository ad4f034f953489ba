"""How the share of decoded tokens entering each routed block varies from one sequence to the next, in
`bench mod`'s MoD model calibrated on decoding as the benchmark does: 64 prompts of 512 tokens (not the
calibration ones), 32 tokens fed after each; per routed block, the mean share and its range over sequences.

    python benchmarks/mod/decode_share_spread.py
"""

from __future__ import annotations

import copy

import torch

from mixturelm.bench.mod import _calibrate_mod, _mod_models
from mixturelm.bench.mod_decode import prefilled_pool, ragged_lengths

PROMPT, FED, ROWS = 512, 32, 64


def main() -> None:
    model = _mod_models(2 * PROMPT, 0.125)["MoD"].eval()
    _calibrate_mod(model, PROMPT, FED)
    pool = prefilled_pool({"MoD": model}, ROWS, PROMPT, FED, 257)
    cache = copy.deepcopy(pool.caches["MoD"])
    before = [n.clone() for n in ragged_lengths(cache)]
    with torch.no_grad():
        for i in range(FED):
            model(pool.feed_BT[:, i:i + 1], cache=cache)
    print(f"{ROWS} sequences, {FED} tokens decoded after each; share entering each routed block")
    print(f"{'block':>6}{'mean':>8}{'min':>8}{'max':>8}")
    for b, (n, n0) in enumerate(zip(ragged_lengths(cache), before)):
        share = (n - n0).float() / FED
        print(f"{b:>6}{share.mean():>8.1%}{share.min():>8.1%}{share.max():>8.1%}")


if __name__ == "__main__":
    main()
