"""PEER against slow references written here, in float64: retrieval against brute-force top-k over all
N concatenated product keys; outputs and gradients (input, query network, sub-keys, expert tables)
against a token-by-token loop; the GLU, per-head-key, query-norm and beside-the-FFN variants; usage
statistics; config errors; training, evaluation and resume of a peer-debug run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mixturelm import MixtureLM, ModelConfig
from mixturelm.config import BlockSpec, TrainConfig
from mixturelm.layers.peer import PEERAux, PEERConfig
from mixturelm.mechanisms import get as mechanism
from mixturelm.presets import PRESETS
from mixturelm.errors import UsageError
from mixturelm.layers.peer import PEER, bag_sum, gather_dot, product_key_topk, usage_from_scores

from conftest import assert_train_refuses, run_cli, tree_digest

D = 12


def brute_force_topk(q_THQ: torch.Tensor, keys_2LSP: torch.Tensor, k: int) -> torch.Tensor:
    """Each head's top-k over all S*S concatenated keys [c_a; c'_b], id a*S + b: (T, H, K), best first."""
    T, H, Q = q_THQ.shape
    S = keys_2LSP.shape[2]
    out = []
    for h in range(H):
        c1, c2 = keys_2LSP[0, h % keys_2LSP.shape[1]], keys_2LSP[1, h % keys_2LSP.shape[1]]
        full_NQ = torch.cat([c1[:, None, :].expand(S, S, -1), c2[None, :, :].expand(S, S, -1)], -1).reshape(S * S, Q)
        out.append((q_THQ[:, h] @ full_NQ.t()).topk(k, dim=-1).indices)
    return torch.stack(out, 1)


@pytest.mark.parametrize("per_head, dtype, S, K", [(False, torch.float64, 9, 5), (True, torch.float64, 9, 5),
                                                   (False, torch.float32, 40, 16), (True, torch.float32, 40, 16)])
def test_retrieval_equals_brute_force_topk(per_head, dtype, S, K, kernel_path):
    torch.manual_seed(0)
    T, H, Q = 300, 3, 8
    keys = torch.randn(2, H if per_head else 1, S, Q // 2, dtype=dtype)
    q = torch.randn(T, H, Q, dtype=dtype)
    a, b = product_key_topk(q, keys, K)
    assert torch.equal(a * S + b, brute_force_topk(q, keys, K))


def test_every_expert_id_in_range_and_reachable(kernel_path):
    torch.manual_seed(1)
    m = PEER(D, n_experts=8 * 8, n_heads=2, top_k=3, d_key=6, query_norm="none")
    ids, g = m.retrieve(torch.randn(4000, D))
    assert ids.min() >= 0 and ids.max() < 64
    assert torch.unique(ids).numel() >= 60  # random queries spread over the experts
    assert torch.allclose(g.sum(-1), torch.ones_like(g.sum(-1)))
    assert all(len(set(row.tolist())) == 3 for row in ids.reshape(-1, 3))  # a head's k ids are distinct
    # every expert is reachable: with unit sub-keys, the query [c_a; c'_b] retrieves expert a*S+b first
    keys = F.normalize(torch.randn(2, 1, 8, 3, dtype=torch.float64), dim=-1)
    a, b = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    q = torch.cat([keys[0, 0][a.reshape(-1)], keys[1, 0][b.reshape(-1)]], -1)[:, None, :]
    top_a, top_b = product_key_topk(q, keys, 3)
    assert torch.equal((top_a * 8 + top_b)[:, 0, 0], torch.arange(64))


def reference_peer(m: PEER, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, head by head: brute-force top-k over all N keys, softmax, single-neuron experts."""
    q_THQ = m.queries(x_TD)
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[m.activation]
    S, P = m.n_sub_keys, m.d_key // 2
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(x_TD.shape[1], dtype=x_TD.dtype)
        for h in range(m.n_heads):
            c1, c2 = m.sub_keys[0, h % m.sub_keys.shape[1]], m.sub_keys[1, h % m.sub_keys.shape[1]]
            full_NQ = torch.cat([c1[:, None, :].expand(S, S, -1), c2[None, :, :].expand(S, S, -1)], -1).reshape(S * S, 2 * P)
            scores_N = full_NQ @ q_THQ[t, h]
            top = scores_N.topk(m.top_k)
            g = top.values.softmax(0)
            for gi, i in zip(g, top.indices.tolist()):
                a = act(m.w_down[i] @ x_TD[t])
                if m.glu:
                    a = act(m.w_gate[i] @ x_TD[t]) * (m.w_down[i] @ x_TD[t])
                y = y + gi * a * m.w_up[i]
        rows.append(y)
    return torch.stack(rows)


