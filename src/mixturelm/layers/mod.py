"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): a router decides which tokens a block
processes; the others go around it unchanged.

Dimension letters: B batch, T tokens, C tokens that enter the block (per row), R rows that send at least
one token in, D d_model, k half a head size (rope angles).

Training (and `causal_routing=False`): the top C = ceil(capacity x T) tokens of each sequence by the
scalar router weight r = w . x (Eq. 1) enter, gathered in their original order so the block's plain
causal mask is right, rotated by their ORIGINAL positions, and

    x_out = x + r * f(x)   for entering tokens,    x_out = x   for the others,

where f is the block's residual branch (attention + FFN), so r multiplies f only (section 3.4).

Sampling cannot use top-k: whether a token is in the top-k depends on tokens after it (section 3.5).
Both of the paper's fixes are here, chosen by `causal`: "aux_loss" trains r itself with a BCE loss on
top-k membership; "predictor" trains a small MLP on stop-gradient inputs to predict membership. With a
KV cache (prefill and decoding), or `causal_routing=True`, a token enters when its causal score is above
`threshold`: 0 (sigmoid 0.5, the paper's rule), or with `calibrate` the running (1 - capacity) quantile
of the scores seen in training, so the realised fraction stays near the capacity.

A token that skips the block writes no key/value there (RaggedKVCache); a block no token enters costs
only the router.

The wrapped block is mixturelm's own `Block` (which gives MoD its residual branch f, the rope angles of
the entering tokens' original positions and a KV cache), or any module mapping (B, C, D) to (B, C, D) as
`x + f(x)`: then f = block(x) - x on the entering tokens, with no rope and no cache (a user's block that
needs positions must take them from elsewhere). `MoD(...)(x)` returns `(y, [aux of the block's layers...,
MoDAux])`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, positive_ints
from . import kernels
from .attention import RaggedKVCache
from .auxiliary import Aux
from .routing import fp32_linear

CAUSAL_KINDS = ("aux_loss", "predictor")
GATES = ("linear", "sigmoid")


@dataclass(kw_only=True)
class MoDConfig:
    """Mixture-of-Depths around one block: the top capacity x T tokens of each sequence enter. Checked once, here.

    causal: how sampling decides token by token, where top-k over the sequence is unavailable (section 3.5):
    "aux_loss" trains the router logits with BCE on top-k membership and routes in when sigmoid > 0.5;
    "predictor" trains a small MLP on stop-gradient inputs to predict membership.
    calibrate: move the sampling threshold to the running (1 - capacity) quantile of the causal scores
    seen in training, so the realised fraction at sampling stays near the capacity; off, the paper's 0.5."""

    capacity: float = 0.125
    causal: str = "aux_loss"
    predictor_hidden: int | None = None  # None: d_model / 2
    calibrate: bool = True
    threshold_momentum: float = 0.2  # weight of each step's quantile in the running threshold
    gate: str = "linear"  # what multiplies the block's branch: r (Eq. 1) or sigmoid(r)

    def __post_init__(self) -> None:
        if not 0 < self.capacity <= 1:  # also refuses NaN
            raise UsageError(f"MoDConfig.capacity must be in (0, 1] (a fraction of the sequence), got {self.capacity}")
        if self.causal not in CAUSAL_KINDS:
            raise UsageError(f"MoDConfig.causal={self.causal!r} is unknown; choose one of {', '.join(CAUSAL_KINDS)}")
        if self.predictor_hidden is not None:
            positive_ints(self, "predictor_hidden")
        if self.gate not in GATES:
            raise UsageError(f"MoDConfig.gate={self.gate!r} is unknown; choose one of {', '.join(GATES)}")
        if not 0 < self.threshold_momentum <= 1:
            raise UsageError(f"MoDConfig.threshold_momentum must be in (0, 1], got {self.threshold_momentum}")


@dataclass
class MoDAux(Aux):
    """A MoD call's causal-routing loss (training) and what its causal rule did."""

    kind: ClassVar[str] = "mod"
    causal_fraction: torch.Tensor | None = None  # share of tokens the causal rule lets in
    causal_accuracy: torch.Tensor | None = None  # training: agreement of the causal rule with top-k
    causal_recall: torch.Tensor | None = None  # training: share of top-k members the causal rule lets in
    threshold: torch.Tensor | None = None  # training: the sampling threshold in use
    causal_counts: torch.Tensor | None = None  # causal routing: (tokens let in, tokens), float64, for sums

    def scalars(self) -> dict[str, torch.Tensor]:
        named = {"mod_causal_accuracy": self.causal_accuracy, "mod_causal_recall": self.causal_recall,
                 "mod_causal_fraction": self.causal_fraction, "mod_threshold": self.threshold}
        return {k: v for k, v in named.items() if v is not None}


class GatherRows(torch.autograd.Function):
    """x_ND[idx_M] by index_select. torch.gather with an expanded (B, C, D) index, and its scatter-add
    backward, were an order of magnitude slower on CPU than copying whole rows (micro-benchmark). Indices are unique (a token enters once),
    so the backward is an index_copy into zeros."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, idx_M: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx_M)
        ctx.n = x_ND.shape[0]
        return x_ND.index_select(0, idx_M)

    @staticmethod
    def backward(ctx, g_MD: torch.Tensor):
        (idx_M,) = ctx.saved_tensors
        return g_MD.new_zeros(ctx.n, g_MD.shape[1]).index_copy_(0, idx_M, g_MD), None


class AddRows(torch.autograd.Function):
    """x_ND with src_MD added to rows idx_M (unique): the residual stream passes through untouched."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, idx_M: torch.Tensor, src_MD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx_M)
        return x_ND.clone().index_add_(0, idx_M, src_MD.to(x_ND.dtype))

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        (idx_M,) = ctx.saved_tensors
        return g_ND, None, g_ND.index_select(0, idx_M)


def capacity_tokens(capacity: float, T: int) -> int:
    """Tokens of a T-token sequence that enter a routed block in training: ceil(capacity x T), at least 1."""
    return min(T, max(1, math.ceil(capacity * T - 1e-9)))


class MoD(nn.Module):
    def __init__(self, block: nn.Module, d_model: int, config: MoDConfig | None = None, **options) -> None:
        """block: mixturelm's Block, or any residual block x -> x + f(x) (module docstring); config, or its
        fields as keywords: MoD(block, 512, capacity=0.125)."""
        super().__init__()
        if config is not None and options:
            raise UsageError("MoD takes a MoDConfig or its fields as keywords, not both")
        c = self.config = config if config is not None else MoDConfig(**options)
        self.gate = c.gate
        self.block, self.capacity, self.causal = block, c.capacity, c.causal
        self.calibrate, self.threshold_momentum = c.calibrate, c.threshold_momentum
        self.router = nn.Linear(d_model, 1, bias=False)  # r = w . x, no nonlinearity (Eq. 1)
        self.predictor = None
        if c.causal == "predictor":  # d -> d/2 -> 1 with SiLU (a linear predictor samples badly, per joey00072)
            hidden = c.predictor_hidden or max(1, d_model // 2)
            self.predictor = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # the sampling threshold on the causal score; moved only by after_optimizer_step
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_ema", torch.zeros(()))  # before bias correction (as Adam's moments)
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self._quantiles = None  # (sum of per-step quantiles, count) since the last optimizer step

    # -- scores ---------------------------------------------------------------------------------
    def router_weights(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """r, (B, T), in float32 (a router in low precision mis-ranks close tokens)."""
        return fp32_linear(x_BTD, self.router.weight).squeeze(-1)

    def branch_weights(self, r_BT: torch.Tensor) -> torch.Tensor:
        """What multiplies f(x): r itself (Eq. 1, gate="linear"), or sigmoid(r) (gate="sigmoid"), which
        stays near 1/2 where the causal BCE pulls r toward 0 and so keeps the block's output from fading."""
        return r_BT if self.gate == "linear" else torch.sigmoid(r_BT)

    def causal_scores(self, x_BTD: torch.Tensor, r_BT: torch.Tensor) -> torch.Tensor:
        """The score compared with the threshold when routing token by token: r itself, or the predictor's
        logit from a stop-gradient input (it must not steer the LM)."""
        if self.predictor is None:
            return r_BT
        x = x_BTD.detach()
        return self.predictor(x.to(self.predictor[0].weight.dtype)).squeeze(-1).float()

    # -- which tokens enter: the one place each rule lives (forward and mixturelm.inspect both call these)
    def topk_indices(self, r_BT: torch.Tensor) -> torch.Tensor:
        """(B, C) the tokens of each row that enter under training-time routing: the top C by r, back in
        their original order (the block's causal mask needs it)."""
        C = capacity_tokens(self.capacity, r_BT.shape[1])
        return r_BT.topk(C, dim=1, sorted=False).indices.sort(dim=1).values

    def causal_enter(self, x_BTD: torch.Tensor, r_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the tokens that enter when routing token by token (sampling)."""
        return self.causal_scores(x_BTD, r_BT) > self.threshold

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, rope=None, cache: RaggedKVCache | None = None,
                causal_routing: bool = False) -> tuple[torch.Tensor, list[Aux]]:
        """Top-k routing (training) unless given a cache or causal_routing; returns the output and the aux
        of the block's layers followed by this layer's MoDAux."""
        if (cache is not None or causal_routing) and self._routes_in_kernels(x_BTD):
            return self._causal_in_kernels(x_BTD, rope, cache)
        r_BT = self.router_weights(x_BTD)
        if cache is None and not causal_routing:
            return self._forward_topk(x_BTD, r_BT, rope)
        return self._forward_causal(x_BTD, r_BT, rope, cache)

    def _branch(self, x_BCD, rope, cache) -> tuple[torch.Tensor, list[Aux]]:
        """The block's residual branch f on the entering tokens, and its layers' aux."""
        if hasattr(self.block, "branch"):  # mixturelm's Block: f itself, rope and cache
            return self.block.branch(x_BCD, rope, cache)
        if cache is not None:
            raise UsageError("MoD around a plain block has no KV cache; decode with causal_routing=True instead")
        return self.block(x_BCD) - x_BCD, []

    def _forward_topk(self, x_BTD, r_BT, rope) -> tuple[torch.Tensor, list[Aux]]:
        idx_BC = self.topk_indices(r_BT)
        x_out, block_aux = self._run_block(x_BTD, r_BT, idx_BC, None, rope, None)
        # the causal rule's training loss and statistics: only when training (they need gradients)
        mine = self._causal_losses(x_BTD, r_BT, idx_BC) if torch.is_grad_enabled() else MoDAux()
        return x_out, block_aux + [mine]

    @staticmethod
    def _causal_statistics(enter_BT: torch.Tensor, rows_R: torch.Tensor) -> MoDAux:
        """The share of tokens let in, and (let in, tokens) in float64 for evaluation to sum, on the tokens'
        device. Decoding on CPU (one token per row) knows the count once the rows are found: two small tensors
        from numbers, where five ops on the mask cost more at every routed block and step (on a GPU those ops
        are queued without waiting, and numbers would be copied to it)."""
        B, T = enter_BT.shape
        device = enter_BT.device
        if T == 1 and B > 0 and device.type == "cpu":
            n = rows_R.numel()
            return MoDAux(causal_fraction=torch.tensor(n / B, dtype=torch.float32, device=device),
                          causal_counts=torch.tensor([n, B], dtype=torch.float64, device=device))
        entered = enter_BT.sum().double()  # no wait for the device: evaluation sums these
        return MoDAux(causal_fraction=enter_BT.float().mean().detach(),
                      causal_counts=torch.stack([entered, torch.full_like(entered, enter_BT.numel())]))

    def _forward_causal(self, x_BTD, r_BT, rope, cache) -> tuple[torch.Tensor, list[Aux]]:
        B, T, D = x_BTD.shape
        enter_BT = self.causal_enter(x_BTD, r_BT)
        count_B = enter_BT.sum(1)
        rows_R = count_B.nonzero().squeeze(1)
        mine = self._causal_statistics(enter_BT, rows_R)
        if rows_R.numel() == 0:  # nobody enters: the block costs only the router
            return x_BTD, [mine]
        count_R = count_B[rows_R] if T > 1 else 1  # decoding: one token from each entering row
        all_rows = rows_R.numel() == B
        x_RTD, r_RT = (x_BTD, r_BT) if all_rows else (x_BTD[rows_R], r_BT[rows_R])
        view = cache.rows(rows_R, count_R) if cache is not None else None
        if T == 1:  # decoding: the entering rows' one token each, no compaction to do
            f_RTD, block_aux = self._branch(x_RTD, rope, view)
            # as prefill's AddRows computes it (w * f rounded, then added), so both paths agree bit for bit
            y_RTD = x_RTD + self.branch_weights(r_RT)[..., None].to(f_RTD.dtype) * f_RTD
        else:
            C = int(count_R.max())
            # entering tokens first, in order, then the others as padding (weight 0, never attended)
            position_T = torch.arange(T, device=x_BTD.device)
            idx_RC = torch.where(enter_BT[rows_R], position_T, position_T + T).argsort(dim=1)[:, :C]
            real_RC = torch.arange(C, device=x_BTD.device) < count_R[:, None]
            y_RTD, block_aux = self._run_block(x_RTD, r_RT, idx_RC, real_RC, rope, view)
        aux = block_aux + [mine]
        if all_rows:
            return y_RTD, aux
        return x_BTD.index_copy(0, rows_R, y_RTD), aux

    def _routes_in_kernels(self, x_BTD: torch.Tensor) -> bool:
        """Whether causal routing can take _causal_in_kernels: a decoding step (one token per row) or one sequence,
        the router alone deciding (no predictor), on CPU in float32 with no gradient (kernels.inference_ready)."""
        return (x_BTD.dim() == 3 and x_BTD.shape[0] * x_BTD.shape[1] > 0 and 1 in x_BTD.shape[:2]
                and self.predictor is None and x_BTD.shape[2] == self.router.weight.shape[1]
                and kernels.inference_ready(x_BTD, self.router.weight))

    def _causal_in_kernels(self, x_BTD, rope, cache) -> tuple[torch.Tensor, list[Aux]]:
        """_forward_causal for a decoding step (one token per row) or one sequence (a prompt prefilled, a forward
        with causal routing), on CPU: the router weights and the entering rows of the flattened (B * T, D) input in
        one kernel call, the branch on those rows, and x + g(r) f back in another call. Torch's path took fifteen to
        twenty small ops around the branch (router, mask, counts, argsort of positions, weights, a clone and an
        index_add: 0.35 ms of a routed block's 2.27 ms decoding call at batch 64 before, routed_block_time.py),
        each slowed by the weight products around it. Neither case has padding to build."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        r_N, idx_M, mine = self._route_rows(x_ND)
        M = idx_M.numel()
        if M == 0:  # nobody enters: the block costs only the router
            return x_BTD, [mine]
        x_MD = x_ND if M == B * T else x_ND.index_select(0, idx_M)
        if T == 1:  # decoding: the entering rows, one token each, at the batch's position
            x_in, view = x_MD.view(M, 1, D), None if cache is None else cache.rows(idx_M, 1)
        else:  # one sequence: its entering tokens, rotated by their ORIGINAL positions
            x_in = x_MD.view(1, M, D)
            rope = None if rope is None else (rope[0][idx_M][None], rope[1][idx_M][None])
            view = None if cache is None else cache.rows(torch.zeros(1, dtype=torch.long), torch.tensor([M]))
        f_in, block_aux = self._branch(x_in, rope, view)
        return self._added_back(x_ND, idx_M, r_N, f_in.view(M, D)).view(B, T, D), block_aux + [mine]

    def _route_rows(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MoDAux]:
        """The router weights of N rows (a decoding step's batch, or one sequence's tokens) and the rows above the
        threshold, in order, in one kernel call; and the share let in, from those two numbers."""
        N, D = x_ND.shape
        r_N, idx_M = kernels.mod_route(x_ND, self.router.weight.view(D), float(self.threshold))
        M = idx_M.numel()
        return r_N, idx_M, MoDAux(causal_fraction=torch.tensor(M / N, dtype=torch.float32),
                                  causal_counts=torch.tensor([M, N], dtype=torch.float64))

    def _added_back(self, x_ND: torch.Tensor, idx_M: torch.Tensor, r_N: torch.Tensor,
                    f_MD: torch.Tensor) -> torch.Tensor:
        """x with x + g(r) f on the rows idx_M (distinct): one kernel call, or torch's ops for a branch computed in
        another precision."""
        if f_MD.dtype != torch.float32:
            w_M1 = self.branch_weights(r_N[idx_M])[:, None].to(f_MD.dtype)
            return x_ND.index_copy(0, idx_M, x_ND[idx_M] + w_M1 * f_MD)
        return kernels.mod_add_rows(x_ND, idx_M, r_N, f_MD, self.gate == "sigmoid")

    def _run_block(self, x_BTD, r_BT, idx_BC, real_BC, rope, cache) -> tuple[torch.Tensor, list[Aux]]:
        """x + r * f(x) on the tokens idx_BC (in order) of each row, added back; real_BC marks padding."""
        B, T, D = x_BTD.shape
        C = idx_BC.shape[1]
        flat_N = (idx_BC + T * torch.arange(B, device=idx_BC.device)[:, None]).reshape(-1)  # rows of (B*T, D)
        rope_BC = None
        if rope is not None:
            cos, sin = rope  # (T, k): the same positions for every row
            rope_BC = (cos[idx_BC], sin[idx_BC])  # ORIGINAL positions, not 0..C-1
        x_BCD = GatherRows.apply(x_BTD.reshape(B * T, D), flat_N).view(B, C, D)
        f_BCD, aux = self._branch(x_BCD, rope_BC, cache)
        w_BC = self.branch_weights(r_BT.gather(1, idx_BC))
        if real_BC is not None:
            w_BC = w_BC * real_BC
        src_ND = (w_BC[..., None].to(f_BCD.dtype) * f_BCD).reshape(B * C, D)
        return AddRows.apply(x_BTD.reshape(B * T, D), flat_N, src_ND).view(B, T, D), aux

    # -- causal routing: losses, accuracy, threshold ------------------------------------------------
    def _causal_losses(self, x_BTD, r_BT, idx_BC) -> MoDAux:
        member_BT = torch.zeros_like(r_BT).scatter_(1, idx_BC, 1.0)  # per row: no flattened-index bug
        score_BT = self.causal_scores(x_BTD, r_BT)
        name = "mod_bce" if self.predictor is None else "mod_predictor"
        aux = MoDAux({name: F.binary_cross_entropy_with_logits(score_BT, member_BT)})
        with torch.no_grad():
            score = score_BT.detach()
            enter = score > self.threshold
            member = member_BT.bool()
            aux.causal_accuracy = (enter == member).float().mean()
            # accuracy alone flatters: always skipping scores 1 - capacity; recall shows the members let in
            aux.causal_recall = (enter & member).float().sum() / member.float().sum()
            aux.causal_fraction = enter.float().mean()
            aux.threshold = self.threshold.clone()
            if self.training and self.calibrate:
                q = self._score_quantile(score.flatten())
                step = torch.stack([q, torch.ones_like(q)])
                self._quantiles = step if self._quantiles is None else self._quantiles + step
        return aux

    @torch.no_grad()
    def set_threshold_from(self, score_N: torch.Tensor) -> None:
        """Let the capacity's share of these causal scores in: the threshold becomes their (1 - capacity)
        quantile (mixturelm.mechanisms.mod.calibrate_on_decoding gives the scores decoding sees)."""
        self.threshold.copy_(self._score_quantile(score_N.flatten().float()))

    def _score_quantile(self, score_N: torch.Tensor) -> torch.Tensor:
        """The (1 - capacity) quantile: the threshold above which a `capacity` share of the scores lie. Halfway
        between the k-th and the next score, not on the k-th: the same token computed another way (decoding's
        few-row products sum in another order than a whole sequence's) differs in the last bits, and a
        threshold on a score would let that token in or not by chance."""
        n = score_N.numel()
        k = min(n, max(1, round((1 - self.capacity) * n)))
        low = score_N.kthvalue(k).values.float()
        if k == n:
            return low
        high = score_N.kthvalue(k + 1).values.float()
        mid = (low.double() + (high.double() - low.double()) / 2).float()  # no overflow near the float32 limit
        # on the k-th score where no float lies between the two (or one is infinite or NaN): as before
        return torch.where(torch.isfinite(mid) & (mid < high), mid, low)

    @torch.no_grad()
    def after_optimizer_step(self, reduce=None) -> None:
        """Move the sampling threshold toward the quantiles of this step (summed over processes by reduce)."""
        if self._quantiles is None:
            return
        total = reduce(self._quantiles) if reduce else self._quantiles
        self._quantiles = None
        # an exponential average, bias-corrected so the initial 0 does not drag it (as Adam's moments):
        # scores drift while the router trains, so old quantiles must fade within a few steps
        self.threshold_updates += 1
        m = self.threshold_momentum
        self.threshold_ema.mul_(1 - m).add_(m * total[0] / total[1])
        self.threshold.copy_(self.threshold_ema / (1 - (1 - m) ** float(self.threshold_updates)))

    def new_cache(self, batch: int, capacity: int, device, dtype) -> RaggedKVCache:
        a = self.block.attn  # mixturelm's Block
        return RaggedKVCache(batch, a.kv_heads, a.head_dim, capacity, device, dtype)
