"""Expert parallelism: a MoE layer's experts sharded over the processes of a group, wrapped from outside.

Each of the ep processes of the group holds E_local = E / ep experts (slices of the layer's 3-D expert
tensors: process r holds experts r*E_local .. (r+1)*E_local - 1); the router and the shared experts stay
replicated and see only the process's own tokens. One forward (GShard; MegaBlocks `parallel_forward_once`):

1. route the process's tokens with the layer's own router (and capacity), sort the assignments by expert;
2. all_to_all_single of the per-expert counts, so each process learns how many rows it receives from each
   other process for each of its experts; the split sizes go to the host (one sync per layer);
3. all_to_all_single of the rows (autograd-aware: its backward is the reverse all-to-all);
4. the local experts on the received rows, regrouped by local expert inside `dispatch_swiglu` (no gate);
5. the reverse all_to_all_single of the outputs, then the combine with the gates on the sending process,
   as the single-device layer does.

A process that receives no rows (or sends none) still joins every collective, forward and backward.

Gradients: an expert's gradient on its process already sums the contributions of every process's tokens,
so expert gradients are summed only over the processes holding the same experts (none when the group is the
whole world), never over the expert-parallel group; the router's and the shared experts' gradients are
summed over every process. With per-process mean losses both are then divided by the number of processes
(parallel/expert_training.py). `ExpertParallelMoE.expert_parameters()` names the sharded ones.

Measuring the exchanges: inside `with record_exchanges() as stats:` every all-to-all of this process adds its
bytes and seconds to `stats` (by kind: counts, dispatch, combine, and the backward of the last two); outside,
the exchanges only test that no recorder is set (`mixturelm bench parallel` uses it).

Dimension letters: T tokens, D d_model, E experts (all), L local experts, A assignments, R received rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import UsageError
from ..layers.dispatch import SumTopK, dispatch_swiglu, rows_in_expert_order, sort_by_expert
from ..layers.moe import MoE, MoEAux


class ExpertParallelMoE(nn.Module):
    """A MoE layer whose experts are sharded over the processes of `group`; maps (B, T, D) to
    `((B, T, D), MoEAux)` as the layer does. Build it with `expert_parallel(moe, group)`."""

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        if moe.n_experts % ep:
            raise UsageError(f"expert parallelism over {ep} processes needs n_experts divisible by {ep}, "
                             f"got n_experts={moe.n_experts}; change n_experts or the expert-parallel size")
        self.group, self.ep_size, self.ep_rank = group, ep, rank
        self.n_local = moe.n_experts // ep
        local = slice(rank * self.n_local, (rank + 1) * self.n_local)
        with torch.no_grad():  # keep only this process's experts; the full tensors are freed
            moe.w_gate_up = nn.Parameter(moe.w_gate_up[local].clone())
            moe.w_down = nn.Parameter(moe.w_down[local].clone())
        self.moe = moe

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        return self.moe(x_BTD, valid_BT, dispatch=self.dispatch)

    def dispatch(self, x_TD, token_A, expert_A, weight_A, w_gate_up_LD2F, w_down_LFD, impl, k_per_token=None):
        """`dispatch_swiglu`'s contract, the experts on the processes of the group."""
        E, D = self.moe.n_experts, x_TD.shape[-1]
        w_gate_up_LD2F, w_down_LFD = local(w_gate_up_LD2F), local(w_down_LFD)  # DTensors under --fsdp
        order_A, counts_E = sort_by_expert(expert_A, E)
        # 1. rows in expert order, so that each process's rows are one contiguous block
        x_AD, token_sorted_A, inverse_A = rows_in_expert_order(x_TD, token_A, order_A, k_per_token)
        # 2. per-expert counts: recv_counts[p * L + l] rows come from process p for local expert l
        recv_counts_PL = torch.empty_like(counts_E)
        _exchange(recv_counts_PL, counts_E, None, None, self.group, "counts")
        send_splits = counts_E.view(self.ep_size, -1).sum(1).tolist()
        recv_splits = recv_counts_PL.view(self.ep_size, -1).sum(1).tolist()
        # 3. the rows to the processes of their experts
        x_RD = _all_to_all(x_AD, recv_splits, send_splits, self.group, "dispatch")
        # 4. local experts; rows arrive by source process, then expert: dispatch_swiglu regroups them by expert
        local_R = torch.arange(self.n_local, device=x_TD.device).repeat(self.ep_size).repeat_interleave(recv_counts_PL)
        rows_R = torch.arange(local_R.numel(), device=x_TD.device)
        y_RD = dispatch_swiglu(x_RD, rows_R, local_R, None, w_gate_up_LD2F, w_down_LFD, impl, 1)
        # 5. outputs back to their tokens' processes, in the order sent; combined with the gates
        y_AD = _all_to_all(y_RD, send_splits, recv_splits, self.group, "combine")
        if k_per_token:
            return SumTopK.apply(y_AD, weight_A.view(-1, k_per_token), order_A, inverse_A, k_per_token)
        y_AD = y_AD * weight_A[order_A, None].to(y_AD.dtype)
        return x_TD.new_zeros(x_TD.shape[0], D).index_add_(0, token_sorted_A, y_AD)

    shard_dim = 0  # the experts are cut along this dimension: gather or slice checkpoints along it

    @property
    def wrapped(self) -> nn.Module:
        """The layer inside (its state-dict keys are this module's with `.moe` inserted)."""
        return self.moe

    def expert_parameters(self) -> list[nn.Parameter]:
        """The sharded parameters: reduce their gradients only over processes holding the same experts."""
        return [self.moe.w_gate_up, self.moe.w_down]

    def distribute(self, mesh, placements) -> None:
        """The expert slices as DTensors on `mesh` (their local tensors the slices kept), so that they share
        an optimizer with FSDP's DTensors and reach distributed checkpoints sharded. The forward still
        computes with the local slices; their gradients come back as DTensors of the same placements."""
        with torch.no_grad():
            for name in ("w_gate_up", "w_down"):
                slice_ = getattr(self.moe, name)
                setattr(self.moe, name, nn.Parameter(DTensor.from_local(slice_.detach(), mesh, placements,
                                                                        run_check=False)))

    def after_optimizer_step(self, reduce=None) -> None:
        """The sigmoid_bias router's load summed over the group first: every process routes with the same bias,
        so it must see the same load. A further `reduce` (over data-parallel processes, or all of them) may
        count a process's load more than once; the update uses only sign(mean - load), which a uniform
        multiple does not change."""
        def over_group(load_E: torch.Tensor) -> torch.Tensor:
            load_E = load_E.clone()
            dist.all_reduce(load_E, group=self.group)
            return reduce(load_E) if reduce else load_E
        self.moe.after_optimizer_step(over_group)


