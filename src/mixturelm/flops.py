"""Analytic FLOP accounting for any ModelConfig, by component, and a matmul peak to compute MFU.

Conventions (the same as torch.utils.flop_counter.FlopCounterMode, which a test checks us against):
- a multiply-add is 2 FLOPs; only matrix products are counted (norms, RoPE, softmax, SiLU are not);
- attention scores count the full T x T products (QK^T and AV) that SDPA computes, causal or not:
  4 * T * n_heads * head_dim FLOPs per token per layer, at the training sequence length T;
- each mechanism counts its own parts (mixturelm.mechanisms: Mechanism.flops for an FFN slot,
  Mechanism.wrap_flops for a wrapper, which scales the block it wraps: a Mixture-of-Depths block costs
  its share of tokens, its attention scores that share squared). What `--max-flops` and isoFLOP
  comparisons count is the routing of training;
- training FLOPs per token = 3 x forward (the backward pass is two matmuls per forward matmul), except
  the parts a mechanism names forward-only (Mechanism.forward_only_flops: a top-k without gradient);
- rows read by gathers and EmbeddingBags are not counted by FlopCounterMode: `flop_counter()` counts an
  EmbeddingBag with per-sample weights as 2 FLOPs per bagged value (a multiply-add), like the batched dot
  products that do the rest; gathers and additions are not counted.
"""

from __future__ import annotations

import time
import torch

from .config import NO_WRAPPER, BlockSpec, ModelConfig
from .errors import UsageError
from .mechanisms import registry

TRAIN_FLOPS_MULTIPLIER = 3.0


def block_flops(spec: BlockSpec, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block, by component: attention here, the FFN slot and what sits beside
    it from their mechanisms, then the wrapper's scaling (Mechanism.flops, Mechanism.wrap_flops)."""
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    parts = {
        "attn_qkv": 2.0 * D * (H + 2 * G) * K,
        "attn_scores": 4.0 * seq_len * H * K,
        "attn_out": 2.0 * H * K * D,
    }
    d_hidden = spec.ffn_hidden or cfg.d_ffn
    for kind in (spec.ffn, *spec.beside):
        for name, value in registry.get(kind).flops(spec.configs.get(kind), cfg, d_hidden).items():
            parts[name] = parts.get(name, 0.0) + value
    if spec.wrapper != NO_WRAPPER:
        parts = registry.get(spec.wrapper).wrap_flops(parts, spec.configs.get(spec.wrapper), cfg, seq_len)
    return parts


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
    forward_only = sum(parts.get(name, 0.0) for name in registry.forward_only_flops())
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


def _loop_grouped_mm_flops(x_AK, w_EKN, counts_E, out_shape=None, **kwargs) -> int:
    return 2 * x_AK[0] * x_AK[1] * w_EKN[-1]  # each row times its one expert's matrix


def _loop_grouped_mm_backward_flops(d_out_AN, x_AK, w_EKN, counts_E, out_shape=None, **kwargs) -> int:
    return 2 * _loop_grouped_mm_flops(x_AK, w_EKN, counts_E)  # d x and d w, each the forward's size


def _embedding_bag_flops(weight, indices, *args, out_shape=None, **kwargs) -> int:
    n = 1
    for s in indices:
        n *= s
    return 2 * n * weight[1]  # a multiply-add per bagged value (always with per-sample weights here)


def flop_counter(**kwargs) -> torch.utils.flop_counter.FlopCounterMode:
    """torch's FlopCounterMode, taught what it does not count in torch 2.13: the CPU flash-attention
    kernel, torch._grouped_mm (grouped expert matmuls), EmbeddingBag (row-wise expert tables), and
    mixturelm's own loop grouped matmul (a custom op: the counter sees it whole, not its matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .layers import dispatch  # noqa: F401 (registers the mixturelm:: ops named below)

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
        aten._grouped_mm: _grouped_mm_flops,
        aten._embedding_bag: _embedding_bag_flops,
        aten._embedding_bag_forward_only: _embedding_bag_flops,
        torch.ops.mixturelm.loop_grouped_mm: _loop_grouped_mm_flops,
        torch.ops.mixturelm.loop_grouped_mm_backward: _loop_grouped_mm_backward_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping, **kwargs)


def active_params(model: torch.nn.Module, cfg: ModelConfig, seq_len: int) -> float:
    """Parameters one token uses, averaged over tokens: each mechanism says which of its parameters a token
    uses only in part (Mechanism.param_shares), and shares multiply down the module tree. Embedding and head
    count in full."""
    share: dict[int, float] = {}  # id(parameter) -> fraction of it one token uses
    for module in model.modules():
        mechanism = registry.of_module(module)
        if mechanism is not None:
            for pid, s in mechanism.param_shares(module, seq_len).items():
                share[pid] = share.get(pid, 1.0) * s
    return sum(p.numel() * share.get(id(p), 1.0) for p in model.parameters())


def realized_flops_correction(cfg: ModelConfig, seq_len: int, record: dict) -> float | None:
    """Forward FLOPs per token to add to the budgeted count for what one training step's routers really chose
    (integrated MoDE's no-op experts), None when no mechanism has anything to correct."""
    corrections = [c for m in registry.all_mechanisms()
                   if (c := m.realized_flops_correction(cfg, seq_len, record)) is not None]
    return sum(corrections) if corrections else None


def flops_report(cfg: ModelConfig, seq_len: int) -> dict:
    """Forward FLOPs per token by component, their total, and training FLOPs per token (`mixturelm flops`)."""
    if seq_len < 1:
        raise UsageError(f"`seq_len` must be positive, got {seq_len}")
    parts = forward_flops_breakdown(cfg, seq_len)
    return {"seq_len": seq_len, "forward_per_token": parts, "forward_total": sum(parts.values()),
            "train_per_token": train_flops_per_token(cfg, seq_len),
            "forward_only": [k for k in registry.forward_only_flops() if k in parts]}


def describe_flops(name: str, report: dict) -> list[str]:
    parts, fwd = report["forward_per_token"], report["forward_total"]
    w = max(14, max(len(k) for k in parts) + 2)
    lines = [f"{name}, sequence {report['seq_len']}: FLOPs per token"]
    lines += [f"  {k:<{w}}{v:>14,.0f}  {v / fwd:6.1%}" for k, v in parts.items()]
    lines.append(f"  {'forward':<{w}}{fwd:>14,.0f}")
    note = "3 x forward" if not report["forward_only"] else f"3 x forward, but 1 x {', '.join(report['forward_only'])}"
    lines.append(f"  {'training':<{w}}{report['train_per_token']:>14,.0f}  (forward + backward = {note})")
    return lines
