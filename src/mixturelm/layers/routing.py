"""Routers: they decide which expert computes what, and nothing else.

A router maps tokens x_TD to a `Routing`: a flat list of assignments (token, expert, gate weight),
the full score matrix, and its auxiliary losses. The computation (layers/dispatch.py) takes the
assignments and never needs to know which router made them, so token choice, capacity dropping and
expert choice share one permute / compute / combine path, and each router is testable alone.

Dimension letters: T tokens, D d_model, E experts, K experts per token, A assignments.

Router math runs in float32 whatever the autocast (Switch Transformers' "selective precision").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

@dataclass
class Routing:
    token_A: torch.Tensor  # (A,) long: which token each assignment takes
    expert_A: torch.Tensor  # (A,) long: to which expert
    weight_A: torch.Tensor  # (A,) float32: the gate that scales the expert's output
    scores_TE: torch.Tensor  # (T, E) float32: the router's full scores (probabilities), for losses and statistics
    n_experts: int
    chosen_TE: torch.Tensor | None = None  # (T, E) bool: the choice before any capacity dropping
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    k_per_token: int | None = None  # set when assignments are token-major, exactly k per token (fast path)


# ----------------------------------------------------------------------------------------------
# Losses shared by the routers (each is a function of the scores and of the choice)

def switch_balance_loss(scores_TE: torch.Tensor, chosen_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformers' E * sum_i f_i P_i; f_i: fraction of assignments to expert i (counted BEFORE any
    capacity dropping), P_i: mean router probability of i, both over valid (non-padding) tokens only.
    Minimum 1.0, at uniform routing."""
    E = scores_TE.shape[1]
    if valid_T is not None:
        scores_TE, chosen_TE = scores_TE[valid_T], chosen_TE[valid_T]
    f_E = chosen_TE.float().sum(0) / chosen_TE.float().sum().clamp_min(1.0)
    P_E = scores_TE.mean(0)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    if valid_T is not None:
        logits_TE = logits_TE[valid_T]
    return logits_TE.logsumexp(-1).square().mean()