VARIANTS = {
    "gelu, batch norm": dict(),
    "relu, layer norm": dict(activation="relu", query_norm="layer"),
    "glu silu, no norm": dict(glu=True, activation="silu", query_norm="none"),
    "per-head keys": dict(per_head_keys=True, query_norm="none"),
    "per-head keys, glu, dense grads": dict(per_head_keys=True, glu=True, sparse_grad=False),
    "whitened queries": dict(query_norm="whiten"),
}


def _grads(m: PEER, x, out, gy):
    names = ["query.weight", "sub_keys", "w_down", "w_up"] + (["w_gate"] if m.glu else [])
    params = dict(m.named_parameters())
    gs = torch.autograd.grad(out, [x] + [params[n] for n in names], gy)
    return {"x": gs[0], **{n: g.to_dense() if g.is_sparse else g for n, g in zip(names, gs[1:])}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_and_gradients_match_reference(variant, kernel_path):
    torch.manual_seed(2)
    kw = VARIANTS[variant]
    m = PEER(D, n_experts=7 * 7, n_heads=3, top_k=4, d_key=8, sparse_grad=kw.pop("sparse_grad", True), **kw).double()
    m.reset_parameters(std=0.5)  # pre-activations of order 1: the nonlinearity matters
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 9, D, dtype=torch.float64)
    y, _ = m(x)
    ref = reference_peer(m, x.reshape(-1, D)).reshape(x.shape)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    ours, theirs = _grads(m, x, y, gy), _grads(m, x, ref, gy)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-11, msg=name)
    if m.sparse_grad:
        m(x)[0].backward(gy)
        assert m.w_up.grad.is_sparse
        assert m.w_up.grad._nnz() <= 18 * 3 * 4  # only touched rows


def test_row_functions_match_dense_autograd(kernel_path):
    torch.manual_seed(3)
    table = torch.randn(50, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(20, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 50, (20, 6))
    for fn, ref in ((lambda: gather_dot(x, table, ids), lambda: (table[ids] * x[:, None]).sum(-1)),
                    (lambda: bag_sum(w, table, ids), lambda: (w[..., None] * table[ids]).sum(1))):
        out, expected = fn(), ref()
        g = torch.randn_like(out)
        torch.testing.assert_close(out, expected)
        ours = torch.autograd.grad(out, [x, w, table], g, allow_unused=True)
        theirs = torch.autograd.grad(expected, [x, w, table], g, allow_unused=True)
        for a, b in zip(ours, theirs):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)


