"""Expert parallelism over 2 CPU processes (gloo), in float64: each process feeds its own tokens to the layer
with its half of the experts; outputs, the gradients of x and of every parameter equal the single-process
layer run on the same tokens (its expert gradients summed over both processes' tokens, its router and shared
gradients summed over processes as data parallelism would)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import gloo_worker
from mixturelm.layers.moe import MoE
from mixturelm.parallel import expert_parallel

D, B, T = 8, 2, 5
CASES = {
    "softmax": dict(n_experts=4, top_k=2, d_expert=12),
    "softmax_fine_grained": dict(n_experts=8, top_k=3, d_expert=4, renormalize=False),  # F < D, 4 per process
    "sigmoid_bias_shared": dict(n_experts=4, top_k=2, d_expert=6, router="sigmoid_bias", route_scale=2.5,
                                n_shared=1, shared_gate=True),
    "capacity": dict(n_experts=4, top_k=2, d_expert=6, capacity_factor=1.0),
    "noop_experts": dict(n_experts=4, top_k=2, d_expert=6, n_noop=2),  # their choices never leave the process
    "expert_choice": dict(n_experts=4, top_k=1, d_expert=6, router="expert_choice"),
    # every token of both processes goes to process 0's experts: process 1 receives no rows
    "one_process_receives_nothing": dict(n_experts=4, top_k=2, d_expert=6, steer=(1.0, 1.0)),
    # each process's tokens all go to the other process's experts
    "crossed": dict(n_experts=4, top_k=2, d_expert=6, steer=(-1.0, 1.0)),
}


def _tokens(rank: int, steer) -> torch.Tensor:
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))
    if steer:  # feature 0 decides between experts 0, 1 (process 0) and 2, 3 (process 1)
        x[..., 0] = 5.0 * steer[rank]
    return x


def _layer(options: dict, steer) -> MoE:
    torch.manual_seed(0)
    moe = MoE(D, **options).double().train()
    with torch.no_grad():
        moe.router.gate.weight.mul_(20.0)  # routing far from ties, so both sides choose alike
        if steer:
            moe.router.gate.weight[:, 0] = torch.tensor([10.0, 10.0, -10.0, -10.0], dtype=torch.float64)
    return moe


def _loss(moe_or_ep, x, rank):
    y, aux = moe_or_ep(x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(200 + rank))
    return (y * g).sum() + 0.1 * sum(aux.losses.values()), y, aux


def _check_case(name: str, group) -> None:
    options = dict(CASES[name])
    steer = options.pop("steer", None)
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = _layer(options, steer)
    ep = expert_parallel(copy.deepcopy(reference), group)
    # single process: the whole layer on each process's tokens, one call each, gradients summed
    xs = [_tokens(r, steer).requires_grad_() for r in range(world)]
    ref_out = [_loss(reference, x, r) for r, x in enumerate(xs)]
    sum(out[0] for out in ref_out).backward()
    # expert parallel: this process's tokens only
    x = _tokens(rank, steer).requires_grad_()
    loss, y, aux = _loss(ep, x, rank)
    loss.backward()
    torch.testing.assert_close(y, ref_out[rank][1])
    torch.testing.assert_close(x.grad, xs[rank].grad)
    assert aux.losses.keys() == ref_out[rank][2].losses.keys()
    for key, value in aux.losses.items():
        torch.testing.assert_close(value, ref_out[rank][2].losses[key])
    torch.testing.assert_close(aux.tokens_per_expert, ref_out[rank][2].tokens_per_expert)
    local = slice(rank * ep.n_local, (rank + 1) * ep.n_local)
    ref_params = dict(reference.named_parameters())
    for pname, p in ep.moe.named_parameters():
        if any(p is q for q in ep.expert_parameters()):  # this process's slice, already summed over both processes' tokens
            torch.testing.assert_close(p.grad, ref_params[pname].grad[local], msg=pname)
        else:  # replicated: summed over processes, as data parallelism does
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)
            torch.testing.assert_close(grad, ref_params[pname].grad, msg=pname)
    if steer == (1.0, 1.0):
        assert ep.moe.w_gate_up.grad.abs().sum() == 0 if rank == 1 else ep.moe.w_gate_up.grad.abs().sum() > 0
    if options.get("router") == "sigmoid_bias":  # the bias moves by the load summed over both processes
        reference.after_optimizer_step()
        ep.after_optimizer_step()
        assert reference.router.bias_E.abs().sum() > 0
        torch.testing.assert_close(ep.moe.router.bias_E, reference.router.bias_E)


def _indivisible(group) -> None:
    expert_parallel(MoE(D, n_experts=3, top_k=2, d_expert=4), group)


def _worker(rank: int, world: int, tmp: str) -> None:
    gloo_worker(rank, world, tmp, CASES, _check_case, _indivisible)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", [*CASES, "indivisible"])
def test_two_processes_match_one(two_processes, case):
    for rank, results in enumerate(two_processes):
        assert results[case] == "", f"process {rank}:\n{results[case]}"
