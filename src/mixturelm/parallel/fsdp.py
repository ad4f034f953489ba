"""Sharded data parallelism in training: FSDP2 (`fully_shard`) over every process for the parameters that are
not expert slices, composed with expert parallelism, and the gradient norm of a model held in pieces.

Over N processes, each block and then the model are `fully_shard`-ed on a 1-D mesh of all N: every
non-expert parameter (and its gradient and Adam moments) becomes a DTensor sharded on dim 0, each process
holding 1/N of it; FSDP gathers a block's parameters for its forward and backward and reduce-scatters its
gradients, averaged over the N processes (DDP's mean).

With `--expert-parallel E`, the expert slices of `ExpertSharding` are left out of FSDP (`ignored_params`):
they become DTensors on a 2-D mesh (replica, ep) of shape (N / E, E), Replicate on the first dimension and
Shard(0) on the second, whose local tensor is the slice expert parallelism already keeps. Their gradients
are still reduced by hand over the replica group (ExpertSharding.reduce_gradients); as DTensors they share
the optimizer (one fused AdamW over DTensors: a mixture of DTensors and plain tensors is refused by
`aten._fused_adamw_`) and they reach distributed checkpoints sharded, without a gather.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import UsageError
from .expert_training import REPLICATED, ExpertSharding, grad_norm_by_kind
from .peer import peer_layers


def check_fsdp(model: nn.Module, world: int) -> None:
    """Refuse what `--fsdp` cannot train: one process, and PEER layers (their tables take row-sparse
    gradients; with dense ones, expert parallelism's column shards would still need FSDP2 around them, not
    built). With --compile it runs (tests/test_fsdp_train.py)."""
    if world == 1:
        raise UsageError("--fsdp shards the model over processes: run under torchrun "
                         "(python -m torch.distributed.run --nproc_per_node=N -m mixturelm train ... --fsdp)")
    if peer_layers(model):
        raise UsageError("--fsdp cannot shard PEER's expert tables: their row-sparse gradients have no "
                         "reduce-scatter in FSDP2; train PEER presets without --fsdp (DDP or --expert-parallel)")


class FullyShardedModel:
    """`model` (its MoE layers already wrapped by `sharding`, if any) sharded in place: blocks, then the root."""

    def __init__(self, model: nn.Module, world: int, sharding: ExpertSharding | None = None) -> None:
        self.model, self.sharding = model, sharding
        self.mesh: DeviceMesh = init_device_mesh("cpu" if _on_cpu(model) else "cuda", (world,))
        self.expert_mesh: DeviceMesh | None = None
        ignored: set[nn.Parameter] = set()
        if sharding is not None:
            self.expert_mesh = init_device_mesh(self.mesh.device_type, (world // sharding.ep, sharding.ep),
                                                mesh_dim_names=("replica", "ep"))
            sharding.distribute(self.expert_mesh)
            ignored = set(sharding.expert_params)
        for block in model.blocks:  # one all-gather and one reduce-scatter per block, overlapping the next
            fully_shard(block, mesh=self.mesh, ignored_params=ignored)
        fully_shard(model, mesh=self.mesh, ignored_params=ignored)

    def set_gradient_sync(self, sync: bool) -> None:
        """False for an accumulation micro-step but the last: FSDP keeps the unsharded gradients and
        reduce-scatters once per optimizer step."""
        self.model.set_requires_gradient_sync(sync)

    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The 2-norm of the (reduced) gradients of `params` as one process holding the whole model sees
        it: squares of FSDP shards summed over every process, of expert slices over their expert-parallel
        group (each expert once), of anything else (replicated) taken as they are."""
        experts = {id(p) for p in self.sharding.expert_params} if self.sharding is not None else set()
        expert_group = self.sharding.ep_group if self.sharding is not None else REPLICATED
        return grad_norm_by_kind(params, lambda p: 2 if id(p) in experts else int(isinstance(p.grad, DTensor)),
                                 [REPLICATED, None, expert_group])


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut as `like` (a parameter, DTensor or not) is; every process holds `full`, so each keeps its
    own piece without communication (src_data_rank=None)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def _on_cpu(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"
