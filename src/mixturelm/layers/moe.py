"""Mixture-of-Experts FFN: a router, SwiGLU experts run dropless (or with a capacity), shared experts.

    y = sum_{e in chosen(x)} g_e(x) SwiGLU_e(x)  +  SwiGLU_shared(x)

Routers (layers/routing.py): softmax top-k (Mixtral/Qwen), noisy top-k (Shazeer 2017), Switch top-1,
DeepSeek-V3's sigmoid with a balancing bias, expert choice (Zhou 2022, not causal). Fine-grained
experts are many small experts (DeepSeekMoE): set n_experts high and d_expert low.

No-op experts (integrated MoDE, Raposo et al. 2024 section 4.3): `n_noop` extra choices in the router
that compute nothing; a token sent to one keeps only its residual. Their assignments are dropped before
dispatch, so they cost only their column of the router.

`MoE(d_model, MoEConfig(...))` (or `MoE(d_model, n_experts=..., ...)`) maps (B, T, D) to (B, T, D) and
returns `(y, MoEAux)`: the router's auxiliary losses and the routing, whose statistics are read from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UsageError, positive_ints
from .auxiliary import Aux
from .dispatch import IMPLS, dispatch_swiglu
from .ffn import SwiGLU
from .routing import ROUTERS, TOKEN_CHOICE_ROUTERS, Routing, SigmoidBias, apply_capacity, build_router


@dataclass(kw_only=True)
class MoEConfig:
    """A Mixture-of-Experts FFN: which router, how many experts of which size. Checked once, here."""

    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 176  # hidden size of each SwiGLU expert
    router: str = "softmax"
    n_shared: int = 0  # always-on shared experts (DeepSeekMoE), each of d_expert
    d_shared: int | None = None  # hidden size of the shared experts together (None: n_shared x d_expert)
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE)
    capacity_factor: float | None = None  # None: dropless; for expert_choice, its capacity (default 2)
    renormalize: bool = True  # softmax router: renormalise the top-k gates to sum to 1
    route_scale: float = 1.0  # sigmoid_bias router: gate scale (DeepSeek-V3 uses 2.5)
    bias_rate: float = 1e-3  # sigmoid_bias router: bias update per optimizer step
    impl: str = "auto"  # grouped matmul implementation
    # no-op experts (integrated MoDE, Raposo et al. 2024 section 4.3): the router may send a token to one,
    # which computes nothing, so the token learns to take the residual path instead of an expert
    n_noop: int = 0

    def __post_init__(self) -> None:
        positive_ints(self, "n_experts", "top_k", "d_expert")
        if not isinstance(self.n_noop, int) or self.n_noop < 0:
            raise UsageError(f"MoEConfig.n_noop must be an integer >= 0, got {self.n_noop!r}")
        if self.router not in ROUTERS:
            raise UsageError(f"MoEConfig.router={self.router!r} is unknown; choose one of {', '.join(ROUTERS)}")
        if self.n_noop and self.router not in TOKEN_CHOICE_ROUTERS:
            raise UsageError(f"MoEConfig.n_noop needs a token-choice router ({', '.join(TOKEN_CHOICE_ROUTERS)}), "
                             f"not {self.router!r}")
        if not isinstance(self.n_shared, int) or self.n_shared < 0:
            raise UsageError(f"MoEConfig.n_shared must be an integer >= 0, got {self.n_shared!r}")
        if self.d_shared is not None:
            positive_ints(self, "d_shared")
            if not self.n_shared:
                raise UsageError("MoEConfig.d_shared is given but n_shared=0; set n_shared to use shared experts")
        if self.shared_gate and not self.n_shared:
            raise UsageError("MoEConfig.shared_gate needs shared experts; set n_shared")
        if self.top_k > self.n_experts + self.n_noop:
            raise UsageError(f"MoEConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}"
                             + (f" + n_noop={self.n_noop}" if self.n_noop else ""))
        if self.impl not in IMPLS:
            raise UsageError(f"MoEConfig.impl={self.impl!r} is unknown; choose one of {', '.join(IMPLS)}")
        if self.capacity_factor is not None and not 0 < self.capacity_factor < math.inf:
            raise UsageError(f"MoEConfig.capacity_factor must be a finite number > 0 (or None for dropless), "
                             f"got {self.capacity_factor}")
        if self.capacity_factor is not None and self.capacity_factor > self.n_experts:
            raise UsageError(f"MoEConfig.capacity_factor={self.capacity_factor:g} exceeds n_experts={self.n_experts}: "
                             "at n_experts an expert may take every token already; use None for dropless")
        if not 0 < self.route_scale < math.inf:
            raise UsageError(f"MoEConfig.route_scale must be a finite number > 0, got {self.route_scale}")
        if not 0 <= self.bias_rate < math.inf:
            raise UsageError(f"MoEConfig.bias_rate must be a finite number >= 0, got {self.bias_rate}")
        if self.router == "switch" and self.top_k != 1:
            raise UsageError("MoEConfig.router='switch' is top-1; set top_k=1")

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the shared experts' one SwiGLU (0: none)."""
        return (self.d_shared or self.n_shared * self.d_expert) if self.n_shared else 0

    def experts_per_token(self) -> float:
        """Average routed experts a token computes: k, or capacity_factor for expert choice. With no-op
        experts, the real share of k under balanced routing (the balance loss spreads choices evenly)."""
        if self.router == "expert_choice":
            return self.capacity_factor or 2.0
        return self.top_k * self.n_experts / (self.n_experts + self.n_noop)


