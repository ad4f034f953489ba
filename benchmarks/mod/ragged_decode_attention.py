"""Decoding attention of a routed block, three ways: the entering rows copied into one padded, masked batch
(mixturelm's first path), each row attending to its own cached tokens in place with one
scaled_dot_product_attention call per row (the second), and the fused kernel that does every row in one
call, writing each row's new key and value too (layers/kernels.py, mixturelm's path on CPU). 8 of 64 rows entering, with short (60-80 cached tokens)
and long (250-320) rows; median of 9 rounds of 20 calls, alternating; torch's default threads. Each call
reads the same rows, which then sit in the processor's caches: the rates are each path's best, not what a
decoding step reading them from memory gets (benchmarks/mod/routed_block_time.py measures that).

    python benchmarks/mod/ragged_decode_attention.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

from mixturelm.layers import kernels

B, CAP, G, K, R = 64, 600, 8, 64, 8
torch.manual_seed(0)
k_BLGK, v_BLGK = torch.randn(B, CAP, G, K), torch.randn(B, CAP, G, K)  # 157 MB each: out of cache
rows = torch.randperm(B)[:R].sort().values
q_RH1K = torch.randn(R, G, 1, K)
k_new, v_new = torch.randn(R, G, K), torch.randn(R, G, K)  # the new token's key and value of each row
length_B = torch.zeros(B, dtype=torch.int64)


def contenders(lengths: torch.Tensor) -> dict:
    live, ns, end = rows.tolist(), lengths.tolist(), int(lengths.max())
    for i, (r, n) in enumerate(zip(live, ns)):  # the new token in place, as the other two paths find it
        k_BLGK[r, n - 1], v_BLGK[r, n - 1] = k_new[i], v_new[i]

    def padded_batch():
        k = torch.stack([k_BLGK[r, :end] for r in live])
        v = torch.stack([v_BLGK[r, :end] for r in live])
        mask = (torch.arange(end) < lengths[:, None])[:, None, None]
        return F.scaled_dot_product_attention(q_RH1K, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)

    def row_by_row():
        return torch.cat([F.scaled_dot_product_attention(q_RH1K[i:i + 1], k_BLGK[r, :n].transpose(0, 1)[None],
                                                         v_BLGK[r, :n].transpose(0, 1)[None])
                          for i, (r, n) in enumerate(zip(live, ns))])

    def fused_kernel():  # stores the row's new token at its length and attends over length + 1 tokens
        length_B[rows] = lengths - 1
        return kernels.ragged_decode_step(q_RH1K[:, :, 0], k_new, v_new, k_BLGK, v_BLGK, length_B, rows)[:, :, None]

    return {f.__name__: f for f in (padded_batch, row_by_row, fused_kernel)}


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel built: {kernels.library() is not None}")
for lo, hi in ((60, 80), (250, 320)):
    lengths = torch.randint(lo, hi, (R,))
    fns = contenders(lengths)
    want = fns["padded_batch"]()
    for f in fns.values():
        torch.testing.assert_close(f(), want, atol=1e-5, rtol=1e-5)
    times = {name: [] for name in fns}
    for _ in range(9):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(20):
                f()
            times[name].append((time.perf_counter() - t0) / 20)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    read = sum(lengths.tolist()) * G * K * 4 * 2  # the keys and values the rows attend to, fp32
    print(f"{lo}-{hi} cached tokens per row ({read / 1e6:.1f} MB read): "
          + ", ".join(f"{name.replace('_', ' ')} {s * 1e6:.0f} us" for name, s in med.items())
          + f"; fused kernel {med['row_by_row'] / med['fused_kernel']:.2f}x faster than row by row, "
          f"{read / med['fused_kernel'] / 1e9:.1f} GB/s")