def test_usage_statistics_as_table_2():
    scores = torch.tensor([1.0, 1.0, 2.0, 0.0])
    u = usage_from_scores(scores)
    z = torch.tensor([0.25, 0.25, 0.5])
    assert u["usage"] == 0.75
    assert u["kl_uniform"] == pytest.approx(math.log(4) + (z * z.log()).sum().item())
    assert usage_from_scores(torch.ones(9))["kl_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_stats_come_back_from_the_call():
    m = PEER(D, n_experts=16, n_heads=2, top_k=2, d_key=4)
    y, aux = m(torch.randn(3, 5, D))
    assert isinstance(aux, PEERAux) and not aux.losses
    assert aux.expert_scores.shape == (16,)
    assert aux.expert_scores.sum().item() == pytest.approx(15 * 2)  # softmax per head sums to 1
    assert 0 < aux.scalars()["experts_used_fraction"] <= 1


@pytest.mark.parametrize("field, value, words", [
    ("n_experts", 1000, "perfect square"), ("d_key", 7, "odd"), ("top_k", 40, "sqrt(n_experts="),
    ("query_norm", "group", "query_norm"), ("activation", "tanh", "activation"), ("n_heads", 0, "positive")])
def test_config_errors_name_field_and_value(field, value, words):
    with pytest.raises(UsageError, match=field) as e:
        PEERConfig(**{"n_experts": 1024, field: value})
    assert words in str(e.value) and str(value) in str(e.value)


def test_block_spec_placement_and_round_trip():
    with pytest.raises(UsageError, match="peer"):
        BlockSpec(ffn="peer")
    with pytest.raises(UsageError, match="unused"):
        BlockSpec(ffn="dense", peer=PEERConfig(n_experts=64, top_k=4))
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ffn=64, blocks=[
        {"ffn": "dense", "peer_beside": True, "peer": {"n_experts": 64, "top_k": 4, "n_heads": 2, "d_key": 8}},
        {"ffn": "peer", "peer": {"n_experts": 64, "top_k": 4, "n_heads": 2, "d_key": 8, "glu": True}}])
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = MixtureLM(cfg)
    x = torch.randn(2, 6, 32)
    block = model.blocks[0]
    y, aux = block.mlp(x)
    torch.testing.assert_close(y, block.ffn(x)[0] + block.beside[0](x)[0])
    assert [a.kind for a in aux] == ["dense", "peer"]
    out = model(torch.randint(0, 257, (2, 6)), torch.randint(0, 257, (2, 6)))
    assert {"layer0.experts_used_fraction", "layer1.experts_used_fraction"} <= set(out.stats())


def test_middle_block_of_presets():
    blocks = PRESETS["peer-tiny"].model["blocks"]
    assert [b["ffn"] for b in blocks] == ["dense", "peer", "dense", "dense"]
    p = ModelConfig(**PRESETS["peer-tiny"].model).blocks[1].peer
    assert (p.n_experts, p.n_heads, p.top_k, p.d_key, p.query_norm) == (1024**2, 8, 16, 128, "batch")
    # product keys at PKM's fixed 1e-4, the expert tables at 1e-2 (the README's training check)
    train = TrainConfig.from_dict(PRESETS["peer-tiny"].train)
    assert (train.mechanisms["peer"].key_lr, train.mechanisms["peer"].lr) == (1e-4, 1e-2)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_fixed_key_lr_holds_the_keys_group_constant(tmp_path):
    """--peer-key-lr puts the product keys in an AdamW group of their own, at that rate through warmup
    and decay, without weight decay, while the rest of the model follows the schedule."""
    from mixturelm.training import Trainer, new_run_config
    cfg = new_run_config("peer-debug", {"max_steps": 20, "peer_key_lr": 1e-4})
    tr = Trainer(cfg, tmp_path / "run", overwrite=True, progress=False, device="cpu")
    tr._build()
    peer = next(m for m in tr.model.modules() if isinstance(m, PEER))
    keys = [g for g in tr.optim.opt.param_groups if any(p is peer.sub_keys for p in g["params"])]
    assert len(keys) == 1 and len(keys[0]["params"]) == 1 and keys[0]["weight_decay"] == 0.0
    others = [g for g in tr.optim.opt.param_groups if g is not keys[0]]
    seen = []
    for _ in range(15):
        seen.append((keys[0]["lr"], others[0]["lr"]))
        tr.optim.sched.step()
    assert all(k == 1e-4 for k, _ in seen)
    assert len({o for _, o in seen}) > 5  # the model's rate warms up and decays


@pytest.mark.parametrize("norm", ["batch", "whiten"])
def test_batch_norm_leaks_across_the_batch_in_training_only(norm):
    """The documented caveat: with query BatchNorm (or whitening), changing a later token changes an
    earlier token's output in training (batch statistics), never at eval (running statistics)."""
    torch.manual_seed(4)
    m = PEER(D, n_experts=8 * 8, n_heads=2, top_k=3, d_key=6, query_norm=norm)
    x = torch.randn(1, 10, D)
    x2 = x.clone()
    x2[0, -1] += 5.0
    assert not torch.allclose(m(x)[0][0, 0], m(x2)[0][0, 0])
    m.eval()
    torch.testing.assert_close(m(x)[0][0, 0], m(x2)[0][0, 0])


