"""What torch 2.13's FSDP2 and distributed checkpoints do with mixturelm's models on CPU (gloo).

    torchrun --standalone --nproc_per_node=2 benchmarks/parallel/fsdp2_probe.py PRESET DIR   # shard, step, save
    python benchmarks/parallel/fsdp2_probe.py PRESET DIR --load                                # one process loads

The first shards every block and the model with `fully_shard`, runs forward and backward in float64 on a
different batch per rank, compares every parameter's gradient (gathered) with one process that averages the
same batches' losses, and saves the sharded weights with `torch.distributed.checkpoint`. The second loads that
checkpoint into an unsharded model in one process and checks it equals the weights that were saved.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mixturelm.config import ModelConfig
from mixturelm.model import MixtureLM
from mixturelm.presets import get_preset


def build(preset: str) -> MixtureLM:
    torch.manual_seed(0)
    return MixtureLM(ModelConfig(**get_preset(preset).model)).double()


def batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(100 + rank))


def loss_of(model: MixtureLM, x: torch.Tensor) -> torch.Tensor:
    out = model(x, targets_BT=x)
    return out.loss + (out.aux_loss if out.aux_loss is not None else 0)


def shard_and_save(preset: str, folder: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, ref = build(preset), build(preset)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    loss_of(model, batch(rank)).backward()
    for r in range(world):
        (loss_of(ref, batch(r)) / world).backward()
    worst = max((p.grad.full_tensor() - q.grad).abs().max().item()
                for p, q in zip(model.parameters(), ref.parameters()))
    print(f"{preset}, rank {rank} of {world}: FSDP2 gradients against one process, max abs difference {worst:.1e}")
    dcp.save(get_model_state_dict(model), checkpoint_id=folder)
    dist.barrier()
    if rank == 0:
        print(f"{preset}: saved with torch.distributed.checkpoint from {world} ranks to {folder}")
    dist.destroy_process_group()


def load_in_one_process(preset: str, folder: str) -> None:
    model = build(preset)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), build(preset).state_dict().values()))
    print(f"{preset}: one process loaded the sharded checkpoint; equal to the weights saved: {same}")


if __name__ == "__main__":
    preset, folder = sys.argv[1], sys.argv[2]
    (load_in_one_process if "--load" in sys.argv else shard_and_save)(preset, folder)