def expert_parallel(moe: MoE, group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
    """`moe` with its experts sharded over `group` (None: every process), this process keeping its share.
    Every process of the group must call it with the same layer (same initial weights)."""
    if not isinstance(moe, MoE):
        raise UsageError(f"expert_parallel takes a mixturelm.layers.MoE, got {type(moe).__name__}")
    return ExpertParallelMoE(moe, group)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """The MoE layers of `model`, by module name: what `expert_parallel` can wrap."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this process holds: a DTensor's local tensor (expert slices and FSDP's shards under
    --fsdp), or `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def _all_to_all(x_AD: torch.Tensor, out_splits: list[int], in_splits: list[int], group, kind: str) -> torch.Tensor:
    """Rows split by process, exchanged; differentiable (the backward is the reverse exchange)."""
    return _AllToAll.apply(x_AD, out_splits, in_splits, group, kind)


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with a backward (torch.distributed.nn.functional's is deprecated in torch 2.13).
    Every process runs the backward, even with no rows (autograd materialises an empty gradient), so a
    process that received nothing still joins the reverse exchange."""

    @staticmethod
    def forward(ctx, x_AD, out_splits: list[int], in_splits: list[int], group, kind: str):
        ctx.splits, ctx.group, ctx.kind = (in_splits, out_splits), group, kind
        out_RD = x_AD.new_empty(sum(out_splits), *x_AD.shape[1:])
        _exchange(out_RD, x_AD.contiguous(), out_splits, in_splits, group, kind)
        return out_RD

    @staticmethod
    def backward(ctx, d_out_RD):
        in_splits, out_splits = ctx.splits
        d_x = _AllToAll.apply(d_out_RD.contiguous(), in_splits, out_splits, ctx.group, ctx.kind + " backward")
        return d_x, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Measuring the exchanges (off unless a recorder is set)

@dataclass
class ExchangeTotals:
    """What one kind of exchange moved on this process. Bytes are those of the send and receive buffers:
    `sent` counts every row this process put in its send buffer (the rows for its own experts too, which
    all_to_all_single copies locally), `sent_to_self` those rows alone."""

    calls: int = 0
    sent: int = 0
    sent_to_self: int = 0
    received: int = 0
    seconds: float = 0.0


@dataclass
class ExchangeStats:
    """Totals by kind: counts, dispatch, combine, dispatch backward, combine backward."""

    kinds: dict[str, ExchangeTotals] = field(default_factory=dict)

    def add(self, kind: str, sent: int, sent_to_self: int, received: int, seconds: float) -> None:
        t = self.kinds.setdefault(kind, ExchangeTotals())
        t.calls += 1
        t.sent += sent
        t.sent_to_self += sent_to_self
        t.received += received
        t.seconds += seconds


_recorder: ExchangeStats | None = None  # set only inside record_exchanges()


@contextmanager
def record_exchanges() -> Iterator[ExchangeStats]:
    """Every expert-parallel exchange of this process inside the block adds its bytes and wall time (on CUDA
    synchronised before and after, so the time is the exchange's, not the queued work's) to the stats."""
    global _recorder
    previous, _recorder = _recorder, ExchangeStats()
    try:
        yield _recorder
    finally:
        _recorder = previous


def _exchange(out: torch.Tensor, x: torch.Tensor, out_splits, in_splits, group, kind: str) -> None:
    """dist.all_to_all_single (splits None: equal shares), recorded when a recorder is set."""
    if _recorder is None:  # the normal path: one test, nothing else
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    row_bytes = x.element_size() * math.prod(x.shape[1:])  # a process may send no rows
    own_rows = in_splits[rank] if in_splits is not None else x.shape[0] // ep
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    _recorder.add(kind, x.shape[0] * row_bytes, own_rows * row_bytes, out.shape[0] * row_bytes,
                  time.perf_counter() - t0)
