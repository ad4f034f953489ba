"""Expert parallelism in training: every MoE layer of a model wrapped with `expert_parallel` and every PEER
layer with `peer_sharded` (its tables cut by columns), the gradients reduced over the right processes, and
checkpoints in the ordinary single-device format.

N processes form N / E expert-parallel groups of E consecutive ranks (ranks g*E .. g*E + E - 1); in each,
rank g*E + j holds the j-th share of every MoE layer's experts (and of every PEER layer's table columns).
Processes at the same position j of different groups hold the same experts: they form the j-th replica group
(ranks j, j + E, j + 2E, ...).

Gradient reduction after the backward (no DDP), with each process's loss the mean over its own tokens:
- replicated parameters (all but the experts): summed over all N processes, divided by N (DDP's mean);
- expert slices: the holder's gradient already sums what every token of its expert-parallel group sent
  it, so they are summed over the replica group only (nothing when E == N), and divided by N as well.
Both then equal the gradient of one process over the global batch, the mean of the N per-process losses.
The gradient norm counts every expert slice once: its squares are summed over the expert-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from .expert import ExpertParallelMoE, expert_parallel, local, moe_layers
from .peer import ShardedPEER, peer_layers, peer_sharded


class ExpertSharding:
    """The MoE and PEER layers of `model` sharded over expert-parallel groups of `ep` consecutive ranks of the
    `world` processes (torch.distributed initialised). Wraps the layers in place."""

    def __init__(self, model: nn.Module, ep: int, rank: int, world: int) -> None:
        check_expert_parallel(model, ep, world)
        self.ep, self.world = ep, world
        # every process creates every group, in the same order (dist.new_group's contract)
        ep_groups = [dist.new_group(list(range(g * ep, (g + 1) * ep))) for g in range(world // ep)]
        replica_groups = [dist.new_group(list(range(j, world, ep))) for j in range(ep)] if world > ep else None
        self.ep_group = ep_groups[rank // ep]
        self.replica_group = replica_groups[rank % ep] if replica_groups else None
        self.layers: dict[str, ExpertParallelMoE | ShardedPEER] = {}
        wrappers = [(name, layer, expert_parallel) for name, layer in moe_layers(model)]
        wrappers += [(name, layer, peer_sharded) for name, layer in peer_layers(model)]
        for name, layer, wrap in wrappers:
            parent_name, _, child = name.rpartition(".")
            wrapped = wrap(layer, self.ep_group)
            setattr(model.get_submodule(parent_name), child, wrapped)
            self.layers[name] = wrapped
        self._collect_expert_params()
        experts = {id(p) for p in self.expert_params}
        self.replicated_params = [p for p in model.parameters() if id(p) not in experts]

    def inner_layers(self) -> set[int]:
        """The ids of the wrapped MoE layers: their wrappers, not they, take the optimizer-step hook."""
        return {id(layer.wrapped) for layer in self.layers.values()}

    def is_expert(self, p: torch.Tensor) -> bool:
        return any(p is q for q in self.expert_params)

    def distribute(self, mesh) -> None:
        """The expert slices as DTensors on the 2-D mesh (replica, ep) of shape (world / ep, ep), whose rows are
        the expert-parallel groups and columns the replica groups: Replicate over replicas, sharded over the
        group along the dimension they were cut (parallel/fsdp.py; MoE layers only: --fsdp refuses PEER)."""
        from torch.distributed.tensor import Replicate, Shard

        for layer in self.layers.values():
            layer.distribute(mesh, [Replicate(), Shard(layer.shard_dim)])
        self._collect_expert_params()  # new Parameter objects

    def _collect_expert_params(self) -> None:
        """The sharded parameters, and the dimension each was cut along: experts (MoE, 0) or columns (PEER's
        tables, 1), by id, so rebuilt whenever the parameters are replaced."""
        self.expert_params = [p for layer in self.layers.values() for p in layer.expert_parameters()]
        self.shard_dims = {id(p): layer.shard_dim for layer in self.layers.values() for p in layer.expert_parameters()}

    def canonical(self, name: str) -> str:
        """A parameter's or state-dict key's name in the unwrapped model (the wrapper's `.moe` or `.peer`
        taken out)."""
        for layer_name, layer in self.layers.items():
            inner = _inner_name(layer)
            if name.startswith(f"{layer_name}.{inner}."):
                return f"{layer_name}.{name[len(layer_name) + len(inner) + 2:]}"
        return name

    # -- gradients -------------------------------------------------------------------------------
    def reduce_gradients(self, replicated: bool = True) -> None:
        """After the last backward of a step: each gradient the mean over processes of the global batch.
        replicated=False: FSDP has reduced the other parameters' gradients; only the experts' are left."""
        if replicated:
            _all_reduce_mean(self.replicated_params, None, self.world, reduce=True)
        _all_reduce_mean(self.expert_params, self.replica_group, self.world, reduce=self.replica_group is not None)

    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The 2-norm of the gradients of `params` (reduced) as one process holding every expert sees it."""
        experts = {id(p) for p in self.expert_params}
        return grad_norm_by_kind(params, lambda p: int(id(p) in experts), [REPLICATED, self.ep_group])

    # -- checkpoints: the single-device format ----------------------------------------------------
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict as the unwrapped model has it, expert slices gathered (a collective)."""
        state = model.state_dict()
        for name, layer in self.layers.items():
            inner = f"{name}.{_inner_name(layer)}."
            slices = {id(p) for p in layer.expert_parameters()}
            for key, p in layer.wrapped.named_parameters():
                if id(p) in slices:
                    state[inner + key] = self._gather(p.detach(), self.shard_dims[id(p)])
        return {self.canonical(k): v for k, v in state.items()}

    def full_optimizer_state(self, opt: torch.optim.Optimizer, state: dict) -> dict:
        """`state` (opt.state_dict()) with the expert parameters' moments gathered to full size (a collective)."""
        return self._map_moments(opt, state, self._gather)

    def shard_optimizer_state(self, opt: torch.optim.Optimizer, state: dict) -> dict:
        """A full-size optimizer state (a single-device checkpoint's) cut to this process's expert slices."""
        # not sharded_checkpoint.shard_optimizer_state: without FSDP the slices are plain tensors, narrowed by hand
        return self._map_moments(opt, state, self._slice)

    def _map_moments(self, opt, state: dict, fn) -> dict:
        params = [p for g in opt.param_groups for p in g["params"]]
        dims = {i: self.shard_dims[id(p)] for i, p in enumerate(params) if self.is_expert(p)}
        new = {}
        for i, s in state["state"].items():
            if int(i) in dims:
                s = {k: fn(v, dims[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
            new[i] = s
        return state | {"state": new}

    def _gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.ep)]
        dist.all_gather(parts, t.contiguous(), group=self.ep_group)
        return torch.cat(parts, dim)

    def _slice(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        n = t.shape[dim] // self.ep
        j = dist.get_rank(self.ep_group)
        return t.narrow(dim, j * n, n).contiguous().clone()


def _inner_name(wrapper: nn.Module) -> str:
    """The attribute a wrapper holds its layer under (`moe`, `peer`): the part of its keys the unwrapped
    model lacks."""
    return next(n for n, m in wrapper.named_children() if m is wrapper.wrapped)


REPLICATED = "replicated"  # a kind of gradient every process holds whole: its squares are taken as they are


def grad_norm_by_kind(params: list[torch.Tensor], kind_of, groups: list) -> torch.Tensor:
    """The 2-norm of the gradients of `params` as one process holding the whole model would see it. Each
    parameter is of a kind, kind_of(p) an index into `groups`: REPLICATED, or the process group (None: every
    process) whose members hold disjoint parts of it, over which its squares are summed. Every process reduces
    every kind, in order, whether it holds any of it (a collective that some skip would hang)."""
    sq = torch.zeros(len(groups), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            g = local(p.grad.detach())
            g = g.coalesce()._values() if g.is_sparse else g  # PEER's row-sparse table gradients
            sq[kind_of(p)] += g.double().pow(2).sum().cpu()
    for i, group in enumerate(groups):
        if group is not REPLICATED:
            part = sq[i:i + 1].clone()
            dist.all_reduce(part, group=group)
            sq[i] = part[0]
    return sq.sum().sqrt()


def check_expert_parallel(model: nn.Module, ep: int, world: int, cuda: bool = False) -> None:
    """Refuse an expert-parallel size that cannot shard this model over these processes (on CUDA devices
    when `cuda`: NCCL has no sparse all-reduce)."""
    if ep < 1:
        raise UsageError(f"--expert-parallel must be a positive integer, got {ep}")
    if ep > 1 and world == 1:
        raise UsageError(f"--expert-parallel {ep} needs {ep} processes or a multiple: run under torchrun "
                         f"(python -m torch.distributed.run --nproc_per_node={ep} -m mixturelm train ...)")
    if world % ep:
        raise UsageError(f"--expert-parallel {ep} does not divide the {world} processes; choose a divisor of "
                         f"{world}")
    layers, peers = [m for _, m in moe_layers(model)], [m for _, m in peer_layers(model)]
    if not layers and not peers:
        raise UsageError("--expert-parallel needs a model with MoE or PEER layers; choose a moe, mode or peer preset")
    bad = next((m.n_experts for m in layers if m.n_experts % ep), None)
    if bad is not None:
        raise UsageError(f"--expert-parallel {ep} does not divide n_experts={bad}; choose a divisor of {bad}")
    bad = next((m.d_model for m in peers if m.d_model % ep), None)
    if bad is not None:  # PEER's tables are cut by columns
        raise UsageError(f"--expert-parallel {ep} does not divide a PEER layer's d_model={bad}; choose a divisor "
                         f"of {bad}")
    if cuda and world > ep and any(m.sparse_grad for m in peers):  # replica groups sum row-sparse gradients
        raise UsageError(f"PEER's row-sparse table gradients cannot be summed over the {world // ep} copies of each "
                         f"share on CUDA (NCCL has no sparse all-reduce); use --expert-parallel {world}, so that "
                         "every process holds its own share")


def _all_reduce_mean(params: list[torch.Tensor], group, world: int, reduce: bool) -> None:
    """Sum the gradients over `group` (None: every process) if `reduce` (not for the replica group of one
    when E == N), then divide by `world`, in one flat buffer. A missing gradient counts as zeros. Row-sparse
    gradients (PEER's tables) stay sparse: reduced one by one (the rows of the union), not in the buffer."""
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    for p in sparse:
        g = p.grad.coalesce()
        if reduce:
            dist.all_reduce(g, group=group)  # gloo returns the rows of every process: coalesced again below
        p.grad = (g / world).coalesce()
    params = [p for p in params if not any(p is q for q in sparse)]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [local(p.grad) for p in params]  # a DTensor's (expert slices under --fsdp) local tensor
    flat = torch.cat([g.reshape(-1) for g in grads])
    if reduce:
        dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