@dataclass
class MoEAux(Aux):
    """A MoE call's router losses and routing; its statistics are computed from them when read."""

    kind: ClassVar[str] = "moe"
    routing: Routing | None = None
    dropped: torch.Tensor | None = None  # fraction of assignments dropped by the capacity
    valid_T: torch.Tensor | None = None  # real (non-padding) tokens
    n_experts: int = 0  # real experts (no-op ones excluded)

    @property
    @torch.no_grad()
    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) tokens each expert computed (after dropping; no-op experts last), over valid tokens."""
        r = self.routing
        keep_A = torch.ones_like(r.token_A, dtype=torch.bool) if self.valid_T is None else self.valid_T[r.token_A]
        return torch.bincount(r.expert_A[keep_A], minlength=r.n_experts).float()

    @torch.no_grad()
    def scalars(self) -> dict[str, torch.Tensor]:
        r = self.routing
        tokens_E = self.tokens_per_expert
        scores_TE = r.scores_TE if self.valid_T is None else r.scores_TE[self.valid_T]
        entropy = -(scores_TE * scores_TE.clamp_min(1e-20).log()).sum(-1).mean()
        stats = {"load_max_over_mean": tokens_E.max() / tokens_E.mean().clamp_min(1e-9),
                 "dropped_fraction": self.dropped.detach().float(),
                 "router_entropy": entropy / math.log(r.n_experts)}  # 1.0: uniform scores
        if r.n_experts > self.n_experts:  # integrated MoDE: the share of choices that went to a no-op
            stats["noop_fraction"] = (r.expert_A >= self.n_experts).float().mean()
        return stats


class MoE(nn.Module):
    def __init__(self, d_model: int, config: MoEConfig | None = None, **options) -> None:
        """config, or its fields as keywords: MoE(512, n_experts=8, top_k=2, d_expert=1408)."""
        super().__init__()
        if config is not None and options:
            raise UsageError("MoE takes a MoEConfig or its fields as keywords, not both")
        c = self.config = config if config is not None else MoEConfig(**options)
        self.d_hidden, self.n_experts, self.top_k, self.impl = c.d_expert, c.n_experts, c.top_k, c.impl
        self.n_noop = c.n_noop
        self.router_kind = c.router
        router_options = {"softmax": {"renormalize": c.renormalize},
                          "sigmoid_bias": {"route_scale": c.route_scale, "bias_rate": c.bias_rate},
                          "expert_choice": {"capacity_factor": c.capacity_factor or 2.0}}
        self.router = build_router(c.router, d_model, c.n_experts + c.n_noop, c.top_k,
                                   **router_options.get(c.router, {}))
        # expert choice has its capacity built in; for token choice a capacity factor means dropping
        self.capacity_factor = None if c.router == "expert_choice" else c.capacity_factor
        # experts as 3-D tensors, laid out for x @ W: one grouped matmul serves them all
        self.w_gate_up = nn.Parameter(torch.empty(c.n_experts, d_model, 2 * c.d_expert))
        self.w_down = nn.Parameter(torch.empty(c.n_experts, c.d_expert, d_model))
        self.shared = SwiGLU(d_model, c.shared_hidden) if c.n_shared else None
        # Qwen2-MoE's gate on the shared experts: a scalar per token, sigmoid(x . w)
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if c.shared_gate else None
        self.reset_parameters()

    own_init = ("router",)  # initialised by reset_parameters, not by the model (MixtureLM.reset_parameters)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_gate_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, out_std or std)
        nn.init.normal_(self.router.gate.weight, 0.0, std)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None,
                dispatch=dispatch_swiglu) -> tuple[torch.Tensor, MoEAux]:
        """valid_BT marks real tokens: padding is routed (shapes stay static) but never counted in losses or
        statistics. dispatch: the routed computation, called as `dispatch_swiglu` is; expert parallelism
        (mixturelm.parallel.expert) passes one that runs the experts on other processes."""
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
        y_TD = dispatch(x_TD, token_A, expert_A, weight_A, self.w_gate_up, self.w_down, self.impl, k_per_token)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)[0]
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared_TD
        return y_TD.reshape(shape), MoEAux(routing.losses, routing, dropped, valid_T, self.n_experts)

    def after_optimizer_step(self, reduce=None) -> None:
        """Online balancing state moves here, never in forward: the sigmoid_bias router's bias."""
        if isinstance(self.router, SigmoidBias):
            self.router.update_bias(reduce(self.router.load_E) if reduce else None)
