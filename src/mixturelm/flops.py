"""Analytic FLOP accounting for any ModelConfig, by component, and a matmul peak to compute MFU.

Conventions (the same as torch.utils.flop_counter.FlopCounterMode, which a test checks us against):
- a multiply-add is 2 FLOPs; only matrix products are counted (norms, RoPE, softmax, SiLU are not);
- attention scores count the full T x T products (QK^T and AV) that SDPA computes, causal or not:
  4 * T * n_heads * head_dim FLOPs per token per layer, at the training sequence length T;
- a Mixture-of-Depths block at training capacity c = C/T (C = ceil(capacity x T) tokens enter) costs its
  linear parts x c and its attention scores x c^2 (C queries over C keys), plus the router and, for the
  causal predictor, the predictor on every token. That is what `--max-flops` and isoFLOP comparisons
  count; it is the top-k routing of training, not the threshold routing of sampling, whose fraction varies;
- training FLOPs per token = 3 x forward (the backward pass is two matmuls per forward matmul), except
  the parts in FORWARD_ONLY_PARTS, which have no backward: PEER's sub-key scores (the top-k has no
  gradient; the chosen keys' scores are recomputed, and that recomputation is counted apart);
- PEER's expert rows are read by gathers and EmbeddingBags, which FlopCounterMode does not count:
  `flop_counter()` counts an EmbeddingBag with per-sample weights as 2 FLOPs per bagged value (a
  multiply-add), like the batched dot products that do the rest; gathers and the k x k candidate sums
  (additions) are not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .config import BlockSpec, ModelConfig

# Forward FLOPs per token of each FFN kind; later mechanisms register theirs.
def moe_flops(spec: BlockSpec, cfg: ModelConfig) -> dict[str, float]:
    """Router, routed experts (k per token; capacity_factor per token for expert choice; with token
    dropping this is the upper bound; with no-op experts the real share under balanced routing), shared
    experts. The noisy router's noise projection is counted."""
    m, D = spec.moe, cfg.d_model
    router = 2.0 * D * (m.n_experts + m.n_noop) * (2 if m.router == "noisy" else 1)
    parts = {"router": router, "experts": m.experts_per_token() * 6.0 * D * m.d_expert}
    if m.n_shared:
        parts["shared_experts"] = 6.0 * D * m.n_shared * m.d_expert
    return parts


def peer_flops(spec: BlockSpec, cfg: ModelConfig) -> dict[str, float]:
    """Query network 2*D*H*Q; sub-key scores of both halves against sqrt(N) sub-keys each, 2*sqrt(N)*Q per
    head (forward only); the chosen keys' scores recomputed, 2*K*Q per head; experts u_i . x (and g_i . x
    for GLU) and the weighted sum of v_i, 2*D per expert and table, H*K experts. Whitened queries add a
    Q x Q matrix per head, 2*Q*Q*H (its per-step eigendecomposition, independent of tokens, is not counted)."""
    p, D = spec.peer, cfg.d_model
    H, K, Q, S = p.n_heads, p.top_k, p.d_key, math.isqrt(p.n_experts)
    query = 2.0 * D * H * Q + (2.0 * Q * Q * H if p.query_norm == "whiten" else 0.0)
    return {"peer_query": query, "peer_subkey_scores": 2.0 * S * Q * H,
            "peer_key_scores": 2.0 * K * Q * H, "peer_experts": (3 if p.glu else 2) * 2.0 * H * K * D}


FFN_FLOPS: dict[str, Callable[[BlockSpec, ModelConfig], dict[str, float]]] = {
    "dense": lambda spec, cfg: {"ffn": 6.0 * cfg.d_model * (spec.ffn_hidden or cfg.d_ffn)},
    "moe": moe_flops,
    "peer": peer_flops,
}

TRAIN_FLOPS_MULTIPLIER = 3.0
FORWARD_ONLY_PARTS = ("peer_subkey_scores",)


