"""mixturelm.optim: the row-wise Adam against torch.optim.SparseAdam and a hand computation, build_optimizer's
groups and its use in a plain loop, clipping of sparse gradients, bad hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch

from mixturelm import MixtureLM, ModelConfig, UsageError
from mixturelm.layers import kernels
from mixturelm.layers.peer import PEER, PEERConfig
from mixturelm.optim import AdamRows, build_optimizer, clip_grad_norm
from mixturelm.presets import get_preset


def sparse_rows(n_rows: int, d: int, rows: list[int], gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    idx = torch.tensor(sorted(rows))
    return torch.sparse_coo_tensor(idx[None], torch.randn(len(rows), d, generator=gen, dtype=dtype), (n_rows, d),
                                   check_invariants=True)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch-ops"])
def test_row_adam_is_sparse_adam(kernel, monkeypatch):
    if kernel and kernels.library() is None:
        pytest.skip("no C compiler")
    if not kernel:
        monkeypatch.setattr(kernels, "usable", lambda *t: False)
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    ours, ref = torch.nn.Parameter(table.clone()), torch.nn.Parameter(table.clone())
    opt = AdamRows([{"params": [ours], "row_sparse": True}], lr=0.01, betas=(0.9, 0.95))
    ref_opt = torch.optim.SparseAdam([ref], lr=0.01, betas=(0.9, 0.95))
    for step in range(6):
        rows = torch.randperm(40, generator=gen)[: 5 + step].tolist()
        grad = sparse_rows(40, 6, rows, gen)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-13)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[ours][key], ref_opt.state[ref][key], rtol=0, atol=1e-13)


def test_row_adam_by_hand_with_decay():
    """Two steps on row 1 of three, then one on row 2: untouched rows keep weights and moments (lazy)."""
    p = torch.nn.Parameter(torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64))
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.5
    opt = AdamRows([{"params": [p], "row_sparse": True, "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps)
    w, m, v = 2.0, 0.0, 0.0
    for step, g in ((1, 0.5), (2, -1.0)):
        p.grad = torch.sparse_coo_tensor([[1]], torch.tensor([[g]], dtype=torch.float64), (3, 1),
                                 check_invariants=True)
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * wd) - lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step) * m / (math.sqrt(v) + eps)
        assert p[1].item() == pytest.approx(w, abs=1e-14)
    assert p[0].item() == 1.0 and p[2].item() == 3.0
    p.grad = torch.sparse_coo_tensor([[2]], torch.tensor([[1.0]], dtype=torch.float64), (3, 1),
                                 check_invariants=True)
    opt.step()  # the step count is the table's (3), as SparseAdam's
    want = 3.0 * (1 - lr * wd) - lr * math.sqrt(1 - b2 ** 3) / (1 - b1 ** 3) * (1 - b1) / (math.sqrt(1 - b2) + eps)
    assert p[2].item() == pytest.approx(want, abs=1e-14)
    assert p[1].item() == pytest.approx(w, abs=1e-14) and opt.state[p]["exp_avg"][0, 0].item() == 0.0


def peer_model() -> MixtureLM:
    torch.manual_seed(0)
    return MixtureLM(ModelConfig(**get_preset("peer-debug").model))


def test_build_optimizer_groups_and_a_plain_training_loop():
    model = peer_model()
    for m in model.modules():
        if isinstance(m, PEER):
            m.sparse_grad = False  # as a user builds it: dense table gradients
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, mechanisms={"peer": {"lr": 0.01}})
    peer = next(m for m in model.modules() if isinstance(m, PEER))
    assert peer.sparse_grad  # switched to row-sparse gradients
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    rows = by_param[id(peer.w_down)]
    assert rows["row_sparse"] and rows["lr"] == 0.01 and rows["fixed_lr"] and rows["weight_decay"] == 0
    assert by_param[id(model.embed.weight)]["weight_decay"] == 0
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert by_param[id(p)]["weight_decay"] == 0, name
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [(lambda s: 1.0) if g.get("fixed_lr") else (lambda s: 0.5 ** s)
                                                    for g in opt.param_groups])
    x = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(1))
    before = peer.w_down.detach().clone()
    losses = []
    for _ in range(8):
        loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        assert peer.w_down.grad.is_sparse
        clip_grad_norm(model, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = (peer.w_down.detach() != before).any(1)
    assert 0 < moved.sum() < peer.w_down.shape[0]  # only the rows retrieved moved
    again = build_optimizer(peer_model(), lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]
    saved, loaded = opt.state_dict()["state"], again.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        torch.testing.assert_close(loaded[i]["exp_avg"], saved[i]["exp_avg"], rtol=0, atol=0)


def test_clip_grad_norm_of_sparse_gradients_equals_dense():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.nn.Parameter(torch.zeros(10, 3)), torch.nn.Parameter(torch.zeros(4))
    g = sparse_rows(10, 3, [1, 4, 7], gen, torch.float32)
    a.grad, b.grad = g.clone(), torch.randn(4, generator=gen)
    dense_a, dense_b = g.to_dense(), b.grad.clone()
    want = torch.linalg.vector_norm(torch.cat([dense_a.flatten(), dense_b]))
    total = clip_grad_norm([a, b], 0.5)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(a.grad.to_dense(), dense_a * 0.5 / (want + 1e-6))
    torch.testing.assert_close(b.grad, dense_b * 0.5 / (want + 1e-6))


@pytest.mark.parametrize("bad, needle", [({"lr": -1.0}, "lr must be"), ({"weight_decay": float("nan")}, "weight_decay"),
                                         ({"betas": (0.9, 1.0)}, "betas"), ({"eps": 0.0}, "eps")])
def test_bad_hyperparameters(bad, needle):
    layer = torch.nn.Sequential(PEER(16, PEERConfig(n_experts=64, n_heads=2, top_k=4, d_key=8)))
    with pytest.raises(UsageError, match=needle):
        build_optimizer(layer, **bad)


def test_a_group_added_later_is_stepped():
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3, 2))
    opt = AdamRows([{"params": [a]}], lr=0.1)
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = torch.ones(3, 2), torch.ones(3, 2)
    opt.step()
    assert (a < 1).all() and (b < 1).all()
    rows_only = AdamRows([{"params": [torch.nn.Parameter(torch.ones(4, 2))], "row_sparse": True}], lr=0.1)
    c = torch.nn.Parameter(torch.ones(2))
    rows_only.add_param_group({"params": [c]})  # the first dense group: the fused AdamW is made now
    c.grad = torch.ones(2)
    rows_only.step()
    assert (c < 1).all()
