"""PEER's expert tables sharded by columns over 2 CPU processes (gloo; 4 in the slow test), in float64: each
process feeds its own tokens to the wrapper holding its d_model / P columns of each table; outputs, the
gradients of x and of every parameter equal the single-process layer run on the same tokens, one call per
process's tokens (table gradients: this process's columns of the single-process gradient summed over every
process's tokens; query, norm and sub-key gradients summed over processes, as data parallelism would)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import gloo_worker
from mixturelm.errors import UsageError
from mixturelm.layers import kernels
from mixturelm.layers.peer import PEER
from mixturelm.parallel import peer_sharded
from mixturelm.parallel.peer import traffic_per_step

D = 8
CASES = {
    "default": dict(n_experts=36, n_heads=2, top_k=3, d_key=8),  # query BatchNorm, gelu, dense table gradients
    "sparse_grad": dict(n_experts=36, n_heads=2, top_k=3, d_key=8, sparse_grad=True),
    "glu_per_head_keys_layer_norm": dict(n_experts=25, n_heads=3, top_k=2, d_key=6, glu=True,
                                         per_head_keys=True, query_norm="layer", activation="silu",
                                         sparse_grad=True),
    # process r has 3 + 4r tokens in one sequence: the exchanges' splits differ by process
    "uneven_tokens": dict(n_experts=36, n_heads=2, top_k=3, d_key=8, uneven=True),
    # PyTorch ops instead of the compiled CPU kernels (CUDA's path)
    "sparse_grad_torch_ops": dict(n_experts=36, n_heads=2, top_k=3, d_key=8, sparse_grad=True, torch_ops=True),
}


def _tokens(rank: int, uneven: bool) -> torch.Tensor:
    shape = (1, 3 + 4 * rank, D) if uneven else (2, 5, D)
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))


def _loss(layer, x, rank):
    y, aux = layer(x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(200 + rank))
    return (y * g).sum(), y, aux


class _BytesSent:
    """Counts the bytes this process sends to the others through all_to_all_single (every exchange of the
    wrapper goes through it)."""

    def __enter__(self):
        self.sent, self.original = 0, dist.all_to_all_single

        def counting(out, x, out_splits=None, in_splits=None, group=None, **kw):
            row = x[0].numel() * x.element_size() if len(x) else 0
            splits = in_splits or [len(x) // dist.get_world_size(group)] * dist.get_world_size(group)
            self.sent += row * (sum(splits) - splits[dist.get_rank(group)])
            return self.original(out, x, out_splits, in_splits, group=group, **kw)
        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.original


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


def _check_case(name: str, group) -> None:
    options = dict(CASES[name])
    if not options.pop("torch_ops", False):
        _check_options(options, group)
        return
    library = kernels.library
    kernels.library = lambda: None
    try:
        _check_options(options, group)
    finally:
        kernels.library = library


def _check_options(options: dict, group) -> None:
    uneven = options.pop("uneven", False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = PEER(D, **options).double().train()
    sharded = peer_sharded(copy.deepcopy(reference), group)
    # single process: the whole layer on each process's tokens, one call each, gradients summed
    xs = [_tokens(r, uneven).requires_grad_() for r in range(world)]
    ref_out = [_loss(reference, x, r) for r, x in enumerate(xs)]
    sum(out[0] for out in ref_out).backward()
    # sharded: this process's tokens only
    x = _tokens(rank, uneven).requires_grad_()
    with _BytesSent() as traffic:
        loss, y, aux = _loss(sharded, x, rank)
        loss.backward()
    if not uneven:  # what docs/parallel.md counts
        J = reference.n_heads * reference.top_k
        assert traffic.sent == traffic_per_step(x[..., 0].numel(), D, J, world, 8, 8, reference.glu)["columns"]
    torch.testing.assert_close(y, ref_out[rank][1])
    torch.testing.assert_close(x.grad, xs[rank].grad)
    assert torch.equal(aux.ids_TJ, ref_out[rank][2].ids_TJ)
    torch.testing.assert_close(aux.scores_TJ, ref_out[rank][2].scores_TJ)
    C = D // world
    cols = slice(rank * C, (rank + 1) * C)
    ref_params = dict(reference.named_parameters())
    tables = {id(p) for p in sharded.expert_parameters()}
    assert len(tables) == (3 if options.get("glu") else 2)
    for pname, p in sharded.peer.named_parameters():
        if id(p) in tables:  # this process's columns, already summed over every process's tokens
            assert p.shape == (reference.n_experts, C) and p.grad.is_sparse == options.get("sparse_grad", False)
            torch.testing.assert_close(_dense(p.grad), _dense(ref_params[pname].grad)[:, cols], msg=pname)
        else:  # replicated: summed over processes, as data parallelism does
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)
            torch.testing.assert_close(grad, ref_params[pname].grad, msg=pname)
    # evaluation, no gradients: the same outputs (the query norm's running statistics taken from the reference,
    # whose calls saw every process's tokens)
    sharded.peer.query_norm.load_state_dict(reference.query_norm.state_dict())
    reference.eval(), sharded.eval()
    with torch.no_grad():
        torch.testing.assert_close(sharded(xs[rank].detach())[0], reference(xs[rank].detach())[0])


def _indivisible(group) -> None:
    peer_sharded(PEER(D + 1, n_experts=16, n_heads=1, top_k=2, d_key=4), group)


def _worker(rank: int, world: int, tmp: str, cases: list[str]) -> None:
    gloo_worker(rank, world, tmp, cases, _check_case, _indivisible)


def _spawn(tmp, world: int, cases: list[str]) -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp), cases), nprocs=world, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("peer2"), 2, list(CASES))


@pytest.mark.parametrize("case", [*CASES, "indivisible"])
def test_two_processes_match_one(two_processes, case):
    for rank, results in enumerate(two_processes):
        assert results[case] == "", f"process {rank}:\n{results[case]}"


@pytest.mark.slow
def test_four_processes_match_one(tmp_path):
    for rank, results in enumerate(_spawn(tmp_path, 4, ["sparse_grad", "uneven_tokens"])):
        for case, error in results.items():
            assert error == "", f"process {rank}, {case}:\n{error}"


def test_refuses_other_layers():
    with pytest.raises(UsageError, match="takes a mixturelm.layers.PEER"):
        peer_sharded(torch.nn.Linear(4, 4))