def cv_squared(v_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (Shazeer et al. 2017), 0 when all entries are equal."""
    return v_E.var(unbiased=False) / (v_E.mean().square() + 1e-10)


def top_k_assignments(chosen_TK: torch.Tensor, weights_TK: torch.Tensor, E: int):
    """Flat (token, expert, weight) lists and the (T, E) choice mask from a top-k choice."""
    T, K = chosen_TK.shape
    token_A = torch.arange(T, device=chosen_TK.device).repeat_interleave(K)
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=chosen_TK.device).scatter_(1, chosen_TK, True)
    return token_A, chosen_TK.reshape(-1), weights_TK.reshape(-1), chosen_TE


# ----------------------------------------------------------------------------------------------

def fp32_linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """x W^T in float32 or wider (float64 stays float64), outside any autocast."""
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    if not torch.is_autocast_enabled(x_TD.device.type):  # entering the context costs more than a decoding step's product
        return F.linear(x_TD.to(dtype), w_ED.to(dtype))
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return F.linear(x_TD.to(dtype), w_ED.to(dtype))


class Router(nn.Module):
    """A linear gate x W (no bias), computed in float32."""

    def __init__(self, d_model: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return fp32_linear(x_TD, self.gate.weight)


class SoftmaxTopK(Router):
    """Softmax over all experts, the top k kept; renormalise=True divides by their sum (Mixtral), False keeps
    the raw probabilities (Qwen-MoE). Switch balance loss and z-loss."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, renormalize: bool = True) -> None:
        super().__init__(d_model, n_experts, top_k)
        # with k = 1 a renormalised gate is always 1.0 and the router would get no gradient from the task
        self.renormalize = renormalize and top_k > 1

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.softmax(-1)
        weights_TK, chosen_TK = scores_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        token_A, expert_A, weight_A, chosen_TE = top_k_assignments(chosen_TK, weights_TK, self.n_experts)
        losses = {}
        if torch.is_grad_enabled():  # training and gradient checks; inference (decoding) skips them
            losses = {"balance": switch_balance_loss(scores_TE, chosen_TE, valid_T), "z": z_loss(logits_TE, valid_T)}
        return Routing(token_A, expert_A, weight_A, scores_TE, self.n_experts, chosen_TE, losses, self.top_k)


class SwitchTop1(SoftmaxTopK):
    """Switch Transformers: top-1 of the softmax, gate = that probability (no renormalisation).
    Use with a capacity factor to drop overflow tokens (they pass on through the residual)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int = 1) -> None:
        super().__init__(d_model, n_experts, 1, renormalize=False)


class NoisyTopK(Router):
    """Shazeer et al. 2017: H = x W_g + N(0,1) * softplus(x W_noise) in training, top k of H, softmax over
    those k. Losses: importance CV^2 of the summed gates, and load CV^2 of the smooth load estimator
    P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i). Noise only in training."""

    def __init__(self, d_model: int, n_experts: int, top_k: int) -> None:
        super().__init__(d_model, n_experts, top_k)
        self.noise = nn.Linear(d_model, n_experts, bias=False)
        nn.init.zeros_(self.noise.weight)  # the paper initialises both gate matrices to zero

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> Routing:
        clean_TE = self.logits(x_TD)
        noisy_TE, std_TE = clean_TE, None
        if self.training:
            std_TE = F.softplus(fp32_linear(x_TD, self.noise.weight)) + 1e-2
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        top_TK, chosen_TK = noisy_TE.topk(min(self.top_k + 1, self.n_experts), dim=-1)
        k_logits_TK, chosen_TK = top_TK[:, :self.top_k], chosen_TK[:, :self.top_k]
        weights_TK = k_logits_TK.softmax(-1)
        token_A, expert_A, weight_A, chosen_TE = top_k_assignments(chosen_TK, weights_TK, self.n_experts)
        gates_TE = torch.zeros_like(clean_TE).scatter(1, chosen_TK, weights_TK)
        keep = valid_T if valid_T is not None else slice(None)
        losses = {"importance": cv_squared(gates_TE[keep].sum(0))}
        if std_TE is not None and self.top_k < self.n_experts:
            # threshold each expert must beat to be in the top k: the k-th largest of the others
            kth_in_TE = top_TK[:, self.top_k:self.top_k + 1]  # (k+1)-th: for experts that are in the top k
            kth_out_TE = top_TK[:, self.top_k - 1:self.top_k]  # k-th: for experts that are not
            threshold_TE = torch.where(chosen_TE, kth_in_TE, kth_out_TE)
            p_TE = torch.distributions.Normal(0.0, 1.0).cdf((clean_TE - threshold_TE) / std_TE)
            losses["load"] = cv_squared(p_TE[keep].sum(0))
        scores_TE = clean_TE.softmax(-1)
        return Routing(token_A, expert_A, weight_A, scores_TE, self.n_experts, chosen_TE, losses, self.top_k)


class SigmoidBias(Router):
    """DeepSeek-V3 auxiliary-loss-free balancing: sigmoid scores; top k of (scores + bias) selects, the
    gate is the UNBIASED scores of the chosen, normalised over them and scaled by route_scale.

    The bias is a buffer, never trained by gradients: `update_bias()` moves it by rate * sign(mean load -
    load) from the loads counted in training forwards since the last update. The trainer calls it after
    each optimizer step, so gradient accumulation counts every micro-batch; eval counts nothing."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, route_scale: float = 1.0,
                 bias_rate: float = 1e-3) -> None:
        super().__init__(d_model, n_experts, top_k)
        self.route_scale, self.bias_rate = route_scale, bias_rate
        self.register_buffer("bias_E", torch.zeros(n_experts))
        self.register_buffer("load_E", torch.zeros(n_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        chosen_TK = (scores_TE.detach() + self.bias_E).topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, chosen_TK)
        weights_TK = self.route_scale * weights_TK / weights_TK.sum(-1, keepdim=True)
        token_A, expert_A, weight_A, chosen_TE = top_k_assignments(chosen_TK, weights_TK, self.n_experts)
        if self.training:
            with torch.no_grad():
                counted = chosen_TE if valid_T is None else chosen_TE[valid_T]
                self.load_E += counted.sum(0).float()
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        losses = {}
        if torch.is_grad_enabled():  # a small complementary balance loss, as DeepSeek-V3 keeps (weight 1e-4)
            losses = {"complementary_balance": switch_balance_loss(probs_TE, chosen_TE, valid_T),
                      "z": z_loss(logits_TE, valid_T)}
        return Routing(token_A, expert_A, weight_A, probs_TE, self.n_experts, chosen_TE, losses, self.top_k)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """One step of b_i += rate * sign(mean load - load_i), centred; then the counts start again.
        Pass load_E to use other counts (e.g. summed over data-parallel processes)."""
        load_E = self.load_E if load_E is None else load_E
        if load_E.sum() > 0:
            delta_E = self.bias_rate * torch.sign(load_E.mean() - load_E)
            self.bias_E += delta_E - delta_E.mean()
        self.load_E.zero_()


class ExpertChoice(Router):
    """Zhou et al. 2022: each expert takes its top C = capacity_factor * T / E tokens by softmax score; a
    token may get 0..E experts. Balanced by construction, no balance loss. NOT causal: whether a token
    is taken depends on the scores of every other token of the call, later ones included, so it cannot
    be used for autoregressive decoding as it is."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, capacity_factor: float = 2.0) -> None:
        super().__init__(d_model, n_experts, top_k)
        self.capacity_factor = capacity_factor

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.softmax(-1)
        T, E = scores_TE.shape
        capacity = max(1, min(T, math.ceil(self.capacity_factor * T / E)))
        ranked_ET = scores_TE.t() if valid_T is None else scores_TE.t().masked_fill(~valid_T, -1.0)
        weights_EC, token_EC = ranked_ET.topk(capacity, dim=-1)
        keep_A = (weights_EC >= 0).reshape(-1)  # padding is never taken
        expert_A = torch.arange(E, device=x_TD.device).repeat_interleave(capacity)[keep_A]
        token_A, weight_A = token_EC.reshape(-1)[keep_A], weights_EC.reshape(-1)[keep_A]
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        chosen_TE[token_A, expert_A] = True
        return Routing(token_A, expert_A, weight_A, scores_TE, E, chosen_TE, {"z": z_loss(logits_TE, valid_T)})


def apply_capacity(r: Routing, capacity_factor: float, n_tokens: int) -> tuple[Routing, torch.Tensor]:
    """Token dropping: each expert keeps its first C = ceil(capacity_factor * T * k / E) assignments,
    first choices before second choices, each in token order (GShard); the rest are dropped and their
    tokens pass through the residual. Returns the routing with the kept assignments and the fraction
    dropped. Losses stay as computed before the drop (counting load after dropping underestimates
    imbalance)."""
    A = r.expert_A.numel()
    capacity = max(1, math.ceil(capacity_factor * A / r.n_experts))
    k = r.k_per_token or 1
    choice_rank_A = torch.arange(A, device=r.expert_A.device) % k if r.k_per_token else torch.zeros_like(r.expert_A)
    priority_A = (r.expert_A * k + choice_rank_A) * n_tokens + r.token_A  # by expert, choice rank, position
    order = torch.sort(priority_A).indices
    sorted_expert = r.expert_A[order]
    first_of_expert = torch.searchsorted(sorted_expert, sorted_expert, right=False)
    rank_in_expert = torch.arange(A, device=order.device) - first_of_expert
    keep = torch.zeros(A, dtype=torch.bool, device=order.device)
    keep[order] = rank_in_expert < capacity
    dropped = 1.0 - keep.float().mean()
    kept = Routing(r.token_A[keep], r.expert_A[keep], r.weight_A[keep], r.scores_TE, r.n_experts, r.chosen_TE, r.losses)
    return kept, dropped


ROUTER_CLASSES: dict[str, type[Router]] = {"softmax": SoftmaxTopK, "noisy": NoisyTopK, "switch": SwitchTop1,
                                           "sigmoid_bias": SigmoidBias, "expert_choice": ExpertChoice}
ROUTERS = tuple(ROUTER_CLASSES)  # the router kinds, listed once
TOKEN_CHOICE_ROUTERS = ("softmax", "noisy", "switch")  # exactly k experts per token, in token order


def build_router(kind: str, d_model: int, n_experts: int, top_k: int, **options) -> Router:
    """The router of a kind (checked by MoEConfig)."""
    return ROUTER_CLASSES[kind](d_model, n_experts, top_k, **options)
