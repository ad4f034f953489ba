"""Decoding attention of a routed block: the entering rows copied into one padded, masked batch (the old
path) against each row attending to its own cached tokens in place (mixturelm's path since 2026-12-07).
One thread; 8 of 64 rows entering, 250-320 cached tokens each; median of 9 rounds of 20 calls, alternating.

    python benchmarks/mod/ragged_decode_attention.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
B, CAP, G, K, R = 64, 600, 8, 64, 8
torch.manual_seed(0)
k_BLGK, v_BLGK = torch.randn(B, CAP, G, K), torch.randn(B, CAP, G, K)
rows = torch.randperm(B)[:R].sort().values.tolist()
lengths = [int(n) for n in torch.randint(250, 320, (R,))]
q_RH1K = torch.randn(R, G, 1, K)
end = max(lengths)


def padded_batch():
    k = torch.stack([k_BLGK[r, :end] for r in rows])
    v = torch.stack([v_BLGK[r, :end] for r in rows])
    mask = (torch.arange(end) < torch.tensor(lengths)[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q_RH1K, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)


def in_place():
    return torch.cat([F.scaled_dot_product_attention(q_RH1K[i:i + 1], k_BLGK[r, :n].transpose(0, 1)[None],
                                                     v_BLGK[r, :n].transpose(0, 1)[None])
                      for i, (r, n) in enumerate(zip(rows, lengths))])


torch.testing.assert_close(in_place(), padded_batch(), atol=1e-5, rtol=1e-5)
times = {f.__name__: [] for f in (padded_batch, in_place)}
for _ in range(9):
    for f in (padded_batch, in_place):
        t0 = time.perf_counter()
        for _ in range(20):
            f()
        times[f.__name__].append((time.perf_counter() - t0) / 20)
med = {name: statistics.median(ts) for name, ts in times.items()}
print(f"padded batch {med['padded_batch'] * 1e3:.2f} ms, in place {med['in_place'] * 1e3:.2f} ms, "
      f"ratio {med['padded_batch'] / med['in_place']:.2f}x")