def test_cli_trains_peer_debug_and_reports_usage(tmp_path, corpus_dir):
    out = tmp_path / "run"
    proc = run_cli("train", "--preset", "peer-debug", "--data", str(corpus_dir), "--out", str(out),
                   "--max-steps", "6", "--ckpt-every", "4", "--eval-every", "3", "--eval-tokens", "512",
                   "--no-progress", check=True)
    assert "of experts used over the validation tokens" in proc.stderr
    res = json.loads((out / "results.json").read_text())
    usage = res["peer_usage"]["layer0"]
    assert 0 < usage["usage"] <= 1 and usage["kl_uniform"] >= 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("layer0.peer_usage" in r for r in evals if r["kind"] == "eval")
    # resume from the step-4 checkpoint repeats steps 5-6 exactly, the sparse optimizer's state included
    first = [r["loss"] for r in evals if r["kind"] == "train"]
    state = torch.load(out / "checkpoints" / "step_0000006" / "train_state.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]  # the expert tables' row-wise optimizer state is saved
    rows = [i for g in groups if g["row_sparse"] for i in g["params"]]
    assert rows and all(state["optimizer"]["state"][i]["exp_avg"].shape[0] == 64 * 64 for i in rows)
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_0000006")
    (out / "checkpoints" / "latest").write_text("step_0000004")
    run_cli("train", "--out", str(out), "--resume", "--no-progress", check=True)
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if r["kind"] == "train"] == first


def test_eval_leaves_training_state_alone(corpus_dir):
    from mixturelm.data.tokens import prepare
    from mixturelm.training import evaluate

    cfg = ModelConfig(**PRESETS["peer-debug"].model)
    model = MixtureLM(cfg)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = prepare(str(corpus_dir), "bytes", 0.1, "text", None, log=lambda m: None)
    res = evaluate(model, data, 32, 1024, 4, "cpu")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert 0 < res["layer0.peer_usage"] <= 1


def test_calibrate_query_norms_sets_precise_statistics():
    """Precise BN: the query BatchNorm's running statistics become the average of the batch statistics
    over the calibration batches at the current weights; nothing else in the model changes."""
    torch.manual_seed(0)
    cfg = ModelConfig(**PRESETS["peer-debug"].model)
    model = MixtureLM(cfg)
    model.train()
    peer = next(m for m in model.modules() if isinstance(m, PEER))
    bn = peer.query_norm
    bn.running_mean.fill_(3.0)  # stale statistics, far from the queries'
    bn.running_var.fill_(7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, cfg.vocab_size, (4, 17)) for _ in range(3)]
    means, vars_ = [], []

    def record(module, args, out):
        means.append(out.mean(0))
        vars_.append(out.var(0, unbiased=True))

    hook = peer.query.register_forward_hook(record)
    assert mechanism("peer").calibrate(model, batches) == 1
    hook.remove()
    assert model.training and bn.momentum == 0.1
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(vars_).mean(0))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {n for n in before if n.endswith(("query_norm.running_mean", "query_norm.running_var"))}


