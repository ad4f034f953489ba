"""One process of `mixturelm bench parallel`, launched by torchrun (`python -m torch.distributed.run
--standalone --nproc_per_node=P -m mixturelm.bench.parallel_worker CONFIG.json DIR`): training steps of a
stack of MoE layers, its experts sharded over the P processes (P = 1: the plain single-device layers), timed,
with the exchanges recorded and peak memory; it writes DIR/rank{r}.json.

A separate module from bench/parallel.py so that `-m` does not run a module the package has imported.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..layers.moe import MoE
from ..parallel.expert import record_exchanges
from ..parallel.expert_training import ExpertSharding
from .timing import peak_rss_bytes, reset_peak_rss, rss_bytes


class MoEStack(nn.Module):
    """`layers` pre-norm residual MoE layers (x + MoE(norm(x))): the expert computation and the exchanges
    without attention, so the exchange's share of the step is not diluted by work it does not touch."""

    def __init__(self, d_model: int, layers: int, **moe_options) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(layers))
        self.layers = nn.ModuleList(MoE(d_model, **moe_options) for _ in range(layers))

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aux_loss = x_BTD.new_zeros(())
        for norm, moe in zip(self.norms, self.layers):
            y_BTD, aux = moe(norm(x_BTD))
            x_BTD = x_BTD + y_BTD
            aux_loss = aux_loss + sum(aux.losses.values())
        return x_BTD, aux_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(config_path: str, out_dir: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(cfg["threads"])
    if world > 1:  # a hang (a process that died) fails the run instead of waiting forever
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)  # every process builds the same model, then keeps its share of the experts
    model = MoEStack(cfg["d_model"], cfg["layers"], n_experts=cfg["n_experts"], top_k=cfg["top_k"],
                     d_expert=cfg["d_expert"]).to(device)
    sharding = ExpertSharding(model, world, rank, world) if world > 1 else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1000 + rank)  # each process its own tokens
    x_BTD = torch.randn(1, cfg["tokens"], cfg["d_model"], generator=gen).to(device)
    target_BTD = torch.randn(1, cfg["tokens"], cfg["d_model"], generator=gen).to(device)
    reduce_s = [0.0]

    def step() -> None:
        y_BTD, aux_loss = model(x_BTD)
        (nn.functional.mse_loss(y_BTD, target_BTD) + 0.01 * aux_loss).backward()
        if sharding is not None:  # what the trainer does: replicated gradients averaged over every process
            _sync(device)
            t0 = time.perf_counter()
            sharding.reduce_gradients()
            _sync(device)
            reduce_s[0] += time.perf_counter() - t0
        opt.step()
        opt.zero_grad(set_to_none=True)

    # memory: the growth over the built model (gradients, optimizer moments, activations, buffers)
    _sync(device)
    model_rss = rss_bytes()
    try:
        reset_peak_rss()
    except OSError:  # no clear_refs (not Linux, or not allowed): the peak since the process started
        pass
    if cuda:
        model_cuda = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(cfg["warmup"]):
        step()
    if world > 1:
        dist.barrier()  # the timed steps start together
    reduce_s[0] = 0.0
    with record_exchanges() as stats:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        _sync(device)
        seconds = time.perf_counter() - t0
    result = {"rank": rank, "world": world, "steps": cfg["steps"], "step_s": seconds / cfg["steps"],
              "grad_reduce_s": reduce_s[0] / cfg["steps"],
              "exchanges": {kind: vars(t) for kind, t in stats.kinds.items()},  # totals over the timed steps
              "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
              "rss_after_build_bytes": model_rss, "peak_rss_bytes": peak_rss_bytes()}
    result["peak_rss_growth_bytes"] = result["peak_rss_bytes"] - model_rss
    if cuda:
        result["cuda_after_build_bytes"] = model_cuda
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["cuda_peak_growth_bytes"] = result["cuda_peak_bytes"] - model_cuda
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
