"""A block's small steps in inference, torch's ops against mixturelm's kernels (layers/kernels.py), side by side in
one process: RMSNorm, the rotary embedding of q and k, the SwiGLU activation, and a Mixture-of-Depths decoding
step's routing (router weights and the rows above the threshold) and sum back into the batch (x + r f on the rows
that entered). Each at the rows a `bench mod` model gives it (d_model 512, 8 heads of 64, d_ffn 1408): 8 (a
routed block decoding at batch 64), 64 (a plain block there), 128 (a routed block prefilling 1024 tokens) and 1024
(a plain block prefilling). Microseconds per call, 200 calls (50 at 1024 rows), each timed alone: warm (back to
back), and right after a sum over 200 MB, which evicts the caches as a decoding step's weight products do.

    python benchmarks/mod/block_kernels.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from small_ops_after_streaming import per_call_us  # this folder's script: each call timed alone after `before`

from mixturelm.layers import kernels
from mixturelm.layers.attention import QKVRope, rope_angles
from mixturelm.layers.ffn import SwiGLUActivation
from mixturelm.layers.routing import fp32_linear

D, H, K, D_FFN = 512, 8, 64, 1408


def contenders(rows: int) -> dict[str, tuple]:
    """name: (torch's ops, the kernel), on inputs of `rows` tokens."""
    x, w = torch.randn(rows, 1, D), torch.ones(D)
    qkv = torch.randn(rows, 1, 3 * H, K)
    cos, sin = rope_angles(torch.arange(rows)[:, None], K, 10000.0)  # (rows, 1, K/2): one token per row
    gu = torch.randn(rows, 1, 2 * D_FFN)
    router, threshold = torch.randn(1, D) / D ** 0.5, torch.tensor(0.05)
    entered = torch.arange(0, rows, 8)  # one row in eight
    r_B, f_RD = torch.randn(rows), torch.randn(entered.numel(), D)

    def torch_route():
        r = fp32_linear(x, router).squeeze(-1)
        return r, (r > threshold).sum(1).nonzero().squeeze(1)

    def torch_add_back():
        x_R = x[entered]
        return x.index_copy(0, entered, x_R + r_B[entered][:, None, None] * f_RD[:, None])

    return {
        "RMSNorm": (lambda: F.rms_norm(x, (D,), w, 1e-5), lambda: kernels.rms_norm(x, w, 1e-5)),
        "rotary q, k": (lambda: QKVRope.apply(qkv, cos, sin, H, H), lambda: kernels.rope_rows_(qkv, cos, sin, 2 * H)),
        "SwiGLU activation": (lambda: SwiGLUActivation.apply(gu), lambda: kernels.swiglu(gu)),
        "MoD routing (decoding)": (torch_route, lambda: kernels.mod_route(x.view(rows, D), router.view(D), 0.05)),
        "MoD sum back (decoding)": (torch_add_back,
                                    lambda: kernels.mod_add_rows(x.view(rows, D), entered, r_B, f_RD, False)),
    }


def main() -> None:
    if kernels.library() is None:
        raise SystemExit("the CPU kernels are not built here (no C compiler, or MIXTURELM_KERNELS=0)")
    torch.manual_seed(0)
    big = torch.randn(50_000_000)  # 200 MB
    befores = {"warm": lambda: None, "after 200 MB": lambda: big.sum()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, us per call (torch / ours); "
          f"kernels built with {' '.join(kernels.build_flags())}")
    with torch.no_grad():
        for rows in (8, 64, 128, 1024):
            n = 50 if rows >= 1024 else 200
            for name, (torch_ops, kernel) in contenders(rows).items():
                if name.startswith("MoD") and rows > 64:
                    continue  # decoding: one token per row, batches up to 64
                cells = []
                for label, before in befores.items():
                    a, b = per_call_us(torch_ops, before, n), per_call_us(kernel, before, n)
                    cells.append(f"{label} {a:7.1f} / {b:6.1f} = {a / b:4.1f}x")
                print(f"{rows:5d} rows  {name:<24}" + "   ".join(cells))


if __name__ == "__main__":
    main()
