"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts", arXiv 2407.04153).

    f(x) = sum_{heads h} sum_{i in I_h(x)} softmax_i(q_h(x)^T k_i) * act(u_i^T x) v_i          (Eq. 3, 7; Alg. 1)

N single-neuron experts e_i(x) = act(u_i . x) v_i, shared by h heads. Each head has its own query
q_h(x) and retrieves its top-k experts from N product keys k_i = [c_a; c'_b] (Lample et al. 2019):
the top-k of each half's sqrt(N) sub-key scores, then the top-k of the k x k sums, which is exact
and never builds an N-sized score tensor. The head's k scores go through a softmax.

Options: per-head sub-keys (the expert pool stays shared), a GLU expert act(g_i . x) (u_i . x) v_i,
query normalisation "batch" (the paper's default, from PKM), "layer", "none" or "whiten" (ours, not
the paper's: `QueryWhitening`, each head's query decorrelated, not only standardised per feature).
BatchNorm and whitening use the statistics of the whole batch in training, so a token's query depends
on the other tokens of the batch, future positions of its own sequence included: a small causal leak,
present in the paper and PKM, gone at eval (running statistics). "layer" has no leak.

Speed and memory: the expert tables are only ever touched row by row. Two autograd functions do
the heavy work and save nothing larger than (tokens, h*k):
- `gather_dot`: h_j = u_{id_j} . x_{t_j} (gather rows, batched dot, in token chunks); its backward
  is an EmbeddingBag over U for dx and one over x (grouped by expert) for the touched rows of dU;
- `bag_sum`: y_t = sum_j w_j v_{id_j}, one EmbeddingBag with per-sample weights over all h*k
  experts of a token; its backward gathers-and-dots for dw and bags dy for the touched rows of dV.
The table gradients are sparse (coalesced rows, `sparse_grad=True`, for mixturelm.optim's row-wise Adam or torch.optim.SparseAdam) or
dense. The sub-key scores run without autograd: the scores of the chosen keys are recomputed with
`gather_dot`, which has the same gradient as the top-k (zero on keys that were not chosen).

Dimension letters: T tokens, D d_model, H heads, K top-k per head, J = H*K experts per token,
S = sqrt(N) sub-keys per half, Q d_key (query size per head), P = Q/2, R touched rows.
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
from .auxiliary import Aux


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
CHUNK_ELEMENTS = 1 << 22  # gathered rows per chunk of gather_dot (16 MB in fp32): stays in cache


# ----------------------------------------------------------------------------------------------
# Row-wise table operations

@dataclass
class Rows:
    """The (token, expert) pairs of a call grouped by expert: which rows a table gradient touches.
    pair p = t*J + j; `order` sorts pairs by expert id, `rows_R` are the distinct ids, `offsets_R`
    where each row's pairs start in the sorted order."""

    token_sorted: torch.Tensor  # (T*J,) token of each pair, in expert order
    order: torch.Tensor  # (T*J,) pair index, in expert order
    rows_R: torch.Tensor  # (R,) distinct expert ids, ascending
    offsets_R: torch.Tensor  # (R,) start of each row's pairs in the sorted order

    @staticmethod
    def of(ids_TJ: torch.Tensor, n_rows: int) -> Rows:
        with torch.no_grad():
            if kernels.plain_dispatch() and kernels.usable(torch.empty(0), ids_TJ):
                return Rows(*kernels.group_rows(ids_TJ, n_rows))
            J = ids_TJ.shape[1]
            flat = ids_TJ.reshape(-1)
            # int32 keys sort several times faster on CPU than int64
            ids_sorted, order = (flat.int() if n_rows < 2**31 else flat).sort(stable=True)
            ids_sorted = ids_sorted.long()
            rows_R, counts_R = torch.unique_consecutive(ids_sorted, return_counts=True)
            offsets_R = torch.zeros_like(counts_R)
            offsets_R[1:] = counts_R.cumsum(0)[:-1]
            return Rows(order // J, order, rows_R, offsets_R)

    def table_grad(self, src_TD: torch.Tensor, weight_TJ: torch.Tensor, n_rows: int, sparse: bool) -> torch.Tensor:
        """d table[r] = sum over pairs (t, j) with id r of weight_tj * src_t: a bag over src rows."""
        if kernels.plain_dispatch() and kernels.usable(src_TD, weight_TJ):
            rows_RD = kernels.row_grad(src_TD, weight_TJ, self.order, self.token_sorted, self.offsets_R)
        else:
            rows_RD = F.embedding_bag(self.token_sorted, src_TD, self.offsets_R, mode="sum",
                                      per_sample_weights=weight_TJ.reshape(-1)[self.order])
        if sparse:
            return torch.sparse_coo_tensor(self.rows_R[None], rows_RD, (n_rows, src_TD.shape[1]),
                                           is_coalesced=True, check_invariants=False)
        return torch.zeros(n_rows, src_TD.shape[1], dtype=rows_RD.dtype,
                           device=rows_RD.device).index_copy_(0, self.rows_R, rows_RD)


def _gather_dot(table_ND: torch.Tensor, ids_TJ: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    """out_tj = table[ids_tj] . x_t: the fused CPU kernel (layers/kernels.py) where it can be had and no
    dispatch mode (FlopCounterMode, fake tensors) must see the ops; else PyTorch ops, gathering at most
    CHUNK_ELEMENTS table values at a time."""
    if kernels.plain_dispatch() and kernels.usable(table_ND, ids_TJ, x_TD):
        return kernels.gather_dot(table_ND, ids_TJ, x_TD)
    T, J = ids_TJ.shape
    D = table_ND.shape[1]
    out_TJ = torch.empty(T, J, dtype=x_TD.dtype, device=x_TD.device)
    step = max(1, CHUNK_ELEMENTS // max(1, J * D))
    buf = torch.empty(min(step, T) * J, D, dtype=table_ND.dtype, device=table_ND.device)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        rows = torch.index_select(table_ND, 0, ids_TJ[t0:t1].reshape(-1), out=buf[:(t1 - t0) * J])
        torch.bmm(rows.view(t1 - t0, J, D), x_TD[t0:t1, :, None], out=out_TJ[t0:t1, :, None])
    return out_TJ


def _bag(table_ND: torch.Tensor, ids_TJ: torch.Tensor, weight_TJ: torch.Tensor) -> torch.Tensor:
    """out_t = sum_j weight_tj * table[ids_tj]: one bag of J rows per token."""
    return F.embedding_bag(ids_TJ, table_ND, mode="sum", per_sample_weights=weight_TJ)


class GatherDot(torch.autograd.Function):
    """h_TJ = table[ids] . x (per pair), with a row-wise backward."""

    @staticmethod
    def forward(ctx, x_TD, table_ND, ids_TJ, rows: Rows | None, sparse: bool):
        xt = x_TD.to(table_ND.dtype)
        ctx.save_for_backward(xt, table_ND, ids_TJ)
        ctx.rows, ctx.sparse, ctx.x_dtype = rows, sparse, x_TD.dtype
        return _gather_dot(table_ND, ids_TJ, xt.contiguous())

    @staticmethod
    def backward(ctx, dh_TJ):
        x_TD, table_ND, ids_TJ = ctx.saved_tensors
        dh_TJ = dh_TJ.to(table_ND.dtype).contiguous()
        dx = _bag(table_ND, ids_TJ, dh_TJ).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dtable = None
        if ctx.needs_input_grad[1]:
            rows = ctx.rows or Rows.of(ids_TJ, table_ND.shape[0])
            dtable = rows.table_grad(x_TD, dh_TJ, table_ND.shape[0], ctx.sparse)
        return dx, dtable, None, None, None


class BagSum(torch.autograd.Function):
    """y_TD = sum_j w_tj table[ids_tj], with a row-wise backward."""

    @staticmethod
    def forward(ctx, w_TJ, table_ND, ids_TJ, rows: Rows | None, sparse: bool):
        wt = w_TJ.to(table_ND.dtype).contiguous()
        ctx.save_for_backward(wt, table_ND, ids_TJ)
        ctx.rows, ctx.sparse = rows, sparse
        return _bag(table_ND, ids_TJ, wt)

    @staticmethod
    def backward(ctx, dy_TD):
        w_TJ, table_ND, ids_TJ = ctx.saved_tensors
        dy_TD = dy_TD.to(table_ND.dtype).contiguous()  # bf16 autocast: the tables' dtype
        dw = _gather_dot(table_ND, ids_TJ, dy_TD) if ctx.needs_input_grad[0] else None
        dtable = None
        if ctx.needs_input_grad[1]:
            rows = ctx.rows or Rows.of(ids_TJ, table_ND.shape[0])
            dtable = rows.table_grad(dy_TD, w_TJ, table_ND.shape[0], ctx.sparse)
        return dw, dtable, None, None, None


def gather_dot(x_TD, table_ND, ids_TJ, rows: Rows | None = None, sparse: bool = False) -> torch.Tensor:
    if torch.compiler.is_compiling() and not sparse:
        # Under torch.compile (reached by the sub-key scores only: the expert tables run eagerly, in
        # PEER._experts), plain ops, which compile fuses: GatherDot's backward groups the rows by id, a shape
        # only the data knows
        return torch.bmm(table_ND[ids_TJ], x_TD.to(table_ND.dtype)[:, :, None]).squeeze(-1)
    return GatherDot.apply(x_TD, table_ND, ids_TJ, rows, sparse)


def bag_sum(w_TJ, table_ND, ids_TJ, rows: Rows | None = None, sparse: bool = False) -> torch.Tensor:
    return BagSum.apply(w_TJ, table_ND, ids_TJ, rows, sparse)


# ----------------------------------------------------------------------------------------------
# Product-key retrieval

@torch.no_grad()
def product_key_topk(q_THQ: torch.Tensor, keys_2LSP: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the S*S product keys [c_a; c'_b] of each head's query, by the top-k of each
    half, then the top-k of the k x k candidate sums (Lample et al. 2019). keys_2LSP holds the two
    sub-key sets, L = 1 (shared) or H (per head). Returns the sub-key ids (a, b), each (T, H, K),
    best first; the expert id is a * S + b."""
    T, H, Q = q_THQ.shape
    L, S, P = keys_2LSP.shape[1:]
    q_2XP = q_THQ.reshape(T, H, 2, P).permute(2, 1, 0, 3)  # (half, head, token, P)
    if L == 1:
        s_2LTS = torch.bmm(q_2XP.reshape(2, H * T, P), keys_2LSP[:, 0].transpose(1, 2)).view(2, H, T, S)
    else:
        s_2LTS = torch.bmm(q_2XP.reshape(2 * H, T, P), keys_2LSP.reshape(2 * H, S, P).transpose(1, 2)).view(2, H, T, S)
    if k <= 64 and kernels.plain_dispatch() and kernels.usable(s_2LTS):
        return kernels.product_key_topk(s_2LTS, k)
    v_2HTK, i_2HTK = s_2LTS.topk(k, dim=-1)
    v1, v2 = v_2HTK.permute(0, 2, 1, 3)  # (T, H, K) each
    i1, i2 = i_2HTK.permute(0, 2, 1, 3)
    cand_THKK = v1[..., :, None] + v2[..., None, :]
    _, pos_THK = cand_THKK.reshape(T, H, k * k).topk(k, dim=-1)
    a_THK = i1.gather(-1, torch.div(pos_THK, k, rounding_mode="floor"))
    b_THK = i2.gather(-1, pos_THK % k)
    return a_THK, b_THK


class QueryWhitening(nn.Module):
    """ZCA whitening of each head's query, then a per-feature affine (as BatchNorm's): q' = W_h (q - m_h),
    W_h = (C_h + eps * max eig(C_h) * I)^(-1/2), with m_h, C_h the batch's mean and covariance in
    training (running averages at eval, as BatchNorm). Why: BatchNorm standardises each query feature
    but keeps their correlations, and in a small model the queries are far from isotropic (peer-tiny's
    PEER input has effective rank ~33 of 128), so the two halves' sub-key choices are tied together and
    few (a, b) pairs ever co-occur. Whitening spreads the queries over all directions (peer-tiny, step
    200: 52 % of the experts against BatchNorm's 21 %), at a cost in loss that grows with width and off
    the training distribution (README, PEER training check): an option, not the presets' default.
    eps is relative to the largest eigenvalue. The statistics
    carry no gradient (the whitening matrix is a constant of the step): the eigendecomposition's
    gradient is unstable for close eigenvalues, and top-k retrieval only needs the forward spread.
    Interface of BatchNorm's running statistics (momentum None: a cumulative average), so precise-BN
    calibration (`train.calibrate_query_norms`) serves both."""

    def __init__(self, n_heads: int, d_key: int, eps: float = 1e-4, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.n_heads, self.d_key, self.eps, self.momentum = n_heads, d_key, eps, momentum
        self.track_running_stats = True
        # the affine is stored flat, as BatchNorm's: 1-D parameters are kept out of weight decay
        self.weight = nn.Parameter(torch.ones(n_heads * d_key))
        self.bias = nn.Parameter(torch.zeros(n_heads * d_key))
        self.register_buffer("running_mean", torch.zeros(n_heads, d_key))
        self.register_buffer("running_cov", torch.eye(d_key).repeat(n_heads, 1, 1))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._cached: tuple | None = None  # (statistics key, matrix) of the running covariance

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_cov.copy_(torch.eye(self.d_key).expand_as(self.running_cov))
        self.num_batches_tracked.zero_()
        self._cached = None

    @torch.no_grad()
    def _update(self, mean_HQ: torch.Tensor, cov_HQQ: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        m = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean_HQ.to(self.running_mean.dtype), m)
        self.running_cov.lerp_(cov_HQQ.to(self.running_cov.dtype), m)
        self._cached = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cached = None
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def matrix(self, cov_HQQ: torch.Tensor) -> torch.Tensor:
        """(C + eps * max eig * I)^(-1/2) per head, in float64 (the small eigenvalues matter)."""
        e_HQ, V_HQQ = torch.linalg.eigh(cov_HQQ.double())
        e_HQ = e_HQ.clamp_min(0) + self.eps * e_HQ[:, -1:].clamp_min(1e-30)
        return (V_HQQ * e_HQ.rsqrt()[:, None, :]) @ V_HQQ.transpose(1, 2)

    def _running_matrix(self) -> torch.Tensor:
        """The matrix of the running covariance, kept until the statistics change: decoding calls the layer
        once per token, and an eigendecomposition per token would cost more than the layer. Dropped by
        every update, reset, load and move; in-place writes from outside are caught by the version."""
        cov = self.running_cov
        key = (None if cov.is_inference() else cov._version, cov.data_ptr(), cov.device, cov.dtype)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.matrix(cov))
        return self._cached[1]

    def forward(self, q_THQ: torch.Tensor) -> torch.Tensor:
        T, H, Q = q_THQ.shape
        if self.training:
            if T < 2:
                raise UsageError(f"query whitening needs at least 2 tokens in a training batch, got {T} "
                                 "(as BatchNorm); evaluate in eval mode")
            with torch.no_grad():
                qd = q_THQ.detach().double()
                mean_HQ = qd.mean(0)
                c_THQ = qd - mean_HQ
                cov_HQQ = torch.einsum("thp,thq->hpq", c_THQ, c_THQ) / T
            if self.track_running_stats:
                self._update(mean_HQ, cov_HQQ)
            W_HQQ = self.matrix(cov_HQQ)
        else:
            mean_HQ, W_HQQ = self.running_mean, self._running_matrix()
        # in float32 at least: under bf16 autocast a bf16 matrix would add its rounding to the queries'
        dtype = torch.promote_types(q_THQ.dtype, torch.float32)
        with torch.autocast(q_THQ.device.type, enabled=False):
            white_THQ = torch.einsum("thp,hpq->thq", q_THQ.to(dtype) - mean_HQ.to(dtype), W_HQQ.to(dtype))
            out = white_THQ * self.weight.view(H, Q).to(dtype) + self.bias.view(H, Q).to(dtype)
        return out.to(q_THQ.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, d_key={self.d_key}, eps={self.eps}"


# ----------------------------------------------------------------------------------------------
# The layer

# query normalisations: BatchNorm over the H*Q query features (PKM, the paper's default), LayerNorm per head's
# query, none, or whitening per head; each built from (heads, d_key)
QUERY_NORM_BUILDERS = {"batch": lambda h, q: nn.BatchNorm1d(h * q), "layer": lambda h, q: nn.LayerNorm(q),
                       "none": lambda h, q: nn.Identity(), "whiten": QueryWhitening}
QUERY_NORMS = tuple(QUERY_NORM_BUILDERS)


@dataclass(kw_only=True)
class PEERConfig:
    """A PEER layer (He 2024): N single-neuron experts retrieved by product keys. Defaults are the paper's
    (Sec. 3.1): N = 1024^2, h = 8 heads, k = 16 per head, query BatchNorm. Checked once, here."""

    n_experts: int = 1024 * 1024  # N, a perfect square (two sets of sqrt(N) sub-keys)
    n_heads: int = 8  # h query networks sharing one key set and one expert pool
    top_k: int = 16  # k experts per head
    d_key: int = 128  # query / product-key size (each sub-key is d_key / 2)
    activation: str = "gelu"  # of the single-neuron experts: gelu, relu (the paper's two), silu
    glu: bool = False  # expert act(g_i . x) (u_i . x) v_i, one more N x d table
    per_head_keys: bool = False  # each head its own sub-keys (the paper shares them); experts stay shared
    query_norm: str = "batch"  # batch (the paper's; leaks batch statistics in training), layer, none, whiten
    # row-sparse gradients of the expert tables, for mixturelm.optim.build_optimizer (which switches it on;
    # the presets set it); False: dense gradients, for any optimizer
    sparse_grad: bool = False

    def __post_init__(self) -> None:
        positive_ints(self, "n_experts", "n_heads", "top_k", "d_key")
        s = math.isqrt(self.n_experts)
        if s * s != self.n_experts:
            raise UsageError(f"PEERConfig.n_experts={self.n_experts} is not a perfect square; product keys need "
                             f"N = S*S, e.g. {s * s} or {(s + 1) ** 2}")
        if self.d_key % 2:
            raise UsageError(f"PEERConfig.d_key={self.d_key} is odd; the query is split in two halves, use an even size")
        if self.top_k > s:
            raise UsageError(f"PEERConfig.top_k={self.top_k} exceeds sqrt(n_experts={self.n_experts})={s}; each half's "
                             "top-k picks among sqrt(N) sub-keys; lower top_k or raise n_experts")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"PEERConfig.activation={self.activation!r} is unknown; choose one of "
                             f"{', '.join(ACTIVATIONS)}")
        if self.query_norm not in QUERY_NORMS:
            raise UsageError(f"PEERConfig.query_norm={self.query_norm!r} is unknown; choose one of "
                             f"{', '.join(QUERY_NORMS)}")


@dataclass
class PEERAux(Aux):
    """A PEER call's retrievals; its statistics are computed from them when read (PEER has no losses)."""

    kind: ClassVar[str] = "peer"
    ids_TJ: torch.Tensor | None = None  # the experts each token retrieved (all heads)
    scores_TJ: torch.Tensor | None = None  # their softmax router scores
    n_experts: int = 0

    @property
    @torch.no_grad()
    def expert_scores(self) -> torch.Tensor:
        """(N,) router scores summed per expert over the call: the z of the paper's Table 2 before
        normalisation (accumulate it over an evaluation set)."""
        return torch.bincount(self.ids_TJ.reshape(-1), weights=self.scores_TJ.reshape(-1).float(),
                              minlength=self.n_experts)

    @torch.no_grad()
    def scalars(self) -> dict[str, torch.Tensor]:
        return {"experts_used_fraction": (self.expert_scores > 0).float().mean()}


class PEER(nn.Module):
    """PEER layer mapping (B, T, D) to (B, T, D), returning `(y, PEERAux)`."""

    def __init__(self, d_model: int, config: PEERConfig | None = None, **options) -> None:
        """config, or its fields as keywords: PEER(256, n_experts=64 * 64, n_heads=4, top_k=8, d_key=32)."""
        super().__init__()
        if config is not None and options:
            raise UsageError("PEER takes a PEERConfig or its fields as keywords, not both")
        c = self.config = config if config is not None else PEERConfig(**options)
        n_experts, n_heads, d_key, query_norm = c.n_experts, c.n_heads, c.d_key, c.query_norm
        S = math.isqrt(n_experts)
        self.d_model, self.n_experts, self.n_heads, self.top_k, self.d_key = d_model, n_experts, n_heads, c.top_k, d_key
        self.n_sub_keys, self.activation, self.glu, self.sparse_grad = S, c.activation, c.glu, c.sparse_grad
        self.query = nn.Linear(d_model, n_heads * d_key, bias=False)
        self.query_norm = QUERY_NORM_BUILDERS[query_norm](n_heads, d_key)
        self.query_norm_kind = query_norm
        self.sub_keys = nn.Parameter(torch.empty(2, n_heads if c.per_head_keys else 1, S, d_key // 2))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model))  # u_i
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model))  # v_i
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model)) if c.glu else None  # g_i (GLU variant)
        self.reset_parameters()

    own_init = ("query",)  # initialised by reset_parameters, not by the model (MixtureLM.reset_parameters)

    def reset_parameters(self, std: float | None = None, out_std: float | None = None) -> None:
        """Sub-keys uniform in +-1/sqrt(Q/2) (PKM); u_i (and g_i) N(0, std), default 1/sqrt(D) (a unit
        pre-activation); v_i N(0, out_std), default std / sqrt(H*K)."""
        std = std or self.d_model ** -0.5
        nn.init.uniform_(self.sub_keys, -(self.d_key // 2) ** -0.5, (self.d_key // 2) ** -0.5)
        nn.init.normal_(self.query.weight, 0.0, std)
        for table in (self.w_down, self.w_gate):
            if table is not None:
                nn.init.normal_(table, 0.0, std)
        nn.init.normal_(self.w_up, 0.0, out_std or std / math.sqrt(self.n_heads * self.top_k))

    def expert_tables(self) -> list[nn.Parameter]:
        """The N x D tables, touched row by row (sparse gradients when sparse_grad)."""
        return [t for t in (self.w_down, self.w_up, self.w_gate) if t is not None]

    def queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        q = self.query(x_TD)
        if self.query_norm_kind == "batch":
            q = self.query_norm(q)
        T = x_TD.shape[0]
        q_THQ = q.view(T, self.n_heads, self.d_key)
        return self.query_norm(q_THQ) if self.query_norm_kind in ("layer", "whiten") else q_THQ

    def retrieve(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids (T, H, K) and their softmax router scores (T, H, K), differentiable in the
        query network and the sub-keys."""
        q_THQ = self.queries(x_TD)
        a_THK, b_THK = product_key_topk(q_THQ.detach(), self.sub_keys.detach(), self.top_k)
        T, H, K, S, P = *a_THK.shape, self.n_sub_keys, self.d_key // 2
        L = self.sub_keys.shape[1]
        # the scores of the chosen keys, recomputed with gradients: c_a . q1 + c'_b . q2, both halves in
        # one call: row (t, h, half) of q against the table of all 2*L*S sub-keys
        offset_H2 = (torch.arange(H, device=x_TD.device)[:, None] * S * (L > 1)
                     + torch.arange(2, device=x_TD.device)[None, :] * L * S)
        ids_XK = (torch.stack([a_THK, b_THK], 2) + offset_H2[:, :, None]).reshape(T * H * 2, K)
        score_X = gather_dot(q_THQ.reshape(T * H * 2, P), self.sub_keys.reshape(2 * L * S, P), ids_XK)
        score = score_X.view(T, H, 2, K).sum(2)
        # softmax in float32 at least (bf16 autocast), float64 stays float64
        return a_THK * S + b_THK, score.to(torch.promote_types(score.dtype, torch.float32)).softmax(-1)

    def forward(self, x_BTD: torch.Tensor, experts=None) -> tuple[torch.Tensor, PEERAux]:
        """experts: what computes the experts' sum from (x_TD, ids_TJ, g_TJ), `_experts` by default (the
        tables sharded over processes bring their own, mixturelm.parallel.peer_sharded)."""
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        ids_THK, g_THK = self.retrieve(x_TD)
        T, J = x_TD.shape[0], self.n_heads * self.top_k
        ids_TJ, g_TJ = ids_THK.reshape(T, J), g_THK.reshape(T, J)
        y = (experts or self._experts)(x_TD, ids_TJ, g_TJ).to(x_BTD.dtype).reshape(shape)
        return y, PEERAux(ids_TJ=ids_TJ, scores_TJ=g_TJ, n_experts=self.n_experts)

    # Eager under torch.compile (a graph break per PEER layer): the table gradients are row-sparse tensors,
    # which a compiled graph cannot return, and grouping the pairs by expert gives a shape only the data
    # knows. The work here is the fused kernels' already; retrieval before it is compiled.
    @torch.compiler.disable
    def _experts(self, x_TD: torch.Tensor, ids_TJ: torch.Tensor, g_TJ: torch.Tensor) -> torch.Tensor:
        """sum over j of g_tj * act(u_j . x_t) v_j (Eq. 3), the experts j = ids_TJ[t]."""
        rows = Rows.of(ids_TJ, self.n_experts) if torch.is_grad_enabled() and self.w_up.requires_grad else None
        act = ACTIVATIONS[self.activation]
        h_TJ = gather_dot(x_TD, self.w_down, ids_TJ, rows, self.sparse_grad)  # u_i . x
        if self.glu:
            a_TJ = act(gather_dot(x_TD, self.w_gate, ids_TJ, rows, self.sparse_grad)) * h_TJ
        else:
            a_TJ = act(h_TJ)
        w_TJ = a_TJ * g_TJ.to(a_TJ.dtype)
        return bag_sum(w_TJ, self.w_up, ids_TJ, rows, self.sparse_grad)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, heads={self.n_heads}, top_k={self.top_k}, "
                f"d_key={self.d_key}, activation={self.activation}, glu={self.glu}, "
                f"per_head_keys={self.sub_keys.shape[1] > 1}, query_norm={self.query_norm_kind}")


def usage_from_scores(scores_N: torch.Tensor) -> dict[str, float]:
    """The paper's Table 2: usage = fraction of experts with any score; unevenness
    KL(z || uniform) = log N + sum_i z_i log z_i, z the normalised accumulated router scores."""
    N = scores_N.numel()
    z = scores_N.double() / scores_N.double().sum().clamp_min(1e-300)
    plogp = torch.where(z > 0, z * z.clamp_min(1e-300).log(), torch.zeros_like(z))
    return {"usage": (scores_N > 0).double().mean().item(), "kl_uniform": math.log(N) + plogp.sum().item()}