def block_flops(spec: BlockSpec, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block, by component."""
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    parts = {
        "attn_qkv": 2.0 * D * (H + 2 * G) * K,
        "attn_scores": 4.0 * seq_len * H * K,
        "attn_out": 2.0 * H * K * D,
    }
    ffn = [FFN_FLOPS[spec.ffn](spec, cfg)] + ([peer_flops(spec, cfg)] if spec.peer_beside else [])
    for name, value in ((n, v) for f in ffn for n, v in f.items()):
        parts[name] = parts.get(name, 0.0) + value
    if spec.wrapper == "mod":
        parts = mod_flops(parts, spec, cfg, seq_len)
    return parts


def mod_flops(parts: dict[str, float], spec: BlockSpec, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """A routed block: c of the tokens enter, and attend only to each other (scores x c^2)."""
    from .layers.mod import capacity_tokens

    c = capacity_tokens(spec.mod.capacity, seq_len) / seq_len
    scaled = {name: value * (c * c if name == "attn_scores" else c) for name, value in parts.items()}
    D = cfg.d_model
    scaled["mod_router"] = 2.0 * D
    if spec.mod.causal == "predictor":
        hidden = spec.mod.predictor_hidden or max(1, D // 2)
        scaled["mod_predictor"] = 2.0 * D * hidden + 2.0 * hidden
    return scaled


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the whole model, by component (summed over blocks), plus the head."""
    total: dict[str, float] = {}
    for layer in range(cfg.n_layers):
        for name, value in block_flops(cfg.block_spec(layer), cfg, seq_len).items():
            total[name] = total.get(name, 0.0) + value
    total["head"] = 2.0 * cfg.d_model * cfg.vocab_size
    return total


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return sum(forward_flops_breakdown(cfg, seq_len).values())


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    parts = forward_flops_breakdown(cfg, seq_len)
    forward_only = sum(parts.get(name, 0.0) for name in FORWARD_ONLY_PARTS)
    return TRAIN_FLOPS_MULTIPLIER * sum(parts.values()) - (TRAIN_FLOPS_MULTIPLIER - 1) * forward_only


def measure_matmul_flops(device: str | torch.device = "cpu", n: int = 2048, dtype=torch.float32,
                         seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _cpu_sdpa_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = query
    return 4 * b * h * s_q * key[-2] * d  # QK^T and AV, as torch's sdpa_flop_count (query heads, for GQA too)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _cpu_sdpa_forward_flops(query, key, value)  # four products of the forward's size


def _grouped_mm_flops(mat_a, mat_b, *args, out_shape=None, **kwargs) -> int:
    if len(mat_a) == 2 and len(mat_b) == 2 and len(out_shape) == 3:  # contraction split into groups (weight grads)
        return 2 * mat_a[0] * mat_a[1] * mat_b[1]
    n_out = 1
    for s in out_shape:
        n_out *= s
    return 2 * n_out * mat_a[-1]


def _embedding_bag_flops(weight, indices, *args, out_shape=None, **kwargs) -> int:
    n = 1
    for s in indices:
        n *= s
    return 2 * n * weight[1]  # a multiply-add per bagged value (PEER always passes per-sample weights)


def flop_counter(**kwargs) -> torch.utils.flop_counter.FlopCounterMode:
    """torch's FlopCounterMode, taught what it does not count in torch 2.13: the CPU flash-attention
    kernel, torch._grouped_mm (the MoE experts) and EmbeddingBag (PEER's experts)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
        aten._grouped_mm: _grouped_mm_flops,
        aten._embedding_bag: _embedding_bag_flops,
        aten._embedding_bag_forward_only: _embedding_bag_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping, **kwargs)


def active_params(model: torch.nn.Module, cfg: ModelConfig, seq_len: int) -> float:
    """Parameters one token uses, averaged over tokens: a MoE's routed experts count at experts per token /
    experts, PEER's expert tables at h x k / N rows, and a Mixture-of-Depths block at the share of
    tokens that enter it (ceil(capacity x T) / T; its router counts in full). Embedding and head count in full."""
    from .layers.mod import MoD, capacity_tokens
    from .layers.moe import MoE
    from .layers.peer import PEER

    share: dict[int, float] = {}  # id(parameter) -> fraction of tokens (or of the table) one token uses
    for i, block in enumerate(model.blocks):
        spec = cfg.block_spec(i)
        inner = block.block if isinstance(block, MoD) else block
        enter = capacity_tokens(spec.mod.capacity, seq_len) / seq_len if isinstance(block, MoD) else 1.0
        for p in inner.parameters():
            share[id(p)] = enter
        for m in inner.modules():
            if isinstance(m, MoE):
                for p in (m.w_gate_up, m.w_down):
                    share[id(p)] = enter * spec.moe.experts_per_token() / m.n_experts
            elif isinstance(m, PEER):
                for p in m.expert_tables():
                    share[id(p)] = enter * m.n_heads * m.top_k / m.n_experts
    return sum(p.numel() * share.get(id(p), 1.0) for p in model.parameters())


def noop_flops_correction(cfg: ModelConfig, seq_len: int, noop_fraction: dict[int, float]) -> float:
    """Forward FLOPs per token to add to forward_flops_per_token when the integrated-MoDE layers (MoE with
    no-op experts) sent the measured share f of their top-k assignments to no-ops (layer -> f), instead of
    the balanced share Z / (E + Z) the budget assumes; negative when no-ops were chosen more often. The
    routed experts' count is block_flops's, scaled by realized / assumed experts per token."""
    extra = 0.0
    for layer, f in noop_fraction.items():
        spec = cfg.block_spec(layer)
        assumed = spec.moe.experts_per_token()
        extra += block_flops(spec, cfg, seq_len)["experts"] * (spec.moe.top_k * (1.0 - f) / assumed - 1.0)
    return extra
