"""Mixture-of-Experts FFN: a router, SwiGLU experts run dropless (or with a capacity), shared experts.

    y = sum_{e in chosen(x)} g_e(x) SwiGLU_e(x)  +  SwiGLU_shared(x)

Routers (layers/routing.py): softmax top-k (Mixtral/Qwen), noisy top-k (Shazeer 2017), Switch top-1,
DeepSeek-V3's sigmoid with a balancing bias, expert choice (Zhou 2022, not causal). Fine-grained
experts are many small experts (DeepSeekMoE): set n_experts high and d_hidden low.

No-op experts (integrated MoDE, Raposo et al. 2024 section 4.3): `n_noop` extra choices in the router
that compute nothing; a token sent to one keeps only its residual. Their assignments are dropped before
dispatch, so they cost only their column of the router.

`MoE(x)` maps (B, T, D) to (B, T, D). Its auxiliary losses ("loss/<name>") and statistics
("stat/<name>") come back from the call itself: `y, aux = MoE(x, return_aux=True)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .dispatch import IMPLS, dispatch_swiglu
from .ffn import SwiGLU
from .routing import ROUTERS, Routing, SigmoidBias, apply_capacity, build_router


class MoE(nn.Module):
    has_aux = True  # the model asks for (output, aux)

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int, router: str = "softmax", *,
                 n_shared: int = 0, capacity_factor: float | None = None, renormalize: bool = True,
                 route_scale: float = 1.0, bias_rate: float = 1e-3, impl: str = "auto", n_noop: int = 0) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router={router!r} is unknown; choose one of {', '.join(ROUTERS)}")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is unknown; choose one of {', '.join(IMPLS)}")
        if not 1 <= top_k <= n_experts + n_noop:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts + n_noop={n_experts + n_noop}")
        if n_noop and router not in ("softmax", "noisy", "switch"):
            raise ValueError(f"no-op experts need a token-choice router (softmax, noisy, switch), not {router!r}")
        self.d_hidden, self.n_experts, self.top_k, self.impl = d_hidden, n_experts, top_k, impl
        self.n_noop = n_noop
        self.router_kind = router
        options = {"softmax": {"renormalize": renormalize}, "sigmoid_bias": {"route_scale": route_scale,
                   "bias_rate": bias_rate}, "expert_choice": {"capacity_factor": capacity_factor or 2.0}}
        self.router = build_router(router, d_model, n_experts + n_noop, top_k, **options.get(router, {}))
        # expert choice has its capacity built in; for token choice a capacity factor means dropping
        self.capacity_factor = None if router == "expert_choice" else capacity_factor
        # experts as 3-D tensors, laid out for x @ W: one grouped matmul serves them all
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.shared = SwiGLU(d_model, n_shared * d_hidden) if n_shared else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_gate_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, out_std or std)
        nn.init.normal_(self.router.gate.weight, 0.0, std)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None, return_aux: bool = False):
        """valid_BT marks real tokens: padding is routed (shapes stay static) but never counted in losses or
        statistics."""
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        valid_T = None if valid_BT is None else valid_BT.reshape(-1)
        routing = self.router(x_TD, valid_T)
        dropped = torch.zeros(())
        if self.capacity_factor is not None:
            routing, dropped = apply_capacity(routing, self.capacity_factor, x_TD.shape[0])
        token_A, expert_A, weight_A, k_per_token = routing.token_A, routing.expert_A, routing.weight_A, routing.k_per_token
        if self.n_noop:  # choices of a no-op expert compute nothing: drop them before dispatch
            real_A = expert_A < self.n_experts
            token_A, expert_A, weight_A, k_per_token = token_A[real_A], expert_A[real_A], weight_A[real_A], None
        y_TD = dispatch_swiglu(x_TD, token_A, expert_A, weight_A, self.w_gate_up, self.w_down, self.impl,
                               k_per_token)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        y = y_TD.reshape(shape)
        if not return_aux:
            return y
        aux = {f"loss/{k}": v for k, v in routing.losses.items()}
        aux.update({f"stat/{k}": v for k, v in routing_stats(routing, dropped, valid_T).items()})
        if self.n_noop:
            aux["stat/noop_fraction"] = (routing.expert_A >= self.n_experts).float().mean().detach()
        return y, aux

    def after_optimizer_step(self, reduce=None) -> None:
        """Online balancing state moves here, never in forward: the sigmoid_bias router's bias."""
        if isinstance(self.router, SigmoidBias):
            self.router.update_bias(reduce(self.router.load_E) if reduce else None)


@torch.no_grad()
def routing_stats(r: Routing, dropped: torch.Tensor, valid_T: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-layer statistics: tokens per expert (after dropping), max/mean load, dropped fraction, entropy."""
    keep_A = torch.ones_like(r.token_A, dtype=torch.bool) if valid_T is None else valid_T[r.token_A]
    tokens_E = torch.bincount(r.expert_A[keep_A], minlength=r.n_experts).float()
    scores_TE = r.scores_TE if valid_T is None else r.scores_TE[valid_T]
    entropy = -(scores_TE * scores_TE.clamp_min(1e-20).log()).sum(-1).mean()
    return {"tokens_per_expert": tokens_E,
            "load_max_over_mean": tokens_E.max() / tokens_E.mean().clamp_min(1e-9),
            "dropped_fraction": dropped.detach().float(),
            "router_entropy": entropy / math.log(r.n_experts)}  # 1.0: uniform scores
