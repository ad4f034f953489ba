"""PEER's expert tables sharded over the processes of a group, by the model dimension, wrapped from outside.

Each of the P processes of the group keeps C = D / P columns of every N x D expert table (u, v, and g for the
GLU variant): process r holds columns r*C .. (r+1)*C - 1 of all N experts. The query network, its norm and
the product keys stay whole and replicated; every process feeds its own tokens (data parallel across the
group). One forward, per layer:

1. each process retrieves for its own tokens with the layer's retrieval (ids and softmax scores); BatchNorm
   or whitening statistics are those of its own tokens, as the data-parallel layer has them;
2. the ids go to every process (all-gather), and each token's r-th column slice to process r (all-to-all);
3. every process computes, for every token of the group, the partial dot products u_i[cols] . x[cols] of
   its columns, and the partial sums go back to the token's process (reduce-scatter): the full u_i . x;
4. the token's process applies the activation and the router scores, w = g * act(u . x), and the weights go
   to every process (all-gather);
5. every process bags its columns of v with the weights, y[cols] = sum_j w_j v_j[cols], and the column
   slices of the outputs go back to the token's process (all-to-all), which concatenates them.

Why the model dimension and not rows (docs/parallel.md, "PEER tables sharded over processes"): with
h*k experts per token far more than P, a token's experts lie on every process, so row sharding must bring
the whole token to every process and its partial output back ((P - 1) * T * D elements each way, four
times per step); the column split moves only a 1/P slice of each token to each process, at the price of the
ids and four h*k-sized exchanges per token, which is less once D exceeds about 2*h*k (bf16 values, int64
ids; 300 at h*k = 128 and P = 8). The work is the same on every
process whatever the routing (each does every pair on C columns), and the layer's row-wise table functions
(`gather_dot`, `bag_sum`, row-sparse gradients included) run unchanged on the (N, C) slices.

Gradients: a table slice's gradient on its process already sums the contributions of every token of the
group: sum it only over processes holding the same columns (none when the group is every process); the
replicated parameters' gradients (query network, norm, sub-keys) are summed over every process, as data
parallelism does. `ShardedPEER.expert_parameters()` names the sharded ones.

Dimension letters: T this process's tokens, A the group's tokens (all processes, in process order),
D d_model, C = D / P columns per process, J = H*K experts per token, N experts, P processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from ..layers.peer import ACTIVATIONS, PEER, PEERAux, Rows, bag_sum, gather_dot
from .expert import _all_to_all, _exchange


class ShardedPEER(nn.Module):
    """A PEER layer whose expert tables are sharded by columns over the processes of `group`; maps
    (B, T, D) to `((B, T, D), PEERAux)` as the layer does. Build it with `peer_sharded(peer, group)`."""

    def __init__(self, peer: PEER, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        if peer.d_model % P:
            raise UsageError(f"PEER tables sharded over {P} processes need d_model divisible by {P}, got "
                             f"d_model={peer.d_model}; change d_model or the number of processes")
        self.group, self.n_shards, self.shard_rank = group, P, rank
        self.n_columns = peer.d_model // P
        cols = slice(rank * self.n_columns, (rank + 1) * self.n_columns)
        with torch.no_grad():  # keep only this process's columns; the full tables are freed
            peer.w_down = nn.Parameter(peer.w_down[:, cols].contiguous())
            peer.w_up = nn.Parameter(peer.w_up[:, cols].contiguous())
            if peer.w_gate is not None:
                peer.w_gate = nn.Parameter(peer.w_gate[:, cols].contiguous())
        self.peer = peer

    @property
    def wrapped(self) -> nn.Module:
        """The layer inside (its state-dict keys are this module's with `.peer` inserted)."""
        return self.peer

    def expert_parameters(self) -> list[nn.Parameter]:
        """The sharded tables (their column slices): reduce their gradients only over processes holding the
        same columns."""
        return self.peer.expert_tables()

    shard_dim = 1  # the tables are cut along this dimension: gather or slice checkpoints along it

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, PEERAux]:
        return self.peer(x_BTD, experts=self._experts)

    @torch.compiler.disable  # as the layer's: row-sparse gradients and data-dependent shapes
    def _experts(self, x_TD: torch.Tensor, ids_TJ: torch.Tensor, g_TJ: torch.Tensor) -> torch.Tensor:
        """The layer's `_experts` (sum over j of g_tj * act(u_j . x_t) v_j) on the group's tokens, each process
        doing its columns."""
        peer, counts = self.peer, self._token_counts(x_TD.shape[0], x_TD.device)
        ids_AJ = self._all_gather_ids(ids_TJ, counts)
        grad = torch.is_grad_enabled() and peer.w_up.requires_grad
        rows = Rows.of(ids_AJ, peer.n_experts) if grad else None  # one grouping of the pairs for every table
        x_AC = self._columns_out(x_TD, counts)
        h_TJ = self._reduce_scatter(gather_dot(x_AC, peer.w_down, ids_AJ, rows, peer.sparse_grad), counts)
        act = ACTIVATIONS[peer.activation]
        if peer.glu:
            gate_TJ = self._reduce_scatter(gather_dot(x_AC, peer.w_gate, ids_AJ, rows, peer.sparse_grad), counts)
            a_TJ = act(gate_TJ) * h_TJ
        else:
            a_TJ = act(h_TJ)
        w_AJ = self._all_gather(a_TJ * g_TJ.to(a_TJ.dtype), counts)
        y_AC = bag_sum(w_AJ, peer.w_up, ids_AJ, rows, peer.sparse_grad)
        return self._columns_back(y_AC, counts)

    # -- exchanges: all through the differentiable all-to-all, so each has its reverse as backward -------
    def _token_counts(self, T: int, device) -> list[int]:
        """Tokens on each process of the group (they may differ): one host synchronisation per call."""
        mine = torch.tensor([T], dtype=torch.long)
        parts = [torch.empty_like(mine) for _ in range(self.n_shards)]
        dist.all_gather(parts, mine, group=self.group)
        return [int(p) for p in parts]

    def _all_gather_ids(self, ids_TJ: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(A, J) ids of the group's tokens, in process order; integers, no gradient."""
        out_AJ = ids_TJ.new_empty(sum(counts), ids_TJ.shape[1])
        sent = ids_TJ.repeat(self.n_shards, 1)
        _exchange(out_AJ, sent, counts, [ids_TJ.shape[0]] * self.n_shards, self.group, "peer ids")
        return out_AJ

    def _all_gather(self, w_TJ: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(A, J): this process's rows to every process; backward: each process's gradients of its own
        rows summed over the group (the repeat's backward sums the copies that came back)."""
        T = w_TJ.shape[0]
        return _all_to_all(w_TJ.repeat(self.n_shards, 1), counts, [T] * self.n_shards, self.group, "peer weights")

    def _reduce_scatter(self, part_AJ: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(T, J): the group's partial sums of this process's rows, summed."""
        T = counts[self.shard_rank]
        got_PTJ = _all_to_all(part_AJ, [T] * self.n_shards, counts, self.group, "peer partial sums")
        return got_PTJ.view(self.n_shards, T, -1).sum(0)

    def _columns_out(self, x_TD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(A, C): the r-th column slice of every token of the group on process r."""
        T, P, C = x_TD.shape[0], self.n_shards, self.n_columns
        x_PTC = x_TD.view(T, P, C).transpose(0, 1).reshape(P * T, C)
        return _all_to_all(x_PTC, counts, [T] * P, self.group, "peer columns")

    def _columns_back(self, y_AC: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(T, D): this process's tokens, their column slices from every process concatenated."""
        T, P, C = counts[self.shard_rank], self.n_shards, self.n_columns
        y_PTC = _all_to_all(y_AC, [T] * P, counts, self.group, "peer columns back")
        return y_PTC.view(P, T, C).transpose(0, 1).reshape(T, P * C)

    def extra_repr(self) -> str:
        return f"shards={self.n_shards}, rank={self.shard_rank}, columns={self.n_columns}"


def peer_sharded(peer: PEER, group: dist.ProcessGroup | None = None) -> ShardedPEER:
    """`peer` with its expert tables sharded by columns over `group` (None: every process), this process
    keeping its d_model / P columns of each. Every process of the group must call it with the same layer
    (same initial weights) and then feed it its own tokens."""
    if not isinstance(peer, PEER):
        raise UsageError(f"peer_sharded takes a mixturelm.layers.PEER, got {type(peer).__name__}")
    return ShardedPEER(peer, group)


def traffic_per_step(T: int, D: int, J: int, P: int, b: int, id_bytes: int = 8, glu: bool = False) -> dict[str, int]:
    """Bytes one process sends to the others (and receives) per PEER layer and training step, forward and
    backward, with T tokens on each of the P processes, J = h*k experts per token, b bytes per value, ids of
    id_bytes (docs/parallel.md, "PEER tables sharded over processes"):
    - "columns" (built here): token column slices out, output slices back, and their gradients, each
      (P-1) * T * D/P values; the ids all-gathered; per pair, the pre-activation's partial sums reduce-scattered,
      the weights all-gathered, and in the backward the reverse of each (J values per token, (P-1) times);
      GLU: the gate's pre-activations and their gradients on top;
    - "rows" (each process N/P experts, retrieval on the token's process): whole tokens all-gathered and the
      partial outputs reduce-scattered, and their gradients, each (P-1) * T * D values; each (id, score) pair
      sent to the owner of its row (a share (P-1)/P of them, routing balanced) and its score gradient back."""
    pair_values = 4 + 2 * glu  # per pair: partial sums and weights, forward and backward
    columns = 4 * (P - 1) * T * (D // P) * b + (P - 1) * T * J * (id_bytes + pair_values * b)
    rows = 4 * (P - 1) * T * D * b + (P - 1) * T * J * (id_bytes + 2 * b) // P
    return {"columns": columns, "rows": rows}


def peer_layers(model: nn.Module) -> list[tuple[str, PEER]]:
    """The PEER layers of `model`, by module name: what `peer_sharded` can wrap."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PEER)]