def test_query_whitening_is_zca_of_each_head():
    """Training: each head's whitened query has zero mean and identity covariance, through a symmetric
    W with W C W = I (what defines ZCA whitening); eval after calibrating on that one batch gives the
    same queries; the affine is applied per feature."""
    from mixturelm.layers.peer import QueryWhitening

    torch.manual_seed(5)
    H, Q, T = 3, 8, 400
    mix = torch.randn(H, Q, Q, dtype=torch.float64) * torch.logspace(0, -2, Q, dtype=torch.float64)
    q = torch.einsum("thp,hpq->thq", torch.randn(T, H, Q, dtype=torch.float64), mix) + 3.0
    w = QueryWhitening(H, Q, eps=1e-12).double()
    out = w(q)
    for h in range(H):
        torch.testing.assert_close(out[:, h].mean(0), torch.zeros(Q, dtype=torch.float64), atol=1e-9, rtol=0)
        torch.testing.assert_close(torch.cov(out[:, h].T, correction=0), torch.eye(Q, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    C = torch.stack([torch.cov(q[:, h].T, correction=0) for h in range(H)])
    W = w.matrix(C)
    torch.testing.assert_close(W, W.transpose(1, 2))
    torch.testing.assert_close(W @ C @ W, torch.eye(Q, dtype=torch.float64).expand(H, Q, Q), atol=1e-6, rtol=0)
    assert torch.linalg.eigvalsh(W).min() > 0
    # the gradient: the statistics are constants of the step, so dq = (dy * gain) W (W symmetric)
    qg = q.clone().requires_grad_(True)
    gy = torch.randn_like(q)
    with torch.no_grad():
        w.weight.uniform_(0.5, 1.5)
    (dq,) = torch.autograd.grad(w(qg), qg, gy)
    torch.testing.assert_close(dq, torch.einsum("thp,hpq->thq", gy * w.weight.view(H, Q), W))
    with torch.no_grad():
        w.weight.fill_(1.0)
    w.reset_running_stats()
    w.momentum = None  # one batch: the running statistics become that batch's
    w(q)
    w.eval()
    torch.testing.assert_close(w(q), out)
    # the eval matrix is kept between calls and follows every change of the statistics
    fresh = QueryWhitening(H, Q, eps=1e-12).double()
    fresh.load_state_dict(w.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(q), out)
    fresh.load_state_dict(QueryWhitening(H, Q, eps=1e-12).double().state_dict())  # identity statistics
    torch.testing.assert_close(fresh(q), q)
    fresh.running_mean.add_(1.0)  # an in-place write from outside
    torch.testing.assert_close(fresh(q), q - 1.0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        w.train()(q[:1])
    with torch.no_grad():
        w.weight.fill_(2.0)
        w.bias.fill_(-1.0)
    torch.testing.assert_close(w(q), 2.0 * out - 1.0)


def test_query_whitening_spreads_correlated_queries_over_more_experts():
    """Why the option exists: with inputs of low effective rank, BatchNorm's per-feature standardisation
    keeps the queries correlated and the two halves' choices tied; whitening retrieves more experts."""
    torch.manual_seed(6)
    T, d = 2000, 32
    x = torch.randn(T, d) @ (torch.randn(d, d) * torch.logspace(0, -2, d))  # a decaying spectrum
    used = {}
    for norm in ("batch", "whiten"):
        torch.manual_seed(7)
        m = PEER(d, n_experts=64 * 64, n_heads=2, top_k=4, d_key=16, query_norm=norm)
        ids, _ = m.retrieve(x)
        used[norm] = torch.unique(ids).numel()
    assert used["whiten"] > 1.3 * used["batch"], used  # measured: 2873 against 1878 of 4096


def test_calibrate_query_norms_sets_whitening_statistics():
    """Precise statistics for whitened queries too: the running mean and covariance of each head's query
    become the average over the calibration batches of the batch's own."""
    torch.manual_seed(0)
    model_cfg = PRESETS["peer-debug"].model
    blocks = [dict(b) for b in model_cfg["blocks"]]
    i = next(j for j, b in enumerate(blocks) if b.get("ffn") == "peer")
    blocks[i] = blocks[i] | {"peer": blocks[i]["peer"] | {"query_norm": "whiten"}}
    cfg = ModelConfig(**(model_cfg | {"blocks": blocks}))
    model = MixtureLM(cfg)
    peer = next(m for m in model.modules() if isinstance(m, PEER))
    wn = peer.query_norm
    wn.running_cov.mul_(5.0)  # stale statistics
    batches = [torch.randint(0, cfg.vocab_size, (4, 17)) for _ in range(3)]
    means, covs = [], []

    def record(module, args, out):
        q = out.detach().double().view(out.shape[0], peer.n_heads, peer.d_key)
        c = q - q.mean(0)
        means.append(q.mean(0))
        covs.append(torch.einsum("thp,thq->hpq", c, c) / q.shape[0])

    hook = peer.query.register_forward_hook(record)
    assert mechanism("peer").calibrate(model, batches) == 1
    hook.remove()
    assert wn.momentum == 0.1 and wn.num_batches_tracked.item() == 0
    torch.testing.assert_close(wn.running_mean, torch.stack(means).mean(0).float())
    torch.testing.assert_close(wn.running_cov, torch.stack(covs).mean(0).float())


def test_whitening_is_calibrated_after_an_eval_and_kept_out_of_weight_decay():
    """An evaluation before calibration must not leave a stale eval matrix behind; the whitening's
    gain and bias are not decayed (as BatchNorm's)."""
    from mixturelm.layers.peer import QueryWhitening
    from mixturelm.training.optim import param_groups

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, d_ffn=32, max_seq_len=16,
                      blocks=[{"ffn": "peer", "peer": {"n_experts": 64, "n_heads": 2, "top_k": 3, "d_key": 8,
                                                       "query_norm": "whiten"}}])
    model = MixtureLM(cfg)
    x = torch.randint(0, 257, (4, 16))
    model.eval()
    stale = model(x).logits
    batches = [torch.randint(0, 257, (4, 17)) for _ in range(2)]
    mechanism("peer").calibrate(model, batches)
    model.eval()
    calibrated = model(x).logits
    again = MixtureLM(cfg)
    again.load_state_dict(model.state_dict())
    again.eval()
    torch.testing.assert_close(again(x).logits, calibrated)
    assert not torch.allclose(stale, calibrated)
    decayed = {id(p) for g in param_groups(model, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
    norm = next(m for m in model.modules() if isinstance(m, QueryWhitening))
    assert all(id(p) not in decayed for p in norm.parameters())


def test_cli_peer_options_set_every_peer_layer_and_resume_checks_them(tmp_path, corpus_dir):
    """--peer-query-norm/--peer-heads/--peer-top-k/--peer-experts reach the PEER layer; whitened queries
    train, evaluate and sample; resuming with another value is refused."""
    out = tmp_path / "run"
    run_cli("train", "--preset", "peer-debug", "--data", str(corpus_dir), "--out", str(out), "--max-steps", "4",
            "--eval-every", "2", "--ckpt-every", "2", "--eval-tokens", "512", "--no-progress",
            "--peer-query-norm", "whiten", "--peer-heads", "2", "--peer-top-k", "4", "--peer-experts", "256",
            check=True)
    saved = json.loads((out / "config.json").read_text())
    peer = next(b["peer"] for b in saved["model"]["blocks"] if b.get("peer"))
    assert (peer["query_norm"], peer["n_heads"], peer["top_k"], peer["n_experts"]) == ("whiten", 2, 4, 256)
    res = json.loads((out / "results.json").read_text())
    assert 0 < res["peer_usage"]["layer0"]["usage"] <= 1
    evaluated = run_cli("eval", "--ckpt", str(out), check=True).stdout  # the run's own 512 tokens
    assert f"loss {res['val_loss']:.4f}" in evaluated  # the reloaded whitening gives the trainer's loss
    run_cli("generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "6", check=True)
    before = tree_digest(out)
    proc = run_cli("train", "--out", str(out), "--resume", "--peer-query-norm", "batch")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--peer-query-norm batch differs" in proc.stderr
    assert tree_digest(out) == before


@pytest.mark.parametrize("args, message", [
    (["--preset", "peer-debug", "--peer-query-norm", "group"], "--peer-query-norm='group' is unknown"),
    (["--preset", "peer-debug", "--peer-experts", "1000"], "perfect square"),
    (["--preset", "dense-debug", "--peer-heads", "2"], "--peer-heads: preset dense-debug has no PEER blocks"),
    (["--preset", "peer-debug", "--peer-lr", "nan"], "--peer-lr must be a finite number > 0"),
])
def test_cli_bad_peer_options_exit_2_with_one_line(tmp_path, args, message):
    assert_train_refuses(tmp_path, args, message)
